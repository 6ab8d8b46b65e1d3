"""The original-LLaVA -> canonical llava-hf key table and the vocabulary arithmetic."""

from __future__ import annotations

import pytest

from llava_doctor.merge.hf_keys import to_canonical, tower_to_canonical
from llava_doctor.merge.hf_plan import Vocab


@pytest.mark.parametrize(("name", "want"), [
    ("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
    ("model.layers.31.self_attn.q_proj.weight",
     "language_model.model.layers.31.self_attn.q_proj.weight"),
    ("model.norm.weight", "language_model.model.norm.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    ("model.mm_projector.0.weight", "multi_modal_projector.linear_1.weight"),
    ("model.mm_projector.0.bias", "multi_modal_projector.linear_1.bias"),
    ("model.mm_projector.2.weight", "multi_modal_projector.linear_2.weight"),
    ("model.image_newline", "image_newline"),
    ("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
     "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
    # no llava-hf place: other projectors, resamplers, towers without the vision_model level
    ("model.mm_projector.4.weight", None),
    ("model.mm_projector.weight", None),
    ("model.vision_resampler.proj.weight", None),
    ("model.vision_tower.vision_tower.embeddings.patch_embedding.weight", None),
])
def test_original_to_canonical(name: str, want: str | None) -> None:
    assert to_canonical(name) == want


@pytest.mark.parametrize(("name", "want"), [
    # CLIPModel / CLIPVisionModel saved by transformers 4.x
    ("vision_model.embeddings.patch_embedding.weight",
     "vision_tower.vision_model.embeddings.patch_embedding.weight"),
    ("vision_model.pre_layrnorm.weight", "vision_tower.vision_model.pre_layrnorm.weight"),
    # CLIPVisionModel saved by transformers 5.x (measured with 5.24: no `vision_model.`)
    ("encoder.layers.1.self_attn.k_proj.bias",
     "vision_tower.vision_model.encoder.layers.1.self_attn.k_proj.bias"),
    ("post_layernorm.weight", "vision_tower.vision_model.post_layernorm.weight"),
    # SigLIP's attention-pooling head is part of SiglipVisionModel
    ("vision_model.head.probe", "vision_tower.vision_model.head.probe"),
    # a full CLIPModel's text tower and projections have no place
    ("text_model.encoder.layers.0.mlp.fc1.weight", None),
    ("visual_projection.weight", None),
    ("logit_scale", None),
])
def test_tower_to_canonical(name: str, want: str | None) -> None:
    assert tower_to_canonical(name) == want


@pytest.mark.parametrize(("rows", "padded"), [(32000, 32064), (128, 192), (62, 64),
                                              (63, 128), (32062, 32064)])
def test_vocab_after(rows: int, padded: int) -> None:
    v = Vocab.after(rows)
    assert (v.image_token_index, v.pad_token_id, v.padded_rows) == (rows, rows + 1, padded)
