"""LD6xx: will the merge fit on this machine? Headers only: sizes come from shapes and dtypes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llava_doctor.artifacts.configs import TOKENIZER_FILES
from llava_doctor.artifacts.discovery import Family
from llava_doctor.artifacts.llava import builder_rewrite
from llava_doctor.artifacts.tensors import FLOAT_DTYPES, TensorInfo
from llava_doctor.checks.base import BOTH, Hit, Skip, check
from llava_doctor.checks.context import Context
from llava_doctor.models import Severity

# The merge writes float16 unless told otherwise (what LLaVA's merge writes too).
OUTPUT_ITEMSIZE = 2
# F29: keep 10% headroom for the index, shard headers and what the estimate leaves out.
HEADROOM = 1.10


def _gb(n: float) -> str:
    """Bytes in the unit that keeps 3-4 significant digits (tiny fixtures and 13B alike)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} bytes"


def _out_bytes(info: TensorInfo) -> int:
    """A tensor's size in the merged output: floats in float16, everything else as stored."""
    return info.numel * OUTPUT_ITEMSIZE if info.dtype in FLOAT_DTYPES else info.nbytes


@dataclass(frozen=True)
class SizePlan:
    """What a merge of this target reads and writes, from headers."""

    base_out: int            # base tensors in the output dtype
    extra_out: int           # non-LoRA tensors the base lacks (projector, image_newline), fp16
    extra_from: str          # where those come from, for the message
    other_files: int         # tokenizer and config files copied along
    largest: TensorInfo | None
    adapter: int             # adapter bytes as stored
    non_lora: int            # non_lora_trainables / stage-1 projector bytes as stored
    base_tensors: int

    @property
    def output(self) -> int:
        return self.base_out + self.extra_out + self.other_files


def size_plan(ctx: Context) -> SizePlan | None:
    """Sizes of the merge's inputs and output, or None without a readable base."""
    base = ctx.base
    if base is None:
        return None
    infos = [info for _, info in base.tensors.values()]
    if not infos:
        return None
    names = set(base.tensors)
    base_out = sum(_out_bytes(i) for i in infos)
    largest = max(infos, key=lambda i: i.numel)
    extra_out, sources = 0, []
    nl = ctx.non_lora
    if nl is not None:
        # The merge writes the non-LoRA trainables under the names LLaVA's rewrite gives them;
        # those the base already has replace a tensor, the others add to the output.
        new = [nl.tensors[k] for k, v in builder_rewrite(nl.tensors).items() if v not in names]
        if new:
            extra_out += sum(_out_bytes(i) for i in new)
            sources.append(f"{len(new)} tensor(s) of {nl.path.name}")
    has_projector = any(".mm_projector." in n for n in names) or (
        nl is not None and any("mm_projector" in k for k in nl.tensors))
    pre = ctx.projector
    if not has_projector and pre is not None:
        extra_out += sum(_out_bytes(i) for i in pre.tensors.values())
        sources.append(f"the stage-1 projector {pre.path}")
    other = 0
    for name in (*TOKENIZER_FILES, "generation_config.json", "config.json"):
        p = base.path / name
        if p.is_file():
            other += p.stat().st_size
    adapter = ctx.adapter.size if ctx.adapter is not None else 0
    projector_bytes = (nl.size if nl is not None else 0) + (
        pre.size if pre is not None and not has_projector else 0)
    return SizePlan(base_out=base_out, extra_out=extra_out,
                    extra_from=", ".join(sources) or "nothing beyond the base",
                    other_files=other, largest=largest, adapter=adapter,
                    non_lora=projector_bytes, base_tensors=len(infos))


