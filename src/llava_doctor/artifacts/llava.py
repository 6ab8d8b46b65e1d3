"""LLaVA's own rules, reproduced exactly: name dispatch, key rewrite, projector structure.

Reference: haotian-liu/LLaVA @ c121f04 (`mm_utils.get_model_name_from_path`,
`model/builder.py:load_pretrained_model`, `multimodal_projector/builder.py`); see
llava-layout.md §A–§D and failure-modes.md §0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

CANONICAL_NON_LORA_PREFIX = "base_model.model.model."
PROJECTOR_PREFIX = "model.mm_projector."
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def get_model_name_from_path(model_path: str) -> str:
    """LLaVA's `get_model_name_from_path`, byte for byte."""
    model_path = model_path.strip("/")
    parts = model_path.split("/")
    if parts[-1].startswith("checkpoint-"):
        return parts[-2] + "_" + parts[-1] if len(parts) > 1 else parts[-1]
    return parts[-1]


def builder_branch(model_name: str, has_base: bool = True) -> str:
    """Which branch of `load_pretrained_model` a name takes (failure-modes.md §0)."""
    name = model_name.lower()
    if "llava" in name:
        if "lora" in name and has_base:
            return "lora"
        if has_base:
            return "projector-only"
        return "full"
    return "plain-llm"


def builder_rewrite(keys: Iterable[str]) -> dict[str, str]:
    """LLaVA's non_lora_trainables key rewrite: original key -> key given to load_state_dict.

    Strip a leading `base_model.`; then, if ANY key starts with `model.model.`, strip a leading
    `model.` from every key that has it.
    """
    step1 = {k: (k[len("base_model."):] if k.startswith("base_model.") else k) for k in keys}
    if any(v.startswith("model.model.") for v in step1.values()):
        step1 = {k: (v[len("model."):] if v.startswith("model.") else v) for k, v in step1.items()}
    return step1


@dataclass(frozen=True)
class ProjectorShape:
    """A projector type and the state-dict entries (relative names -> shape) it must have."""

    type: str
    keys: dict[str, tuple[int, ...]]


def projector_layout(ptype: str, hidden: int, mm_hidden: int) -> ProjectorShape | None:
    """Expected keys (relative to `mm_projector.`) and shapes for a projector type, or None."""
    if ptype == "linear":
        return ProjectorShape(ptype, {"weight": (hidden, mm_hidden), "bias": (hidden,)})
    if ptype == "identity":
        return ProjectorShape(ptype, {})
    m = _MLP.match(ptype)
    if m:
        depth = int(m.group(1))
        keys: dict[str, tuple[int, ...]] = {}
        for i in range(depth):
            keys[f"{2 * i}.weight"] = (hidden, mm_hidden if i == 0 else hidden)
            keys[f"{2 * i}.bias"] = (hidden,)
        return ProjectorShape(ptype, keys)
    return None


def infer_projector_type(rel_keys: Iterable[str]) -> str | None:
    """Projector type from its state-dict keys (relative to `mm_projector.`), or None."""
    keys = set(rel_keys)
    if not keys:
        return "identity"
    if keys == {"weight", "bias"} or keys == {"weight"}:
        return "linear"
    if any(".pre_norm." in k or k.startswith("conv_pool") for k in keys):
        return "pooler" if any(k.startswith("conv_pool") for k in keys) else None
    idx = set()
    for k in keys:
        m = re.match(r"^(\d+)\.(weight|bias)$", k)
        if not m:
            return None
        idx.add(int(m.group(1)))
    expected = set(range(0, 2 * len(idx), 2))
    if idx == expected:
        return f"mlp{len(idx)}x_gelu"
    return None


def projector_keys(tensor_names: Iterable[str]) -> dict[str, str]:
    """Full key -> key relative to `mm_projector.` for every name containing `mm_projector.`."""
    out = {}
    for k in tensor_names:
        i = k.find("mm_projector.")
        if i >= 0:
            out[k] = k[i + len("mm_projector."):]
    return out
