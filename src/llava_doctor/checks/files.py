"""LD5xx: file integrity. These run after every other check so they see every read error."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from llava_doctor.artifacts.configs import read_json
from llava_doctor.artifacts.discovery import PROJECTOR
from llava_doctor.artifacts.tensor_stats import FP16_MAX
from llava_doctor.artifacts.tensors import FLOAT_DTYPES
from llava_doctor.checks.base import BOTH, Hit, Skip, by_consumer, check
from llava_doctor.checks.context import Context
from llava_doctor.errors import FileCorruptError, LfsPointerError, UnsafePickleError
from llava_doctor.models import Consumer, Severity

JSON_FILES = ("config.json", "adapter_config.json", "generation_config.json")


def read_everything(ctx: Context) -> None:
    """Read every header this target involves, so that each broken file is recorded once."""
    for name in JSON_FILES:
        ctx._read(ctx.file(name), read_json)
    # The typed views also validate field types and declared sizes.
    _ = ctx.config, ctx.adapter_config
    for p in [*ctx.adapter_paths, ctx.non_lora_path, ctx.file(PROJECTOR),
              ctx.projector_resolved.path]:
        ctx.weight(p)
    _ = ctx.base_config
    base = ctx.base
    if base is not None:
        for prob in base.problems:
            if prob.kind == "unreadable-shard" and prob.error is not None:
                ctx.file_errors.setdefault(prob.path, prob.error)


def unread_by(ctx: Context, path: Path) -> dict[Consumer, str]:
    """The consumers whose merge never reads (or safely ignores) `path`, each with why.

    From LLaVA's LoRA branch (failure-modes.md §0): it reads the LoRA dir's config.json with its
    own class and passes it to `from_pretrained(model_base, config=...)`, so the base's
    config.json is never parsed; the generation config comes from the base; peft opens
    adapter_model.safetensors before the .bin; the stage-1 projector is not an input of the
    merge. `llava-doctor merge` reads the base's config.json and generation config itself and
    the stage-1 projector only when no projector reaches the model otherwise. peft reads the
    adapter and the base, nothing LLaVA adds.
    """
    out: dict[Consumer, str] = {}
    every = (Consumer.llava, Consumer.llava_doctor, Consumer.peft)
    lora, base = ctx.path, ctx.base_path
    stale = [p for p in ctx.adapter_paths if p != ctx.adapter_path]
    stage1 = ctx.projector_resolved.path
    if path == lora / "generation_config.json":
        for c in every:
            out[c] = "the merge takes the generation config from the base, not the LoRA dir"
    elif path in stale:
        used = ctx.adapter_path.name if ctx.adapter_path else "the safetensors adapter"
        for c in every:
            out[c] = f"peft (and llava-doctor merge) load {used} and never open the .bin beside it"
    elif path == lora / PROJECTOR or (stage1 is not None and path == stage1):
        out[Consumer.llava] = "LLaVA's LoRA branch never reads the stage-1 projector"
        out[Consumer.peft] = "peft never reads the stage-1 projector"
        out[Consumer.llava_doctor] = ("`llava-doctor merge` reads it only when no projector "
                                      "reaches the model otherwise (LD302 says so then)")
    elif base is not None and path == base / "config.json":
        out[Consumer.llava] = ("LLaVA's LoRA branch passes the LoRA dir's config.json to "
                               "from_pretrained(model_base, config=...) and never parses the "
                               "base's")
    elif base is not None and path == base / "generation_config.json":
        out[Consumer.llava] = ("transformers' from_pretrained catches the OSError of an "
                               "unparseable generation_config.json and builds one from the "
                               "model config, so LLaVA's merge goes on without it")
    elif path in (lora / "config.json", ctx.non_lora_path):
        out[Consumer.peft] = "peft's merge never reads LLaVA's files"
    return out


def _errors(ctx: Context, cls: type) -> list[tuple[Path, object]]:
    read_everything(ctx)
    return sorted(((p, e) for p, e in ctx.file_errors.items() if isinstance(e, cls)),
                  key=lambda pe: str(pe[0]))


@check("LD501", "file-corrupt", Severity.error, needs_lora=False, families=BOTH)
def file_corrupt(ctx: Context) -> Iterable[Hit]:
    """A weight or config file is structurally broken (truncated, bad header, bad zip, bad JSON).

    ## What it does
    Validates every safetensors header with all of safetensors' own rules, walks every torch
    zip/legacy pickle structurally, and parses every JSON config — without reading tensor data.

    ## Why is this bad?
    The merge fails late with `safetensors_rust.SafetensorError: Error while deserializing
    header` or `PytorchStreamReader failed reading zip archive: failed finding central
    directory`, often after minutes of loading.

    An error for each consumer whose merge reads the file; a warning, saying so, for one that
    never reads it: LLaVA's LoRA branch never parses the base's `config.json` (it passes the
    LoRA dir's config to `from_pretrained`), nor the LoRA dir's `generation_config.json`, the
    stage-1 projector or a stale `adapter_model.bin` beside the safetensors file.

    ## Example
    An adapter copied while training was still writing it, or a disk that filled up.

    ## Fix
    None: re-copy or re-download the file.
    """
    for path, err in _errors(ctx, FileCorruptError):
        assert isinstance(err, FileCorruptError)
        unread = unread_by(ctx, path)
        why = unread.get(ctx.consumer)
        note = (f" It does not stop {ctx.consumer.label}: {why}" if why else "")
        yield Hit(f"{err.one_line()}{note}", path=path,
                  severity={c: Severity.warning for c in unread} or None,
                  evidence={"rule": err.rule, **({"tensor": err.tensor} if err.tensor else {}),
                            **({"unread_by": {ctx.consumer.value: why}} if why else {})})


@check("LD502", "unsafe-pickle", Severity.error, needs_lora=False, families=BOTH)
def unsafe_pickle(ctx: Context) -> Iterable[Hit]:
    """A `.bin` pickle references a global that no tensor checkpoint needs. It was not executed.

    ## What it does
    Walks every pickle opcode by opcode against an allowlist (OrderedDict, torch's rebuild
    functions, storage types, `torch.Size`, dtypes) without executing anything.

    ## Why is this bad?
    LLaVA's builder loads `non_lora_trainables.bin` with a plain `torch.load`: a pickle that
    calls `os.system` runs it on your machine during the merge.

    ## Example
    A `non_lora_trainables.bin` downloaded from a stranger whose pickle calls `posix.system`.

    ## Fix
    None: do not load the file; get the weights from a trusted source, preferably safetensors.
    """
    for path, err in _errors(ctx, UnsafePickleError):
        assert isinstance(err, UnsafePickleError)
        yield Hit(err.one_line(), path=path, evidence={"global": err.global_name})


@check("LD503", "dtype-risk", by_consumer(llava=Severity.error, llava_doctor=Severity.warning,
                                         peft=Severity.warning), families=BOTH)
def dtype_risk(ctx: Context) -> Iterable[Hit]:
    """bf16-trained values that do not fit in float16, the dtype LLaVA's merge writes.

    ## What it does
    Reads the adapter, `non_lora_trainables.bin` and the stage-1 projector and looks for finite
    values whose magnitude exceeds float16's maximum (65504). For every LoRA module it also
    bounds the merged delta from the largest magnitudes already scanned:
    `|scaling * B @ A| <= |scaling| * r * max|B| * max|A|` (and `|scaling| * max|lora_B.bias|`),
    and reports a module whose bound exceeds float16's range (an error beyond float32's). Skipped
    with `--fast`.

    ## Why is this bad?
    LLaVA's builder hard-codes float16; such values become `inf` and the merged model produces
    `probability tensor contains either inf, nan or element < 0`. A scaling far above the usual
    `lora_alpha / r` of 0.5-4 does the same to the merged weights. An error for LLaVA's merge;
    `llava-doctor merge` and peft merge in the dtype asked for (warning).

    ## Example
    A projector trained in bf16 whose bias grew past 65504; `"lora_alpha": 1e9` with `r: 8`.

    ## Fix
    None automatic: merge with `llava-doctor merge --dtype bfloat16` (or float32); for a
    scaling, restore `lora_alpha` and `r` from the training run.
    """
    if not ctx.read_values:
        raise Skip("--fast: tensor values are not read")
    yield from _delta_overflow(ctx)
    for wf in (ctx.adapter, ctx.non_lora, ctx.projector):
        if wf is None:
            continue
        stats = ctx.all_stats(wf)
        worst = [(name, st.max_abs) for name, st in stats.items()
                 if wf.tensors[name].dtype in FLOAT_DTYPES and wf.tensors[name].dtype != "F16"
                 and st.overflows_fp16]
        if worst:
            name, mx = max(worst, key=lambda w: w[1])
            yield Hit(f"{wf.path}: {len(worst)} tensor(s) hold values beyond float16's range, "
                      f"e.g. '{name}' reaches {mx:.4g} > 65504; a float16 merge (LLaVA's default) "
                      "turns them into inf. Merge with `llava-doctor merge --dtype bfloat16`",
                      path=wf.path, evidence={"tensors": [w[0] for w in worst[:20]],
                                              "max_abs": mx})


def _delta_overflow(ctx: Context) -> Iterable[Hit]:
    from llava_doctor.checks.adapter import FLOAT32_MAX, delta_bounds

    try:
        bounds = delta_bounds(ctx)
    except Skip:
        return
    risky = sorted((b for b in bounds if b.bound > FP16_MAX), key=lambda b: -b.bound)
    if not risky:
        return
    w = risky[0]
    acfg = ctx.file("adapter_config.json")
    factors = (f"|scaling| {abs(w.scaling):.4g} x rank {w.rank} x max|B| {w.max_b:.4g} x "
               f"max|A| {w.max_a:.4g}" if w.max_a is not None
               else f"|scaling| {abs(w.scaling):.4g} x max|lora_B.bias| {w.max_b:.4g}")
    beyond32 = w.bound > FLOAT32_MAX
    reach = "beyond float32's range too" if beyond32 else "beyond float16's 65504"
    effect = ("even a float32 merge may write inf" if beyond32 else
              "a float16 merge (LLaVA's default) may turn merged weights into inf")
    yield Hit(f"{ctx.adapter.path if ctx.adapter else acfg}: the LoRA delta scaling * B @ A of "
              f"{len(risky)} module(s) can reach up to {w.bound:.4g} ({factors} for "
              f"'{w.module}'), {reach}: {effect}. Check lora_alpha and r in {acfg} against the "
              "training run" + ("" if beyond32 else ", or merge with `llava-doctor merge "
                                "--dtype bfloat16`"),
              path=acfg, severity=Severity.error if beyond32 else None,
              evidence={"modules": {b.module: b.bound for b in risky[:20]}, "count": len(risky),
                        "scaling": w.scaling, "rank": w.rank, "max_b": w.max_b,
                        "max_a": w.max_a, "bound": w.bound})


@check("LD504", "lfs-pointer", Severity.error, needs_lora=False, families=BOTH)
def lfs_pointer(ctx: Context) -> Iterable[Hit]:
    """A weight file is a Git LFS pointer (a ~130-byte text file), not the weights.

    ## What it does
    Looks at the first bytes of every weight and config file for the Git LFS pointer spec line
    `version https://git-lfs.github.com/spec/v1`.

    ## Why is this bad?
    Cloning a model repository without `git lfs` leaves pointers; loaders then fail with
    header or zip errors that do not mention LFS.

    ## Example
    `git clone https://huggingface.co/liuhaotian/llava-v1.5-7b-lora` without git-lfs installed.

    ## Fix
    None automatic: run `git lfs pull` in the repository the files came from.
    """
    for path, err in _errors(ctx, LfsPointerError):
        yield Hit(err.one_line(), path=path)  # type: ignore[attr-defined]
