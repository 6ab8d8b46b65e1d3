"""Classify a path from the files it holds, never from its name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
PROJECTOR = "mm_projector.bin"
TRAINER_MARKERS = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt",
                   "rng_state.pth", "latest", "zero_to_fp32.py")
STATE_DIR = ".llava-doctor"


class DirKind(str, Enum):
    lora = "lora-output"          # final LoRA output dir (adapter + LLaVA extras)
    checkpoint = "checkpoint"     # HF Trainer's intermediate checkpoint-N of a LoRA run
    lora_partial = "lora-partial"  # LoRA leftovers without an adapter (only non_lora_trainables)
    pretrain = "pretrain"         # stage-1 output: mm_projector.bin
    model = "model"               # a full model (base LLM, LLaVA checkpoint or merged output)
    missing = "missing"
    not_a_dir = "not-a-directory"
    unknown = "unknown"


def _names(path: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(path) if e.name != STATE_DIR}
    except OSError:
        return set()


def has_model_weights(names: set[str]) -> bool:
    return any(n in names for n in ("model.safetensors", "model.safetensors.index.json",
                                    "pytorch_model.bin", "pytorch_model.bin.index.json"))


def classify(path: Path | str) -> DirKind:
    """What kind of artifact directory ``path`` is, judged by its files."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return DirKind.missing
    if not path.is_dir():
        return DirKind.not_a_dir
    names = _names(path)
    has_adapter = "adapter_config.json" in names or any(n in names for n in ADAPTER_WEIGHTS)
    if has_adapter:
        trainer = any(n in names for n in TRAINER_MARKERS) or any(
            n.startswith(("global_step", "rng_state")) for n in names)
        if trainer and NON_LORA not in names and "config.json" not in names:
            return DirKind.checkpoint
        return DirKind.lora
    if NON_LORA in names:
        return DirKind.lora_partial
    if PROJECTOR in names:
        return DirKind.pretrain
    if has_model_weights(names):
        return DirKind.model
    return DirKind.unknown


LORA_KINDS = frozenset({DirKind.lora, DirKind.checkpoint, DirKind.lora_partial})


def find_lora_dirs(root: Path | str, max_depth: int = 6) -> Iterator[Path]:
    """Every LoRA output dir or checkpoint under a training root (sorted, no symlink loops)."""
    root = Path(root)
    seen: set[tuple[int, int]] = set()

    def walk(d: Path, depth: int) -> Iterator[Path]:
        try:
            st = d.stat()
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        kind = classify(d)
        if kind in LORA_KINDS:
            yield d
        if depth >= max_depth:
            return
        try:
            subs = sorted(e.path for e in os.scandir(d)
                          if e.is_dir() and e.name != STATE_DIR and not e.name.startswith("."))
        except OSError:
            return
        for s in subs:
            yield from walk(Path(s), depth + 1)

    yield from walk(root, 0)
