"""What the fixers re-derive from the files: key renames, projector facts, dims.

Everything is computed from tensor names, shapes and configs with LLaVA's own rules as
`artifacts/llava.py` reproduces them (the same functions the checks use), never parsed out of a
finding's message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llava_doctor.artifacts.llava import (
    LlavaParams,
    builder_rewrite,
    canonical_non_lora_key,
    canonical_param_name,
    expected_projector,
    projector_type_of,
)

PROJ = "model.mm_projector."
NEWLINE = "model.image_newline"
#: LLaVA's `ModelArguments.mm_projector_type` default: what a config without the field builds.
DEFAULT_PROJECTOR_TYPE = "linear"
_LLAVA_HF = re.compile(r"(?:^|\.)multi_modal_projector\.linear_\d+\.")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Canonical prefixes of the multimodal parameters; a rename outside them moves LLM weights.
_MULTIMODAL = tuple(canonical_non_lora_key(p) for p in (PROJ, NEWLINE, "model.vision_resampler.",
                                                        "model.vision_tower."))


def landed(names: Iterable[str], config: Mapping[str, Any] | None) -> dict[str, str]:
    """File key -> model parameter for every key LLaVA's `load_state_dict(strict=False)` loads."""
    params = LlavaParams.from_config(dict(config or {}))
    return {k: v for k, v in builder_rewrite(names).items() if params.accepts(v)}


def landed_projector(names: Iterable[str], config: Mapping[str, Any] | None) -> dict[str, str]:
    """Sub-key relative to `mm_projector.` -> file key, for the projector keys that land."""
    return {v[len(PROJ):]: k for k, v in landed(names, config).items() if v.startswith(PROJ)}


@dataclass(frozen=True)
class Renames:
    """Canonical names for the keys of a `non_lora_trainables.bin` (the LD305 repair)."""

    mapping: dict[str, str]                 # file key -> canonical key (keys that change)
    llm: tuple[str, ...] = ()               # renamed keys that are LLM weights (unsafe)
    conflicts: tuple[str, ...] = ()         # keys that would collide: not renamed
    unmappable: tuple[str, ...] = ()        # dropped keys no rename can save
    dropped: tuple[str, ...] = ()           # keys LLaVA drops as the file is now
    problem: str | None = None              # why the renamed file would still load wrongly
    targets: dict[str, str] = field(default_factory=dict)  # file key -> parameter


def plan_renames(names: Iterable[str], config: Mapping[str, Any] | None) -> Renames:
    """Rename every key to `base_model.model.<parameter>` (LLaVA's own save names), exactly as
    the LD305 check describes, and verify the builder rewrite of the result."""
    names = list(names)
    cfg = dict(config or {})
    params = LlavaParams.from_config(cfg)
    now = landed(names, cfg)
    dropped = [k for k in names if k not in now and ".original_module." not in f".{k}."]
    target: dict[str, str | None] = {}
    for k in names:
        p = canonical_param_name(k)
        target[k] = p if p is not None and params.accepts(p) else None
    declared = cfg.get("mm_projector_type") or DEFAULT_PROJECTOR_TYPE
    hf = [k for k in names if _LLAVA_HF.search(k) and target[k]]
    # llava-hf has only linear_1/linear_2; a single Linear projector is linear_1 -> `weight`.
    if declared == "linear" and hf and all(target[k].startswith(PROJ + "0.") for k in hf):  # type: ignore[union-attr]
        for k in hf:
            target[k] = PROJ + target[k][len(PROJ + "0."):]  # type: ignore[index]
    owners: dict[str, list[str]] = {}
    for k, p in target.items():
        if p is not None:
            owners.setdefault(p, []).append(k)
    conflicts = sorted(k for ks in owners.values() if len(ks) > 1 for k in ks)
    mapping = {k: canonical_non_lora_key(p) for k, p in target.items()
               if p is not None and k not in conflicts and canonical_non_lora_key(p) != k}
    llm = sorted(k for k, c in mapping.items() if not c.startswith(_MULTIMODAL))
    unmappable = sorted(k for k in dropped if target[k] is None)
    problem = None
    if mapping:
        after = [mapping.get(k, k) for k in names]
        loaded = builder_rewrite(after)
        wrong = [(mapping[k], loaded[mapping[k]], target[k]) for k in mapping
                 if loaded[mapping[k]] != target[k]]
        if wrong:
            c, got, want = wrong[0]
            problem = (f"LLaVA's builder would load '{c}' as '{got}', not '{want}' (the other "
                       "keys of the file change its prefix stripping)")
    return Renames(mapping=mapping, llm=tuple(llm), conflicts=tuple(conflicts),
                   unmappable=tuple(unmappable), dropped=tuple(dropped), problem=problem,
                   targets={k: p for k, p in target.items() if p is not None})


