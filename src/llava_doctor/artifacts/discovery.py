"""Classify a path from the files it holds, never from its name."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

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


class Family(str, Enum):
    """Which model family a run or a base belongs to, judged by its files.

    ``llava``: haotian-liu/LLaVA (`LlavaLlamaForCausalLM`, `mm_*` config fields,
    `non_lora_trainables.bin`). ``llava-hf``: transformers' `LlavaForConditionalGeneration` /
    `LlavaNextForConditionalGeneration` / `LlavaOnevisionForConditionalGeneration`
    (`text_config` + `vision_config`). ``llm``: a plain language model (bases only).
    """

    llava = "llava"
    llava_hf = "llava-hf"
    llm = "llm"


HF_ARCHITECTURES = frozenset({"LlavaForConditionalGeneration",
                              "LlavaNextForConditionalGeneration",
                              "LlavaOnevisionForConditionalGeneration"})
HF_MODEL_TYPES = frozenset({"llava", "llava_next", "llava_onevision"})
# Module-path segments only llava-hf models have (any transformers version's naming).
_HF_SEGMENTS = re.compile(r"(^|\.)(language_model\.model|model\.language_model|"
                          r"multi_modal_projector|language_model\.lm_head)(\.|$)")


def config_family(cfg: dict[str, Any]) -> Family:
    """The family a `config.json` describes: `text_config`/`vision_config` (llava-hf) versus
    `mm_*` fields or a `Llava*ForCausalLM` architecture (original LLaVA), else a plain LLM.

    The original LLaVA also wrote `model_type: "llava"` for a while, so the model type alone
    decides nothing.
    """
    arch = [str(a) for a in cfg.get("architectures") or []]
    if isinstance(cfg.get("text_config"), dict) and isinstance(cfg.get("vision_config"), dict):
        return Family.llava_hf
    if any(a in HF_ARCHITECTURES for a in arch):
        return Family.llava_hf
    if cfg.get("mm_vision_tower") is not None or cfg.get("mm_projector_type") is not None or any(
            a.startswith("Llava") and a.endswith("ForCausalLM") for a in arch):
        return Family.llava
    return Family.llm


def adapter_family(adapter_config: dict[str, Any] | None, keys: Iterable[str]) -> Family | None:
    """llava-hf when the adapter names a llava-hf class or its keys/targets use llava-hf module
    paths; None when nothing says so (the caller decides the default)."""
    acfg = adapter_config or {}
    auto = acfg.get("auto_mapping")
    if isinstance(auto, dict) and auto.get("base_model_class") in HF_ARCHITECTURES:
        return Family.llava_hf
    prefix = "base_model.model."
    for k in keys:
        if k.startswith(prefix) and _HF_SEGMENTS.search(k[len(prefix):]):
            return Family.llava_hf
        if k.startswith(prefix + "vision_tower.vision_model.") or \
                k.startswith(prefix + "model.vision_tower.vision_model."):
            return Family.llava_hf  # original LLaVA nests it: model.vision_tower.vision_tower.
    targets = acfg.get("target_modules")
    texts = [targets] if isinstance(targets, str) else (
        [str(t) for t in targets] if isinstance(targets, list) else [])
    texts += [str(m) for m in acfg.get("modules_to_save") or []]
    if any("multi_modal_projector" in t or "language_model" in t for t in texts):
        return Family.llava_hf
    return None


def lora_family(path: Path | str, adapter_keys: Iterable[str] = ()) -> Family:
    """The family of a LoRA dir: original LLaVA unless its files say llava-hf.

    Looked at, in order: `non_lora_trainables.bin` or an `mm_*` `config.json` (original);
    a llava-hf `config.json`; `adapter_config.json` (`auto_mapping`, llava-hf module names in
    `target_modules`/`modules_to_save`); the adapter's key paths (``adapter_keys``).
    """
    from llava_doctor.artifacts.configs import read_json
    from llava_doctor.errors import DoctorError

    path = Path(path)
    names = _names(path)
    if NON_LORA in names:
        return Family.llava
    if "config.json" in names:
        try:
            fam = config_family(read_json(path / "config.json"))
        except DoctorError:
            fam = Family.llm
        if fam != Family.llm:
            return fam
    acfg: dict[str, Any] | None = None
    if "adapter_config.json" in names:
        try:
            acfg = read_json(path / "adapter_config.json")
        except DoctorError:
            acfg = None
    return adapter_family(acfg, adapter_keys) or Family.llava


def base_family(cfg: dict[str, Any] | None, tensor_names: Iterable[str] = ()) -> Family | None:
    """llava-hf base, original-LLaVA base or plain LLM, from its config.json (and, for an
    original LLaVA checkpoint without `mm_*` fields, its `model.mm_projector.*` weights)."""
    if cfg is None:
        return None
    fam = config_family(cfg)
    if fam == Family.llm and any(n.startswith("model.mm_projector.") for n in tensor_names):
        return Family.llava
    return fam


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
