"""Original-LLaVA tensor names -> the canonical llava-hf names, as one table.

The canonical layout is what transformers' conversion scripts write and what every transformers
from 4.36 to 5.x (and vLLM, SGLang) loads: ``language_model.model.*``, ``language_model.lm_head.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``, ``image_newline``
(llava-hf-layout.md, "Three key layouts"). Only the original -> canonical direction lives here;
the llava-hf layouts among themselves are another module's business.
"""

from __future__ import annotations

import re

# (pattern on the original name, canonical replacement), first match wins. The tower of LLaVA's
# own merged outputs (its builder loads CLIP before saving) comes before the generic `model.`.
ORIGINAL_TO_CANONICAL: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r) for p, r in (
        (r"^model\.mm_projector\.0\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
        (r"^model\.mm_projector\.2\.(weight|bias)$", r"multi_modal_projector.linear_2.\1"),
        (r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$",
         r"vision_tower.vision_model.\1"),
        (r"^model\.image_newline$", "image_newline"),
        (r"^model\.((?:embed_tokens|layers|norm)\b.*)$", r"language_model.model.\1"),
        (r"^lm_head\.(weight|bias)$", r"language_model.lm_head.\1"),
    ))

# Names in a CLIP / SigLIP checkpoint: `vision_model.*` (CLIPModel, CLIPVisionModel saved by
# transformers < 5) or bare `embeddings.*` / `encoder.*` / `*layernorm*` / `head.*` (a
# CLIPVisionModel saved by transformers 5.x, measured with 5.24). Text tower and projections
# of a full CLIPModel have no place in llava-hf.
_TOWER_PREFIX = re.compile(r"^(?:vision_model\.)?((?:embeddings|encoder|pre_layrnorm|"
                           r"post_layernorm|head)\..+)$")

EMBEDDINGS = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"
TOWER = "vision_tower.vision_model."


def to_canonical(name: str) -> str | None:
    """The canonical llava-hf name of an original-LLaVA tensor, or None when it has none."""
    for pattern, repl in ORIGINAL_TO_CANONICAL:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def tower_to_canonical(name: str) -> str | None:
    """The canonical name of a tensor of a CLIP/SigLIP checkpoint, or None (text tower etc.)."""
    m = _TOWER_PREFIX.match(name)
    return TOWER + m.group(1) if m else None


def is_checkpoint_tower(name: str) -> bool:
    """An original-LLaVA name of a vision tower tensor saved inside the checkpoint."""
    return name.startswith("model.vision_tower.")
