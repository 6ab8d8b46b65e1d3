"""LD106: give LLaVA's loader a name it dispatches to its LoRA branch, by a sibling symlink."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from llava_doctor.artifacts.llava import builder_branch, get_model_name_from_path
from llava_doctor.fixes.registry import (
    AlreadyDone,
    CannotFix,
    NothingToDo,
    Outcome,
    PlanInput,
    Proposal,
    planner,
)
from llava_doctor.models import FixSafety

_CKPT = re.compile(r"^checkpoint-\d+$")


def lora_branch_ok(name: str) -> bool:
    """True when `load_pretrained_model` takes the LoRA branch (and no MPT class) for `name`."""
    low = name.lower()
    return builder_branch(name) == "lora" and "mpt" not in low


def _defuse_mpt(name: str) -> str:
    # "prompt"/"attempt" contain "mpt", which sends LLaVA down its MPT code paths.
    return re.sub("mpt", "m-pt", name, flags=re.IGNORECASE)


def link_name_for(path: Path) -> str:
    """A sibling name for `path` containing `llava` and `lora`, without `mpt`."""
    stem = f"{path.parent.name}-{path.name}" if _CKPT.match(path.name) else path.name
    stem = _defuse_mpt(stem.strip(".") or "run")
    low = stem.lower()
    if "llava" not in low:
        stem = f"llava-{stem}"
    if "lora" not in low:
        stem = f"{stem}-lora"
    if stem.lower().startswith("checkpoint-"):
        stem = f"llava-{stem}"  # a name starting with checkpoint- would be joined to its parent's
    return stem


def merged_name_for(link_name: str) -> str:
    """An output name LLaVA later loads as a full LLaVA model: `llava`, no `lora`, no `mpt`."""
    name = re.sub(r"[-_]?lora", "", link_name, flags=re.IGNORECASE).strip("-_") or "llava"
    if "llava" not in name.lower():
        name = f"llava-{name}"
    return f"{name}-merged"


def merge_command(link: Path, base: str, out: Path) -> str:
    """The exact LLaVA merge command for a LoRA dir reached through `link`."""
    return (f"python scripts/merge_lora_weights.py --model-path {shlex.quote(str(link))} "
            f"--model-base {shlex.quote(base)} --save-model-path {shlex.quote(str(out))}")


def _base_arg(pi: PlanInput) -> str:
    if pi.ctx.base_path is not None:
        return str(pi.ctx.base_path)
    ac = pi.ctx.adapter_config
    if ac is not None and ac.base_model_name_or_path:
        return ac.base_model_name_or_path
    return "BASE_MODEL"


@planner("LD106")
def fix_loader_name(pi: PlanInput) -> Outcome:
    """A sibling symlink named with `llava` and `lora`, and the merge command that uses it."""
    path = Path(os.path.abspath(pi.ctx.path))
    if lora_branch_ok(get_model_name_from_path(str(path))):
        return NothingToDo(f"LLaVA already takes its LoRA branch for {path.name}")
    parent = path.parent
    base = _base_arg(pi)
    first = link_name_for(path)
    candidates = [first] + [f"{first}-{n}" for n in range(2, 10)]
    for name in candidates:
        link = parent / name
        if not lora_branch_ok(get_model_name_from_path(str(link))):
            continue
        out = parent / merged_name_for(name)
        note = f"merge with: {merge_command(link, base, out)}"
        if link.is_symlink() and os.path.realpath(link) == os.path.realpath(path):
            return AlreadyDone(f"the symlink {link} -> {path.name} exists; LLaVA's loader takes "
                               "its LoRA branch through it (the directory's own name is "
                               "unchanged, so check reports LD106 as info naming the link)",
                               notes=(note,))
        if os.path.lexists(link) or pi.ws.is_pending(link):
            continue
        rel = os.path.relpath(link, path)
        return Proposal(
            title=f"create the symlink {link} -> {path.name}: LLaVA names it "
                  f"'{get_model_name_from_path(str(link))}' and takes its LoRA branch",
            safety=FixSafety.safe, files=(rel,), notes=(note,),
            edit=lambda w, lk=link, t=path.name: w.symlink(lk, t))  # type: ignore[misc]
    return CannotFix(f"every candidate name beside {path} ({first}, {first}-2, ...) is taken; "
                     "create a symlink whose name contains 'llava' and 'lora' yourself")
