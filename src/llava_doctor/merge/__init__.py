"""`llava-doctor merge` as a library: a streaming, verified LoRA merge for LLaVA runs.

    result = merge("checkpoints/llava-v1.5-7b-lora", "vicuna-7b-v1.5", "llava-v1.5-7b-merged")

Steps: run the checks (refuse on errors unless ``force``), plan the output from headers
(`plan.build_plan`), stream every tensor through the LoRA maths into ``OUT.partial-<pid>/``
(`stream.Executor`), write config/generation config/tokenizer/index, verify
(`verify.verify_output`), then rename the partial dir to ``OUT``. Any failure removes the
partial dir; a run that is killed leaves it behind, and the next run removes partial dirs whose
process is gone. ``OUT`` exists only when it is complete and verified.

Progress goes to ``observer`` (a callable taking a `MergeEvent`); nothing here prints.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import sys
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.configs import read_json
from llava_doctor.artifacts.discovery import Family
from llava_doctor.errors import DoctorError, MergeError, UsageError
from llava_doctor.fsutil import fsync_dir
from llava_doctor.merge.hf import build_hf_plan, write_hf_side_files
from llava_doctor.merge.llava_parts import (
    llm_family,
    merged_config,
    out_name_warnings,
    tokenizer_files,
    write_generation_config,
)
from llava_doctor.merge.plan import DTYPES, MergeInputs, MergePlan, build_plan, parse_size
from llava_doctor.merge.stream import Executor, MergeEvent, Observer
from llava_doctor.merge.verify import SampleChecker, Verification, verify_output
from llava_doctor.merge.writer import crash_point, write_file, write_index, write_json
from llava_doctor.models import Consumer, Finding, Report, Severity

__all__ = ["merge", "MergeResult", "MergeEvent", "PreflightRefused", "resolve_device",
           "parse_size", "resolve_inputs", "build_plan", "MergePlan", "cleanup_stale", "DTYPES"]

_PARTIAL = re.compile(r"^(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


class PreflightRefused(MergeError):
    """The checks found errors; ``report`` holds them. Nothing was written."""

    def __init__(self, report: Report, errors: list[Finding] | None = None):
        if errors is None:
            errors = [f for f in report.findings if f.severity == Severity.error]
        self.errors = errors
        codes = ", ".join(sorted({f.code for f in errors}))
        super().__init__(f"the checks found {len(errors)} error(s) ({codes}); nothing was merged",
                         hint="fix them (`llava-doctor fix` repairs many), or pass --force to "
                              "merge anyway")
        self.report = report


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote and how it went."""

    out: Path
    files: dict[str, str]             # file name in OUT -> sha256
    shards: int
    tensors: int                      # tensors written
    tensors_merged: int               # tensors that received a LoRA delta (weights and biases)
    lora_modules: int                 # adapted modules (Linear and Embedding)
    replaced: int                     # tensors replaced by non-LoRA trainables / modules_to_save
    projector_source: str
    dtype: str                        # the output's (dominant) dtype, "auto" resolved
    device: str
    total_size: int                   # bytes of tensor data
    seconds: float
    peak_rss_bytes: int
    verified: Verification | None
    notes: tuple[str, ...] = ()
    warnings: tuple[Finding, ...] = field(default_factory=tuple)


# Device nodes of a GPU driver torch.cuda can use (NVIDIA, ROCm, WSL): without any of them
# torch cannot see a GPU, and "auto" is "cpu" without importing torch (1.3-1.8 s of a CPU merge).
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _gpu_possible() -> bool:
    return any(os.path.exists(p) for p in _GPU_NODES)


