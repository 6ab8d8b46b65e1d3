"""artifacts/hf_layout.py: the one table of llava-hf key layouts."""

from __future__ import annotations

import pytest

from llava_doctor.artifacts.hf_layout import (
    Fate,
    Layout,
    adapter_fate,
    checkpoint_readable,
    convert,
    detect_adapter_layout,
    detect_layout,
    key_layout,
    runtime_layout,
    to_canonical,
    to_layout,
)

# One parameter of each part, spelled in each layout.
SPELLINGS = {
    Layout.canonical: ["language_model.model.layers.0.self_attn.q_proj.weight",
                       "language_model.lm_head.weight",
                       "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                       "multi_modal_projector.linear_1.bias", "image_newline"],
    Layout.runtime_4: ["model.language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                       "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                       "model.multi_modal_projector.linear_1.bias", "model.image_newline"],
    Layout.runtime_5: ["model.language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                       "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                       "model.multi_modal_projector.linear_1.bias", "model.image_newline"],
    Layout.saved_5: ["language_model.model.layers.0.self_attn.q_proj.weight",
                     "language_model.lm_head.weight", "vision_tower.encoder.layers.0.mlp.fc1.weight",
                     "multi_modal_projector.linear_1.bias", "image_newline"],
}


@pytest.mark.parametrize("layout", list(Layout))
def test_round_trips_through_canonical(layout: Layout) -> None:
    canon = SPELLINGS[Layout.canonical]
    assert [to_layout(k, layout) for k in canon] == SPELLINGS[layout]
    assert [to_canonical(k, layout) for k in SPELLINGS[layout]] == canon
    for other in Layout:
        assert [convert(k, layout, other) for k in SPELLINGS[layout]] == SPELLINGS[other]
    assert to_canonical("something.else.weight", layout) == "something.else.weight"


def test_detection() -> None:
    assert detect_layout(SPELLINGS[Layout.canonical]) == Layout.canonical
    assert detect_layout(SPELLINGS[Layout.saved_5]) == Layout.saved_5
    assert detect_layout(SPELLINGS[Layout.runtime_4]) == Layout.runtime_4
    assert detect_layout(SPELLINGS[Layout.runtime_5]) == Layout.runtime_5
    assert detect_layout(["model.layers.0.mlp.up_proj.weight"]) is None
    assert key_layout("vision_tower.vision_model.x") == Layout.canonical
    assert key_layout("vision_tower.x") == Layout.saved_5
    peft = "base_model.model."
    assert detect_adapter_layout([peft + "language_model.model.layers.0.q_proj.lora_A.weight"]) \
        == Layout.canonical
    assert detect_adapter_layout([peft + "model.vision_tower.encoder.q_proj.lora_A.weight"]) \
        == Layout.runtime_5
    assert detect_adapter_layout([peft + "model.layers.0.q_proj.lora_A.weight"]) is None


def test_versions() -> None:
    assert runtime_layout("4.46.3") == Layout.canonical
    assert runtime_layout("4.52.0.dev0") == Layout.runtime_4
    assert runtime_layout("5.24.0") == Layout.runtime_5
    assert runtime_layout(None) is None and runtime_layout("main") is None
    assert [lay for lay in Layout if checkpoint_readable(lay, "4.46.3")] == [Layout.canonical]
    assert [lay for lay in Layout if checkpoint_readable(lay, "4.57.1")] == [
        Layout.canonical, Layout.runtime_4]
    assert all(checkpoint_readable(lay, "5.24.0") for lay in Layout)


def test_adapter_fates() -> None:
    lm = "language_model.model.layers.0.self_attn.q_proj"
    proj = "multi_modal_projector.linear_1"
    tower = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    c = Layout.canonical
    assert adapter_fate(lm, c, "5.24.0", full=False) == Fate.applied
    assert adapter_fate(tower, c, "5.24.0", full=False) == Fate.applied
    assert adapter_fate(proj, c, "5.24.0", full=False) == Fate.dropped
    assert adapter_fate(proj, c, "5.24.0", full=True) == Fate.crash
    assert adapter_fate(proj, c, "4.46.3", full=True) == Fate.applied
    new_lm = to_layout(lm, Layout.runtime_5)
    assert adapter_fate(new_lm, Layout.runtime_5, "4.46.3", full=False) == Fate.dropped
    assert adapter_fate(new_lm, Layout.runtime_5, "4.55.0", full=False) == Fate.applied
    assert adapter_fate(to_layout(tower, Layout.runtime_5), Layout.runtime_5, "4.55.0",
                        full=False) == Fate.dropped
