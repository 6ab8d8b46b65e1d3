"""The key layouts of transformers' llava-hf models (Llava, LlavaNext, LlavaOnevision), in one
table: every check and the merge convert keys through here, and nowhere else.

A llava-hf model has five parts; each layout spells each part's prefix its own way:

- ``canonical``: hub checkpoints, the conversion scripts, transformers < 4.52 (`save_pretrained`
  and module names): `language_model.model`, `language_model.lm_head`,
  `vision_tower.vision_model`, `multi_modal_projector`, `image_newline`;
- ``runtime-4.52``: module names of transformers 4.52 ... 4.x: `model.language_model`,
  `lm_head`, `model.vision_tower.vision_model`, `model.multi_modal_projector`,
  `model.image_newline`;
- ``runtime-5``: module names of transformers >= 5: as runtime-4.52, but the tower is
  `model.vision_tower` (CLIP's `vision_model.` level is gone);
- ``saved-5``: what transformers 5.x `save_pretrained` writes: canonical, but the tower is
  `vision_tower` without `vision_model.`.

Checkpoint keys are parameter names in one of these layouts. peft adapter keys are
``base_model.model.`` + the module path of the transformers that trained the adapter (canonical
before 4.52, runtime after) + peft's suffix (`.lora_A.weight`, ...).

API (keys are plain strings, with or without a parameter suffix):

- ``to_canonical(key, layout)`` / ``to_layout(key, layout)``: canonical <-> another layout;
  ``convert(key, src, dst)`` both at once. A key that belongs to no part is returned unchanged.
- ``key_layout(key)``: the most specific layout one key is spelled in (None: no llava-hf part);
  ``detect_layout(keys)``: the layout of a checkpoint's keys; ``detect_adapter_layout(keys)``:
  the same for peft adapter keys (the prefix is stripped).
- ``runtime_layout(version)``: the module names a transformers version gives the model;
  ``checkpoint_readable(layout, version)``: whether that version loads such a checkpoint.

Only call these on llava-hf models: `lm_head.weight` of a plain Llama reads as runtime-layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

__all__ = ["Layout", "Part", "TABLE", "CANONICAL_ORDER", "to_canonical", "to_layout", "convert",
           "split", "key_layout", "detect_layout", "detect_adapter_layout", "runtime_layout",
           "checkpoint_readable", "parse_version", "PEFT_PREFIX", "RUNTIME_FROM",
           "NO_VISION_MODEL_FROM", "adapter_fate", "Fate", "ORIGINAL_LLAVA",
           "to_original_llava"]

PEFT_PREFIX = "base_model.model."
# transformers PR #37033: the runtime module names change in 4.52.
RUNTIME_FROM = (4, 52, 0)
# transformers 5 drops CLIP's `vision_model.` level at run time (and when saving).
NO_VISION_MODEL_FROM = (5, 0, 0)


class Layout(str, Enum):
    canonical = "canonical"
    runtime_4 = "runtime-4.52"
    runtime_5 = "runtime-5"
    saved_5 = "saved-5"


class Part(str, Enum):
    language_model = "language model"
    lm_head = "lm head"
    vision_tower = "vision tower"
    projector = "projector"
    image_newline = "image_newline"


TABLE: dict[Layout, dict[Part, str]] = {
    Layout.canonical: {Part.language_model: "language_model.model",
                       Part.lm_head: "language_model.lm_head",
                       Part.vision_tower: "vision_tower.vision_model",
                       Part.projector: "multi_modal_projector",
                       Part.image_newline: "image_newline"},
    Layout.runtime_4: {Part.language_model: "model.language_model",
                       Part.lm_head: "lm_head",
                       Part.vision_tower: "model.vision_tower.vision_model",
                       Part.projector: "model.multi_modal_projector",
                       Part.image_newline: "model.image_newline"},
    Layout.runtime_5: {Part.language_model: "model.language_model",
                       Part.lm_head: "lm_head",
                       Part.vision_tower: "model.vision_tower",
                       Part.projector: "model.multi_modal_projector",
                       Part.image_newline: "model.image_newline"},
    Layout.saved_5: {Part.language_model: "language_model.model",
                     Part.lm_head: "language_model.lm_head",
                     Part.vision_tower: "vision_tower",
                     Part.projector: "multi_modal_projector",
                     Part.image_newline: "image_newline"},
}
# The language model's prefixes in original LLaVA's module names (LlavaLlamaForCausalLM keeps
# Llama's `model.*` and `lm_head`); its vision tower and projector have no prefix-only mapping.
ORIGINAL_LLAVA: dict[Part, str] = {Part.language_model: "model", Part.lm_head: "lm_head"}
# The order the merge writes the parts in (the conversion scripts' order).
CANONICAL_ORDER = (Part.language_model, Part.lm_head, Part.vision_tower, Part.projector,
                   Part.image_newline)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def split(key: str, layout: Layout) -> tuple[Part, str] | None:
    """The part ``key`` belongs to in ``layout`` and the rest after the part's prefix (``""`` or
    starting with "."); None when it belongs to no part. The longest prefix wins, so that
    `vision_tower.vision_model.x` is not read as saved-5's `vision_tower` + `.vision_model.x`
    in a layout that has both spellings' prefixes."""
    best: tuple[Part, str] | None = None
    best_len = -1
    for part, prefix in TABLE[layout].items():
        if _under(key, prefix) and len(prefix) > best_len:
            best, best_len = (part, key[len(prefix):]), len(prefix)
    return best