def resolve_device(device: str) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch device string; UsageError if unusable.

    torch is imported only to ask about a GPU that may exist."""
    d = (device or "auto").strip().lower()
    if d == "cpu" or (d == "auto" and not _gpu_possible()):
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", d)
    if m is None and d != "auto":
        raise UsageError(f"unknown --device '{device}'", hint="use auto, cpu, cuda or cuda:N")
    import torch

    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    assert m is not None
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA GPU on this machine",
                         hint="use --device cpu (or auto, which picks a GPU when there is one)")
    idx = int(m.group(1) or 0)
    if idx >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s)",
                         hint="pick an index below that")
    return f"cuda:{idx}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(out: Path) -> list[Path]:
    """Clean up after merges into ``out`` whose process is gone.

    ``OUT.partial-<pid>`` (an unfinished output) is removed. ``OUT.old-<pid>`` is the previous
    OUT that an ``--overwrite`` run moved aside just before installing its own: if that run died
    before the second rename, OUT is missing and the old one is put back; otherwise it is removed.
    Returns the paths removed or restored.
    """
    done: list[Path] = []
    parent = out.parent
    if not parent.is_dir():
        return done
    stale = []
    for entry in parent.iterdir():
        m = _PARTIAL.match(entry.name)
        if m is None or m.group("name") != out.name or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another merge into the same OUT is running
        stale.append((m.group("kind"), entry))
    for kind, entry in sorted(stale, key=lambda e: e[0] != "old"):
        if kind == "old" and not out.exists() and not out.is_symlink():
            os.rename(entry, out)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        done.append(entry)
    return done


def resolve_inputs(lora_dir: Path, base: Path | None, projector: Path | None,
                   ) -> tuple[MergeInputs, DoctorError | None]:
    """Find and read the headers of everything the merge needs (the checks' own resolution).

    Returns the inputs and the error of a stage-1 projector that could not be read (it only
    matters when neither non_lora_trainables nor the base has a projector).
    """
    from llava_doctor.checks.context import Context, Options

    ctx = Context(path=lora_dir, options=Options(base=base, projector=projector, fast=True))

    def fail_for(path: Path | None, what: str, hint: str) -> MergeError:
        err = ctx.file_errors.get(path) if path is not None else None
        if err is not None:
            return MergeError(err.message, path=err.path, hint=err.hint)
        return MergeError(what, path=lora_dir, hint=hint)

    adapter = ctx.adapter
    if adapter is None:
        raise fail_for(ctx.adapter_path, "has no adapter_model.safetensors or adapter_model.bin",
                       "pass the LoRA output directory (LD102)")
    acfg = ctx.adapter_config_raw
    if acfg is None:
        raise fail_for(ctx.file("adapter_config.json"), "has no adapter_config.json",
                       "copy it from the run's output (LD103)")
    family = ctx.family
    lora_config = None
    if family == Family.llava:
        if ctx.file("config.json") is None:
            raise MergeError("has no config.json, so the merged model's LLaVA config is unknown",
                             path=lora_dir, hint="run `llava-doctor fix` (LD101)")
        lora_config = read_json(lora_dir / "config.json")
    if ctx.base_path is None:
        raise MergeError(f"no base model: {ctx.base_resolved.note}", path=lora_dir,
                         hint="pass --base DIR, the model the LoRA was trained on")
    md = ctx.base
    if md is None:
        raise fail_for(ctx.base_path, "base model directory has no weights",
                       "pass --base DIR with model*.safetensors or pytorch_model*.bin (LD401)")
    base_config = read_json(ctx.base_path / "config.json") \
        if (ctx.base_path / "config.json").is_file() else None
    non_lora = ctx.non_lora
    if ctx.non_lora_path is not None and non_lora is None:
        raise fail_for(ctx.non_lora_path, "non_lora_trainables.bin cannot be read", "")
    pres = ctx.projector_resolved
    proj = ctx.projector if pres.path is not None else None
    proj_err = ctx.file_errors.get(pres.path) if pres.path is not None and proj is None else None
    inputs = MergeInputs(lora_dir=lora_dir, adapter=adapter, adapter_config=acfg,
                         lora_config=lora_config, base_path=ctx.base_path, base=md,
                         base_config=base_config, non_lora=non_lora, projector=proj,
                         projector_label=pres.source, family=family)
    return inputs, proj_err


def _check_paths(lora_dir: Path, base: Path | None, out: Path, overwrite: bool) -> None:
    if not lora_dir.is_dir():
        raise UsageError("is not a directory", path=lora_dir, hint="pass the LoRA output directory")
    check_out(out, overwrite, ((lora_dir, "the LoRA directory"), (base, "the base model")),
              made="merged model")


def check_out(out: Path, overwrite: bool, inputs: Iterable[tuple[Path | None, str]],
              made: str) -> None:
    """--out overlaps no input and does not exist unless --overwrite (then it is a directory)."""
    out_r = out.resolve()
    for other, what in inputs:
        if other is None:
            continue
        o = other.resolve()
        if out_r == o or o in out_r.parents or out_r in o.parents:
            raise UsageError(f"--out overlaps {what} ({other})", path=out,
                             hint=f"write the {made} to a new directory")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MergeError("already exists; refusing to overwrite it", path=out,
                             hint="pass --overwrite, or choose another --out")
        if not out.is_dir() or out.is_symlink():
            raise MergeError("exists and is not a directory", path=out,
                             hint="remove it or choose another --out")


# Errors about LLaVA's own merge that this merge does not share, with how it avoids them.
_HANDLED = {
    "LD302": "the projector comes from the stage-1 file or from keys LLaVA would drop",
    "LD305": "the keys are normalised to LLaVA's names",
}


def _handled(f: Finding, plan: MergePlan) -> bool:
    if f.code == "LD302":
        return plan.projector_source.startswith("stage-1 projector") or (
            "keys normalised" in plan.projector_source)
    if f.code == "LD305":
        # Every non_lora key found a parameter (the plan refuses or reports the others).
        return not any(k.startswith("non_lora_trainables") for k in plan.dropped)
    return False


def _check_space(where: Path, plan: MergePlan) -> None:
    """Refuse to start when the file system cannot hold the output (LD601 says it earlier;
    this holds under --force too: a merge that cannot fit only fails later)."""
    try:
        st = os.statvfs(where)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    need = plan.file_bytes + (64 << 20)  # configs and tokenizer: a generous allowance
    if free < need:
        raise MergeError(f"needs about {need / 1e9:.2f} GB for the merged model but the file "
                         f"system has {free / 1e9:.2f} GB free", path=where,
                         hint="free space or choose an --out on another disk (LD601); nothing "
                              "was written")


def _peak_rss() -> int:
    # Linux reports kilobytes (macOS bytes); this tool targets Linux training machines.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def merge(lora_dir: Path | str, base: Path | str | None, out: Path | str, *,
          projector: Path | str | None = None, device: str = "auto", dtype: str = "float16",
          max_shard_size: int | float | str = 5e9, force: bool = False, overwrite: bool = False,
          verify: bool = True, observer: Observer | None = None, durable: bool = True,
          to: str = "llava", vision_tower: Path | str | None = None,
          conv_template: str | None = None) -> MergeResult:
    """Merge a LLaVA LoRA run into ``out`` (see the module doc). Raises a DoctorError subclass
    (PreflightRefused, MergeError, UsageError, FileCorruptError, ...) on any failure, after which
    ``out`` is untouched.

    ``to`` "llava-hf" writes the canonical llava-hf checkpoint instead (`merge.convert`): the
    LD8xx checks run too and are never forced; ``vision_tower`` and ``conv_template`` as in
    `convert`.

    ``base`` None means the base recorded in adapter_config.json (local dir or HF cache).
    ``dtype`` "auto" keeps each base tensor's dtype. ``durable`` fsyncs every file before the
    rename (turn off only for throwaway outputs).
    """
    t0 = time.monotonic()
    lora_dir = Path(lora_dir)
    out = Path(out)
    base_p = Path(base) if base is not None else None
    proj_p = Path(projector) if projector is not None else None
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'", hint=f"choose one of: {', '.join(DTYPES)}")
    shard_limit = parse_size(max_shard_size)
    if to not in ("llava", "llava-hf"):
        raise UsageError(f"unknown --to '{to}'", hint="choose llava or llava-hf")
    vt = Path(vision_tower) if vision_tower is not None else None
    if conv_template is not None:
        from llava_doctor.merge.hf_files import chat_template

        chat_template(conv_template)  # a usage error before any work
    # First, so that an OUT a killed --overwrite run had moved aside is back before we look.
    cleanup_stale(out)
    _check_paths(lora_dir, base_p, out, overwrite)

    def emit(**kw: Any) -> None:
        if observer is not None:
            observer(MergeEvent(**kw))

    emit(phase="checks")
    from llava_doctor.checks.context import Options
    from llava_doctor.doctor import run_checks

    # Severities for this merge: what it handles (the generation config, QLoRA's config, names,
    # model_type) is info, what it cannot do is an error and refuses the merge.
    report = run_checks([lora_dir], Options(base=base_p, projector=proj_p, out=out, fast=True,
                                            to="llava-hf" if to == "llava-hf" else None,
                                            vision_tower=vt, consumer=Consumer.llava_doctor))
    if to == "llava-hf":
        from llava_doctor.merge.convert import refuse_on_hf_errors

        refuse_on_hf_errors(report)
    errors = [f for f in report.findings if f.severity == Severity.error]

    emit(phase="plan")
    try:
        inputs, proj_err = resolve_inputs(lora_dir, base_p, proj_p)
        plan = PLANNERS[inputs.family](inputs, dtype=dtype, max_shard_size=shard_limit,
                                       force=force)
        if plan.projector_source == "none" and proj_err is not None:
            raise MergeError(proj_err.message, path=proj_err.path, hint=proj_err.hint)
    except DoctorError:
        if errors and not force:
            raise PreflightRefused(report, errors) from None  # the findings explain it better
        raise
    handled = [f for f in errors if _handled(f, plan)]
    blocking = [f for f in errors if f not in handled]
    if blocking and not force:
        raise PreflightRefused(report, blocking)
    warnings = tuple(f for f in report.findings if f.severity != Severity.info
                     or f.code.startswith("LD6"))
    hf = None
    # A llava-hf run merges into the canonical llava-hf layout already: nothing to convert.
    if to == "llava-hf" and inputs.family == Family.llava:
        from llava_doctor.merge.convert import prepare_hf

        hf = prepare_hf(inputs.lora_config or {}, {t.name: t.shape for t in plan.tensors},
                        tok_dir=inputs.base_path, gen_dir=inputs.base_path, vision_tower=vt,
                        relative_to=lora_dir, conv_template=conv_template, durable=durable)
        plan = hf.plan(plan, shard_limit)
    notes = list(plan.notes)
    notes += [f"{f.code} {f.name}: an error for LLaVA's own merge, handled here ("
              + _HANDLED[f.code] + ")" for f in handled]

    if hf is None and inputs.family == Family.llava:  # names matter to LLaVA's loader only
        notes += out_name_warnings(out, llm_family(inputs.lora_config, inputs.base_config))

    def side(plan: MergePlan, partial: Path, notes: list[str]) -> dict[str, str]:
        if hf is not None:
            return hf.side_files(plan, partial, notes)
        return SIDE_FILES[inputs.family](plan, inputs, partial, durable, notes)

    files, checked = write_verified(plan, out, dev, side, notes, observer=observer,
                                    durable=durable, verify=verify)
    result = MergeResult(
        out=out, files=files, shards=len(plan.shards), tensors=len(plan.tensors),
        tensors_merged=sum(1 for t in plan.tensors if t.lora is not None or t.lora_bias),
        lora_modules=plan.lora_modules, replaced=len(plan.replaced),
        projector_source=plan.projector_source,
        dtype=dtype if dtype != "auto" else _auto_dtype_name(plan), device=dev,
        total_size=plan.total_size, seconds=time.monotonic() - t0, peak_rss_bytes=_peak_rss(),
        verified=checked, notes=tuple(notes), warnings=warnings)
    emit(phase="done", done=result.tensors, total=result.tensors)
    return result


SideFiles = Callable[[MergePlan, Path, list[str]], dict[str, str]]


def write_verified(plan: MergePlan, out: Path, dev: str, side_files: SideFiles, notes: list[str],
                   *, observer: Observer | None = None, durable: bool = True, verify: bool = True,
                   ) -> tuple[dict[str, str], Verification | None]:
    """Stream ``plan`` into ``OUT.partial-<pid>``, add ``side_files(plan, partial, notes)``,
    verify, and rename it to ``out``; the partial dir is removed on any failure.

    Returns {file name: sha256} and what verification looked at.
    """
    def emit(**kw: Any) -> None:
        if observer is not None:
            observer(MergeEvent(**kw))

    partial = out.parent / f"{out.name}.partial-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_space(out.parent, plan)
    if partial.exists():
        shutil.rmtree(partial)
    # The mkdir sits inside the cleanup's try: a SIGTERM/Ctrl-C that lands just after the
    # directory was created (still inside pathlib's mkdir) must remove it too.
    sampler: SampleChecker | None = None
    try:
        try:
            partial.mkdir()
        except OSError as e:
            raise MergeError(f"cannot create the work directory ({e.strerror})", path=partial,
                             hint="check that the parent of --out is writable") from None
        # The sampled tensors are recomputed while the merge writes the rest (verify.py).
        sampler = SampleChecker(plan, partial) if verify else None
        executor = Executor(plan, partial, dev, observer=observer, durable=durable,
                            read_back=verify,
                            after_tensor=sampler.written if sampler is not None else None)
        hashes = executor.run()
        emit(phase="finalize")
        files = dict(hashes)
        files.update(side_files(plan, partial, notes))
        checked: Verification | None = None
        if verify:
            emit(phase="verify", total=len(plan.shards))
            checked = _verify(plan, partial, hashes, executor.reread, dev, sampler)
        if durable:
            fsync_dir(partial)
        _install(partial, out)
    except BaseException:
        if sampler is not None:
            sampler.close()  # it may be reading the partial dir
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return files, checked


def _verify(plan: MergePlan, out: Path, hashes: dict[str, str], reread: dict[str, str] | None,
            device: str, sampler: SampleChecker | None = None) -> Verification:
    import torch

    from llava_doctor.merge.stream import compute_threads

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(compute_threads())  # hashing threads run beside it, as above
    try:
        return verify_output(plan, out, hashes, reread=reread, sampler=sampler)
    finally:
        torch.set_num_threads(threads)


def _write_side_files(plan: MergePlan, inputs: MergeInputs, out: Path, durable: bool,
                      notes: list[str]) -> dict[str, str]:
    """Index, config.json, generation_config.json and tokenizer files; returns their sha256."""
    files: dict[str, str] = {}
    name, digest = write_index(plan, out, durable)
    files[name] = digest
    out_dtype = plan.out_dtype if plan.out_dtype != "auto" else _auto_dtype_name(plan)
    cfg, cfg_notes = merged_config(inputs.lora_config or {}, out_dtype=out_dtype,
                                   base=inputs.base_path, vocab_rows=plan.vocab_rows)
    notes += cfg_notes
    files["config.json"] = write_json(out / "config.json", cfg, durable=durable)
    gen_digest = write_generation_config(inputs.base_path, out, durable, notes)
    if gen_digest is not None:
        files["generation_config.json"] = gen_digest
    tok = tokenizer_files(inputs.base_path)
    if not tok:
        notes.append(f"the base {inputs.base_path} has no tokenizer files; copy them into the "
                     "merged directory before loading it (LD405)")
    for src in tok:
        try:
            data = src.read_bytes()
        except OSError as e:
            raise MergeError(f"cannot read tokenizer file ({e.strerror})", path=src,
                             hint="check its permissions") from None
        files[src.name] = write_file(out / src.name, data, durable=durable)
    return files


def _write_hf_side_files(plan: MergePlan, inputs: MergeInputs, out: Path, durable: bool,
                         notes: list[str]) -> dict[str, str]:
    out_dtype = plan.out_dtype if plan.out_dtype != "auto" else _auto_dtype_name(plan)
    return write_hf_side_files(plan, inputs, out, durable, notes, out_dtype)


# One planner and one side-file writer per family; the streaming writer and the verifier
# serve both.
PLANNERS: dict[Family, Callable[..., MergePlan]] = {Family.llava: build_plan,
                                                    Family.llava_hf: build_hf_plan}
SIDE_FILES: dict[Family, Callable[[MergePlan, MergeInputs, Path, bool, list[str]],
                                  dict[str, str]]] = {
    Family.llava: _write_side_files, Family.llava_hf: _write_hf_side_files}


def _auto_dtype_name(plan: MergePlan) -> str:
    from llava_doctor.artifacts.tensors import ST_TO_TORCH

    sizes: dict[str, int] = {}
    for t in plan.tensors:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    best = max(sizes, key=lambda d: sizes[d]) if sizes else "F16"
    return ST_TO_TORCH.get(best, "float16")


def _install(partial: Path, out: Path) -> None:
    """Rename the finished partial dir to OUT (moving an old OUT aside first, then deleting it)."""
    old: Path | None = None
    try:
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            crash_point()
        os.rename(partial, out)
        crash_point()
    except OSError as e:
        if old is not None and not out.exists():
            os.rename(old, out)  # put the user's old output back
        raise MergeError(f"cannot move the merged model into place ({e.strerror})", path=out,
                         hint="check permissions of the parent directory") from None
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _CallableModule(types.ModuleType):
    """`llava_doctor.merge(...)` is `llava_doctor.merge.merge(...)` (the Python API): the package
    attribute `merge` is this subpackage once any of its modules is imported, so the subpackage
    itself is made callable rather than shadowed by a function."""

    def __call__(self, lora_dir: Path | str, base: Path | str | None = None,
                 out: Path | str | None = None, **kwargs: Any) -> MergeResult:
        if out is None:
            raise UsageError("merge needs an output directory", hint="pass out=DIR")
        return merge(lora_dir, base, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