@dataclass(frozen=True)
class ProjectorFacts:
    """A projector found among some weights: its type and the dims its shapes imply."""

    type: str | None
    hidden: int | None
    mm_hidden: int | None
    shapes: dict[str, tuple[int, ...]]  # sub-key -> shape
    keys: dict[str, str]                # sub-key -> file key


def projector_facts(shapes: Mapping[str, tuple[int, ...]]) -> ProjectorFacts | None:
    """Facts about the projector among `shapes` (file key -> shape, any key style), or None."""
    subs: dict[str, str] = {}
    for k in shapes:
        p = canonical_param_name(k)
        if p is not None and p.startswith(PROJ):
            subs.setdefault(p[len(PROJ):], k)
    if not subs:
        return None
    rel = {s: tuple(shapes[k]) for s, k in subs.items()}
    first = rel.get("0.weight") or rel.get("weight") or rel.get("conv_pool.weight")
    hidden = first[0] if first else None
    mm_hidden = first[1] if first and len(first) >= 2 else None
    return ProjectorFacts(type=projector_type_of(rel), hidden=hidden, mm_hidden=mm_hidden,
                          shapes=rel, keys=subs)


def projector_mismatch(facts: ProjectorFacts, config: Mapping[str, Any] | None) -> str | None:
    """Why a projector does not fit a LLaVA config (type or shapes); None when it fits."""
    if facts.type is None:
        return "its keys match no projector structure LLaVA builds"
    if not config:
        return None
    want_type = config.get("mm_projector_type") or DEFAULT_PROJECTOR_TYPE
    if want_type != facts.type:
        return f"it is {facts.type}, but the config says mm_projector_type={want_type!r}"
    hidden, mm_hidden = config.get("hidden_size"), config.get("mm_hidden_size")
    if isinstance(hidden, int) and isinstance(mm_hidden, int):
        layout = expected_projector(facts.type, hidden, mm_hidden)
        if layout is not None and layout != facts.shapes:
            return (f"its shapes do not fit hidden_size={hidden}, mm_hidden_size={mm_hidden}: "
                    f"{facts.shapes} vs {layout}")
    return None


@dataclass(frozen=True)
class AdapterDims:
    hidden: int | None
    intermediate: int | None
    layers: int | None


def adapter_dims(shapes: Mapping[str, tuple[int, ...]]) -> AdapterDims:
    """Hidden/intermediate sizes and layer count implied by LoRA tensor shapes."""
    hidden = intermediate = None
    layers = -1
    for k, s in shapes.items():
        m = _LAYER.search(k)
        if m:
            layers = max(layers, int(m.group(1)))
        if len(s) != 2:
            continue
        if ".lora_A." in k and any(p in k for p in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                     "up_proj")):
            hidden = hidden or s[1]
        if ".lora_A." in k and "down_proj" in k:
            intermediate = intermediate or s[1]
        if ".lora_B." in k and ("gate_proj" in k or "up_proj" in k):
            intermediate = intermediate or s[0]
        if ".lora_B." in k and "down_proj" in k:
            hidden = hidden or s[0]
    return AdapterDims(hidden, intermediate, layers + 1 if layers >= 0 else None)


def dims_mismatch(config: Mapping[str, Any], dims: AdapterDims) -> str | None:
    """Which LLM size field of `config` disagrees with the adapter's shapes, or None."""
    for key, val in (("hidden_size", dims.hidden), ("intermediate_size", dims.intermediate),
                     ("num_hidden_layers", dims.layers)):
        have = config.get(key)
        if val is None or not isinstance(have, int):
            continue
        # An adapter may leave the last layers out (layers_to_transform); more is impossible.
        if (val > have) if key == "num_hidden_layers" else (have != val):
            return f"{key}={have} but the adapter's tensors imply {val}"
    return None
