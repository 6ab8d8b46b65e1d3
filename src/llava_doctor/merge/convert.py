"""`llava-doctor convert` and `merge --to llava-hf` as a library: original LLaVA -> llava-hf.

    result = convert("llava-v1.5-7b", "llava-v1.5-7b-hf", vision_tower="clip-vit-large-patch14-336")

Steps, as in `merge`: run the checks with the LD8xx conversion checks (refuse on any error
before writing anything; an unresolvable vision tower is a usage error, exit 2), plan from
headers (`hf_plan`), stream into ``OUT.partial-<pid>/``, write config/processor/tokenizer
files, verify, rename. Nothing here prints; progress goes to ``observer``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.configs import read_json, tokenizer_length
from llava_doctor.artifacts.discovery import DirKind, classify
from llava_doctor.artifacts.hf_convert import Tower, is_next, read_tower, resolve_tower
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.errors import MergeError, UsageError
from llava_doctor.merge import (
    DTYPES,
    MergeResult,
    PreflightRefused,
    _auto_dtype_name,
    _peak_rss,
    check_out,
    cleanup_stale,
    parse_size,
    resolve_device,
    write_verified,
)
from llava_doctor.merge.hf_files import (
    chat_template,
    default_conv_template,
    hf_config,
    processor_configs,
    tokenizer_files,
)
from llava_doctor.merge.hf_plan import Vocab, plan_llava_hf, plan_model_dir
from llava_doctor.merge.llava_parts import fixed_generation_config, llm_family
from llava_doctor.merge.plan import MergePlan
from llava_doctor.merge.stream import MergeEvent, Observer
from llava_doctor.merge.writer import write_file, write_index, write_json
from llava_doctor.models import Finding, Report, Severity

TARGETS = ("llava", "llava-hf")


class ConversionRefused(PreflightRefused):
    """The checks found errors for a llava-hf output; nothing was written."""

    def __init__(self, report: Report, errors: list[Finding]):
        super().__init__(report, errors)
        codes = ", ".join(sorted({f.code for f in errors}))
        self.message = (f"the checks found {len(errors)} error(s) ({codes}); nothing was "
                        "written")
        self.args = (self.message,)
        self.hint = (f"`llava-doctor explain {errors[0].code}` says why and what to do"
                     + ("; LD8xx inputs have no llava-hf form and cannot be forced"
                        if any(f.code.startswith("LD8") for f in errors) else ""))


def refuse_on_hf_errors(report: Report) -> None:
    """Raise for the LD8xx errors of a report (never forced: they cannot map). LD802, no
    vision tower to be found, is a usage error (exit 2): the user has to name one."""
    errors = [f for f in report.findings if f.severity == Severity.error
              and f.code.startswith("LD8")]
    for f in errors:
        if f.code == "LD802":
            raise UsageError(f.message.split("; ")[0], path=f.path,
                             hint=f.evidence.get("hint") or "pass --vision-tower CLIP_DIR")
    if errors:
        raise ConversionRefused(report, errors)


@dataclass(frozen=True)
class HfConversion:
    """Everything the llava-hf output needs besides the LLaVA-named plan."""

    cfg: dict[str, Any]
    tower: Tower
    vocab: Vocab
    next_: bool
    family: str
    template: str
    tok_dir: Path
    gen_dir: Path
    durable: bool = True

    def plan(self, plan: MergePlan, max_shard_size: int) -> MergePlan:
        """``plan`` in canonical llava-hf names."""
        return plan_llava_hf(plan, self.tower, self.vocab, next_=self.next_,
                             max_shard_size=max_shard_size)

    def side_files(self, plan: MergePlan, out: Path, notes: list[str]) -> dict[str, str]:
        """Index, config.json, generation config, processor and tokenizer files in ``out``."""
        durable = self.durable
        files: dict[str, str] = {}
        name, digest = write_index(plan, out, durable)
        files[name] = digest
        out_dtype = plan.out_dtype if plan.out_dtype != "auto" else _auto_dtype_name(plan)
        cfg = hf_config(self.cfg, self.tower, self.vocab, family=self.family, next_=self.next_,
                        out_dtype=out_dtype)
        files["config.json"] = write_json(out / "config.json", cfg, durable=durable)
        gen_path = self.gen_dir / "generation_config.json"
        if gen_path.is_file():
            gen, note = fixed_generation_config(read_json(gen_path))
            if note:
                notes.append(note)
            gen["pad_token_id"] = self.vocab.pad_token_id
            files["generation_config.json"] = write_json(out / "generation_config.json", gen,
                                                         durable=durable)
        for name, obj in processor_configs(self.cfg, self.tower, next_=self.next_,
                                           template=self.template).items():
            files[name] = write_json(out / name, obj, durable=durable)
        for name, data in tokenizer_files(self.tok_dir, self.vocab, self.template,
                                          next_=self.next_).items():
            files[name] = write_file(out / name, data, durable=durable)
        return files


def prepare_hf(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], *, tok_dir: Path,
               gen_dir: Path, vision_tower: Path | None, relative_to: Path,
               conv_template: str | None, durable: bool = True) -> HfConversion:
    """Resolve the tower, the vocabulary and the chat template (the checks passed already)."""
    res = resolve_tower(vision_tower, cfg.get("mm_vision_tower"), relative_to)
    if res.path is None:
        raise UsageError(f"no vision tower: {res.note}", path=relative_to,
                         hint="pass --vision-tower CLIP_DIR")
    tower = read_tower(res.path)
    emb = shapes.get("model.embed_tokens.weight")
    if not emb or len(emb) != 2:
        raise MergeError("has no 2-d model.embed_tokens.weight", path=relative_to,
                         hint="pass a complete LLaVA model")
    n = tokenizer_length(tok_dir)
    if n != emb[0]:
        raise MergeError(f"the tokenizer has {n} tokens but the embeddings {emb[0]} rows",
                         path=tok_dir, hint="see LD806")
    family = llm_family(cfg)
    template = chat_template(conv_template or default_conv_template(family))
    return HfConversion(cfg=dict(cfg), tower=tower, vocab=Vocab.after(emb[0]), next_=is_next(cfg),
                        family=family, template=template, tok_dir=tok_dir, gen_dir=gen_dir,
                        durable=durable)


def _check_paths(src: Path, out: Path, overwrite: bool, vision_tower: Path | None) -> None:
    if not src.is_dir():
        raise UsageError("is not a directory", path=src,
                         hint="pass the LLaVA checkpoint directory")
    check_out(out, overwrite, ((src, "the LLaVA checkpoint"), (vision_tower, "the vision tower")),
              made="converted model")


def convert(llava_dir: Path | str, out: Path | str, *, vision_tower: Path | str | None = None,
            conv_template: str | None = None, device: str = "auto", dtype: str = "float16",
            max_shard_size: int | float | str = 5e9, overwrite: bool = False,
            verify: bool = True, observer: Observer | None = None, durable: bool = True,
            ) -> MergeResult:
    """Convert an already merged or fully fine-tuned original-LLaVA checkpoint to llava-hf.

    Raises a DoctorError subclass on any failure (UsageError, exit 2, when no vision tower can
    be found; PreflightRefused when the checks find errors), after which ``out`` is untouched.
    """
    from llava_doctor.checks.context import Options
    from llava_doctor.doctor import run_checks

    t0 = time.monotonic()
    src = Path(llava_dir)
    out = Path(out)
    vt = Path(vision_tower) if vision_tower is not None else None
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'", hint=f"choose one of: {', '.join(DTYPES)}")
    if conv_template is not None:
        chat_template(conv_template)  # a usage error before any work
    shard_limit = parse_size(max_shard_size)
    cleanup_stale(out)
    _check_paths(src, out, overwrite, vt)
    kind = classify(src)
    if kind != DirKind.model:
        hint = ("merge it with `llava-doctor merge LORA --to llava-hf`" if kind in
                (DirKind.lora, DirKind.checkpoint) else "pass a LLaVA checkpoint directory")
        raise UsageError(f"is a {kind.value} directory, not a full LLaVA checkpoint", path=src,
                         hint=hint)
    if not (src / "config.json").is_file():
        raise UsageError("has no config.json", path=src,
                         hint="pass the LLaVA checkpoint directory")
    cfg = read_json(src / "config.json")
    if "mm_vision_tower" not in cfg and "mm_projector_type" not in cfg:
        raise UsageError("config.json has no mm_* fields: not an original-LLaVA checkpoint",
                         path=src / "config.json",
                         hint="pass a LLaVA checkpoint (llava-hf ones need no conversion)")

    def emit(**kw: Any) -> None:
        if observer is not None:
            observer(MergeEvent(**kw))

    emit(phase="checks")
    report = run_checks([src], Options(out=out, fast=True, to="llava-hf", vision_tower=vt))
    refuse_on_hf_errors(report)
    errors = [f for f in report.findings if f.severity == Severity.error]
    if errors:
        raise ConversionRefused(report, errors)
    emit(phase="plan")
    md = ModelDir.find(src)
    if md is None:
        raise MergeError("has no weights", path=src,
                         hint="pass a directory with model*.safetensors or pytorch_model*.bin")
    plan = plan_model_dir(md, dtype=dtype, max_shard_size=shard_limit)
    hf = prepare_hf(cfg, {t.name: t.shape for t in plan.tensors}, tok_dir=src, gen_dir=src,
                    vision_tower=vt, relative_to=src, conv_template=conv_template,
                    durable=durable)
    plan = hf.plan(plan, shard_limit)
    notes = list(plan.notes)
    files, checked = write_verified(plan, out, dev, hf.side_files, notes, observer=observer,
                                    durable=durable, verify=verify)
    warnings = tuple(f for f in report.findings if f.severity != Severity.info)
    result = MergeResult(
        out=out, files=files, shards=len(plan.shards), tensors=len(plan.tensors),
        tensors_merged=0, lora_modules=0, replaced=0, projector_source=plan.projector_source,
        dtype=dtype if dtype != "auto" else _auto_dtype_name(plan), device=dev,
        total_size=plan.total_size, seconds=time.monotonic() - t0, peak_rss_bytes=_peak_rss(),
        verified=checked, notes=tuple(notes), warnings=warnings)
    emit(phase="done", done=result.tensors, total=result.tensors)
    return result