def convert(key: str, src: Layout, dst: Layout) -> str:
    """``key`` spelled in ``src`` re-spelled in ``dst`` (unchanged when in no part)."""
    if src == dst:
        return key
    hit = split(key, src)
    if hit is None:
        return key
    part, rest = hit
    return TABLE[dst][part] + rest


def to_canonical(key: str, layout: Layout) -> str:
    """A key of ``layout`` in the canonical on-disk layout."""
    return convert(key, layout, Layout.canonical)


def to_layout(key: str, layout: Layout) -> str:
    """A canonical key in ``layout``."""
    return convert(key, Layout.canonical, layout)


def to_original_llava(key: str, layout: Layout) -> str | None:
    """A language-model key of ``layout`` in original LLaVA's names (None: no such mapping)."""
    hit = split(key, layout)
    if hit is None or hit[0] not in ORIGINAL_LLAVA:
        return None
    return ORIGINAL_LLAVA[hit[0]] + hit[1]


def key_layout(key: str) -> Layout | None:
    """The most specific layout a single key is spelled in.

    Keys of parts spelled alike in two layouts get the older one: a language-model key
    `model.language_model.x` is runtime-4.52 (runtime-5 spells it the same), a projector key
    `multi_modal_projector.x` is canonical (saved-5 too). Only vision-tower keys tell 4.52 from
    5 and canonical from saved-5.
    """
    for layout in (Layout.runtime_4, Layout.runtime_5, Layout.canonical, Layout.saved_5):
        hit = split(key, layout)
        if hit is None:
            continue
        part, rest = hit
        if part == Part.vision_tower and layout in (Layout.runtime_5, Layout.saved_5) and \
                _under(rest[1:], "vision_model"):
            continue  # longer spelling belongs to the layout that has it
        return layout
    return None


_RANK = {Layout.runtime_5: 4, Layout.runtime_4: 3, Layout.saved_5: 2, Layout.canonical: 1}


def detect_layout(keys: Iterable[str]) -> Layout | None:
    """The layout of a checkpoint's keys: the most specific any key shows (runtime over on-disk;
    among those, a vision key without `vision_model.` means 5.x). None: no llava-hf key."""
    found = {lay for k in keys if (lay := key_layout(k)) is not None}
    return max(found, key=lambda lay: _RANK[lay]) if found else None