def existing_ancestor(path: Path) -> Path:
    """The nearest directory at or above ``path`` that exists (where the output will live)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p if p.is_dir() else p.parent


@check("LD601", "disk-space", Severity.error, families=BOTH)
def disk_space(ctx: Context) -> Iterable[Hit]:
    """The merge target's filesystem has less free space than the merged model needs.

    ## What it does
    With `--out DIR` (and always in `merge`), estimates the merged output from the headers:
    every base tensor in float16 (the merge's default dtype), plus the non-LoRA tensors the base
    lacks (projector, `image_newline`), plus tokenizer and config files; and compares it with
    the free space (`shutil.disk_usage`) of the nearest existing folder of DIR. Error below the
    estimate, warning below 1.1x the estimate.

    ## Why is this bad?
    A 7B merge writes about 13.5 GB, a 13B one about 26 GB. Running out of space midway leaves
    a partial output (failure mode F29), often after many minutes of loading.

    ## Example
    `llava-doctor check RUN --base vicuna-13b-v1.5 --out /tmp/merged` on a 20 GB `/tmp`.

    ## Fix
    None automatic: free space, or choose an `--out` on another filesystem.
    """
    out = ctx.options.out
    if out is None:
        raise Skip("no --out given: nothing to check the free space of")
    plan = size_plan(ctx)
    if plan is None:
        raise Skip("no readable base model: the merged size cannot be estimated")
    where = existing_ancestor(Path(out))
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        raise Skip(f"cannot read the free space of {where} ({e.strerror})") from None
    need = plan.output
    if free >= need * HEADROOM:
        return
    estimate = (f"estimated from the headers: {plan.base_tensors} base tensors in float16 = "
                f"{_gb(plan.base_out)}, plus {_gb(plan.extra_out)} from {plan.extra_from}, plus "
                f"{plan.other_files:,} bytes of tokenizer/config files")
    evidence = {"out": str(out), "checked_at": str(where), "free_bytes": free,
                "estimated_bytes": need, "base_bytes": plan.base_out,
                "extra_bytes": plan.extra_out, "headroom": HEADROOM}
    if free < need:
        yield Hit(f"{where} has {_gb(free)} free but the merged model written to {out} needs "
                  f"about {_gb(need)} ({estimate}); the merge would run out of space and leave a "
                  "partial output. Free space or choose an --out on another filesystem",
                  path=Path(out), evidence=evidence)
        return
    yield Hit(f"{where} has {_gb(free)} free, only {free / need:.2f}x the {_gb(need)} the "
              f"merged model written to {out} needs ({estimate}); keep at least "
              f"{_gb(need * HEADROOM)} free to leave room for the index and anything the "
              "estimate leaves out", path=Path(out), evidence=evidence,
              severity=Severity.warning)


def memory_info() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes from /proc/meminfo, else sysconf; None where unknown."""
    total = avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if not parts:
                    continue
                value = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
                if key == "MemTotal":
                    total = value
                elif key == "MemAvailable":
                    avail = value
    except (OSError, ValueError):
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            total = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    return total, avail


# The merge each family's users run otherwise (both load the whole model, then merge in place).
_THEIR_MERGE = {Family.llava: "LLaVA's merge_lora_weights.py",
                Family.llava_hf: "peft's merge (PeftModel.from_pretrained + merge_and_unload)"}


@check("LD602", "memory-plan", Severity.info, families=BOTH)
def memory_plan(ctx: Context) -> Iterable[Hit]:
    """How much RAM LLaVA's own merge would need here, and how much the streaming merge needs.

    ## What it does
    From the headers: LLaVA's `merge_lora_weights.py` materialises the whole model in float16
    and peft's merge works on it in place, with transient copies, so it needs about twice the
    float16 model plus the adapter and projector. `llava-doctor merge` streams one tensor at a
    time: the largest tensor (as float32) plus the adapter and projector. Both are compared with
    this machine's total and available RAM (`/proc/meminfo`).

    ## Why is this bad?
    CPU merges of 13B models are routinely OOM-killed (failure mode F29), leaving a merged
    folder with only `config.json` or missing shards.

    ## Example
    A 13B merge (about 26 GB in float16, so about 53 GB for LLaVA's script) on a 32 GB machine.

    ## Fix
    None: informational. Use `llava-doctor merge`, or a machine with more RAM for LLaVA's script.
    """
    plan = size_plan(ctx)
    if plan is None:
        raise Skip("no readable base model: the model size cannot be estimated")
    fp16_model = plan.base_out + plan.extra_out
    llava_need = 2 * fp16_model + plan.adapter + plan.non_lora
    largest = plan.largest
    stream_need = (largest.numel * 4 if largest is not None else 0) + plan.adapter + plan.non_lora
    total, avail = memory_info()
    here = []
    if total is not None:
        here.append(f"{_gb(total)} total")
    if avail is not None:
        here.append(f"{_gb(avail)} available")
    machine = f"this machine has {' and '.join(here)}" if here else \
        "this machine's RAM could not be read"
    room = avail if avail is not None else total
    verdict = ""
    if room is not None:
        verdict = (" (fits)" if llava_need <= room else
                   " (more than is available: expect it to be OOM-killed)")
    big = f" ('{largest.name}', {_gb(largest.numel * 4)} as float32)" if largest else ""
    yield Hit(f"{_THEIR_MERGE[ctx.family]} would need about {_gb(llava_need)} of RAM (2 x the "
              f"{_gb(fp16_model)} float16 model + {_gb(plan.adapter)} adapter + "
              f"{_gb(plan.non_lora)} projector){verdict}; {machine}. `llava-doctor merge` streams "
              f"one tensor at a time and needs about {_gb(stream_need)}: the largest tensor{big} "
              "plus the adapter and projector", path=ctx.base_path,
              evidence={"llava_merge_bytes": llava_need, "streaming_merge_bytes": stream_need,
                        "fp16_model_bytes": fp16_model, "adapter_bytes": plan.adapter,
                        "projector_bytes": plan.non_lora, "ram_total_bytes": total,
                        "ram_available_bytes": avail,
                        "largest_tensor": largest.name if largest else None})