def detect_adapter_layout(keys: Iterable[str]) -> Layout | None:
    """The layout of a peft adapter's module paths (``base_model.model.`` stripped). Adapters
    carry the training transformers' module names, so the answer is canonical (< 4.52),
    runtime-4.52 or runtime-5; None when no key is a llava-hf module path."""
    mods = [k[len(PEFT_PREFIX):] for k in keys if k.startswith(PEFT_PREFIX)]
    lay = detect_layout(mods)
    return Layout.canonical if lay == Layout.saved_5 else lay


def parse_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of '4.46.3', '5.0.0rc1', '4.52.0.dev0'; ValueError otherwise."""
    import re

    m = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", version or "")
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


def runtime_layout(version: str | None) -> Layout | None:
    """The module names transformers ``version`` gives a llava-hf model (None: unknown)."""
    if not version:
        return None
    try:
        v = parse_version(version)
    except ValueError:
        return None
    if v < RUNTIME_FROM:
        return Layout.canonical
    return Layout.runtime_4 if v < NO_VISION_MODEL_FROM else Layout.runtime_5


def checkpoint_readable(layout: Layout, version: str) -> bool:
    """Whether transformers ``version`` loads a checkpoint in ``layout`` with every key placed.

    < 4.52 reads the canonical layout only (runtime keys are all missing; saved-5's
    `vision_tower.*` leaves a randomly initialised tower, with only a warning); 4.52 ... 4.x
    maps canonical keys onto its runtime names and reads runtime-4.52 itself; 5.x reads all
    four (measured with 5.24).
    """
    v = parse_version(version)
    if v < RUNTIME_FROM:
        return layout == Layout.canonical
    if v < NO_VISION_MODEL_FROM:
        return layout in (Layout.canonical, Layout.runtime_4)
    return True


class Fate(str, Enum):
    """What transformers + peft of a given version do with an adapter tensor."""

    applied = "applied"
    dropped = "dropped"   # matches no module: peft drops it silently, the LoRA is not applied
    crash = "crash"       # peft fails loading it (KeyError)


def adapter_fate(module: str, layout: Layout, version: str, *, full: bool) -> Fate:
    """What transformers ``version`` (with the peft of its time) does with an adapter tensor of
    ``module`` (a module path in ``layout``, the trainer's naming); ``full``: a whole tensor
    (`modules_to_save`, a trained bias) rather than a LoRA factor.

    Keys spelled as the loading model names its modules are applied. Newer peft converts
    pre-4.52 (canonical) keys to the >= 4.52 names (peft #2574, transformers #38627); measured
    with peft 0.21.2 + transformers 5.24 on adapters saved by 4.46.3: language-model and
    vision-tower LoRA are converted, projector LoRA is not (silently not applied: an
    `all-linear` adapter merges wrong), and a `modules_to_save` projector crashes the load
    (`KeyError: 'base_model.model.model.multi_modal_projector.linear_1.weight'`); full copies
    outside the language model are taken to fail the same way. Nothing converts newer keys for
    an older transformers: they match no module and are dropped.
    """
    runs = runtime_layout(version)
    hit = split(module, layout)
    if runs is None or hit is None or convert(module, layout, runs) == module:
        return Fate.applied
    part = hit[0]
    if runs == Layout.canonical:
        return Fate.dropped
    if part in (Part.language_model, Part.lm_head):
        return Fate.applied
    if layout in (Layout.canonical, Layout.saved_5):
        if runs == Layout.runtime_4:
            return Fate.applied
        if full:
            return Fate.crash
        return Fate.applied if part == Part.vision_tower else Fate.dropped
    if layout == Layout.runtime_4 and runs == Layout.runtime_5:
        return Fate.applied  # 5.x drops CLIP's `vision_model.` level on load, as for checkpoints
    return Fate.dropped  # runtime-5 keys lack `vision_model.`, which 4.52 ... 4.x needs
