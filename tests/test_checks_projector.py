"""LD301-LD308: the projector, image_newline and vision tower the merge would really get.

Every case is a tiny real run written by the fixture builder (or by torch.save for odd key
sets), laid out the way LLaVA lays out `./checkpoints/`: each run in its own folder with its
stage-1 `*-pretrain/` sibling where the recipe has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from check_helpers import edit_json, found, one

from llava_doctor.artifacts.llava import (
    LlavaParams,
    builder_rewrite,
    canonical_param_name,
    expected_projector,
    projector_type_of,
)
from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures import TINY, Dims, build_base, build_lora, build_pretrain
from llava_doctor.fixtures.scenarios import write_malicious_bin
from llava_doctor.models import CheckStatus, FixSafety, Severity

NL = "non_lora_trainables.bin"
CANON = "base_model.model.model.mm_projector."
#: Same layer count and vocab as TINY, half the width: a "13B vs 7B" stand-in.
NARROW = Dims(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=4, vocab=128, mm_hidden=32)




def status(path: Path, code: str, **opts: Any) -> tuple[CheckStatus, str | None]:
    rep = run_checks([path], Options(**opts), select=[code])
    out = next(c for t in rep.targets for c in t.checks if c.code == code)
    return out.status, out.reason






def save_non_lora(run: Path, tensors: dict[str, torch.Tensor]) -> None:
    torch.save({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, run / NL)


def canonical_tensors(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / NL, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared bases and stage-1 projectors (never modified by a test)."""
    root = tmp_path_factory.mktemp("shared")
    out: dict[str, Path] = {}
    out["vicuna"] = build_base(root / "vicuna-tiny-v1.5", TINY, generation_config="valid")
    out["llava"] = build_base(root / "llava-v1.5-tiny", TINY, llava=True, generation_config="valid")
    out["llava-unpad"] = build_base(root / "llava-v1.6-tiny", TINY, llava=True, image_newline=True,
                                    generation_config="valid")
    # another stage-1 run (seed) than the ones lora_run() writes beside each run
    out["pre-mlp2x"] = build_pretrain(root / "p2" / "llava-v1.5-tiny-pretrain", TINY,
                                      base=out["vicuna"], seed=5)
    out["pre-linear"] = build_pretrain(root / "pl" / "llava-tiny-linear-pretrain", TINY,
                                       projector_type="linear", base=out["vicuna"])
    out["pre-narrow"] = build_pretrain(root / "pn" / "llava-narrow-pretrain", NARROW,
                                       base=out["vicuna"])
    out["pre-224"] = build_pretrain(root / "p224" / "llava-224-pretrain", TINY, base=out["vicuna"],
                                    vision_tower="openai/clip-vit-large-patch14")
    return out


def lora_run(root: Path, w: dict[str, Path], *, pretrain: bool = True, **kw: Any) -> Path:
    """A finetune_lora.sh run: `root/llava-v1.5-tiny-pretrain` + `root/llava-v1.5-tiny-lora`."""
    root.mkdir(parents=True, exist_ok=True)
    ptype = kw.get("projector_type", "mlp2x_gelu")
    pre = build_pretrain(root / "llava-v1.5-tiny-pretrain", TINY, projector_type=ptype,
                         base=w["vicuna"]) if pretrain else None
    kw.setdefault("base", w["vicuna"])
    kw.setdefault("projector_from", pre)
    return build_lora(root / "llava-v1.5-tiny-lora", TINY, **kw)


def task_run(root: Path, w: dict[str, Path], **kw: Any) -> Path:
    """A finetune_task_lora.sh run on the LLaVA base (no stage-1 projector)."""
    kw.setdefault("base", w["llava"])
    kw.setdefault("projector_from", kw["base"])
    return build_lora(root / "llava-v1.5-tiny-task-lora", TINY, trained_from="llava", **kw)


# --- the artifact helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("ptype", ["linear", "mlp2x_gelu", "mlp3x_gelu", "mlp2x_res2x_gelu",
                                   "pooler", "identity"])
def test_projector_type_round_trips_through_its_layout(ptype: str) -> None:
    layout = expected_projector(ptype, 8, 4)
    assert layout is not None
    assert projector_type_of(layout) == ptype


def test_projector_layouts_match_the_fixture_builder() -> None:
    from llava_doctor.fixtures import projector_shapes

    for ptype in ("linear", "mlp2x_gelu", "mlp3x_gelu", "mlp2x_res2x_gelu", "pooler"):
        assert expected_projector(ptype, TINY.hidden, TINY.mm_hidden) == \
            projector_shapes(ptype, TINY), ptype
    assert expected_projector("mlp2x_silu", 8, 4) is None


@pytest.mark.parametrize("key,param", [
    ("base_model.model.model.mm_projector.0.weight", "model.mm_projector.0.weight"),
    ("module.base_model.model.model.mm_projector.0.weight", "model.mm_projector.0.weight"),
    ("mm_projector.2.bias", "model.mm_projector.2.bias"),
    ("multi_modal_projector.linear_2.weight", "model.mm_projector.2.weight"),
    ("base_model.model.model.multi_modal_projector.linear_1.bias", "model.mm_projector.0.bias"),
    ("base_model.model.model.model.mm_projector.0.weight", "model.mm_projector.0.weight"),
    ("base_model.model.model.mm_projector.modules_to_save.default.2.weight",
     "model.mm_projector.2.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
     "model.layers.0.self_attn.q_proj.weight"),
    ("image_newline", "model.image_newline"),
    ("base_model.model.language_model.lm_head.weight", "lm_head.weight"),
    ("base_model.model.model.mm_projector.original_module.0.weight", None),
    ("optimizer.state", None),
])
def test_canonical_param_name(key: str, param: str | None) -> None:
    assert canonical_param_name(key) == param


def test_llava_params_follow_the_config() -> None:
    flat = LlavaParams.from_config({"num_hidden_layers": 2})
    unpad = LlavaParams.from_config({"num_hidden_layers": 2,
                                     "mm_patch_merge_type": "spatial_unpad"})
    assert not flat.accepts("model.image_newline") and unpad.accepts("model.image_newline")
    assert flat.accepts("model.layers.1.mlp.down_proj.weight")
    assert not flat.accepts("model.layers.2.mlp.down_proj.weight")
    assert not flat.accepts("model.layers.0.self_attn.q_proj.bias")
    assert flat.accepts("model.mm_projector.weight") and not flat.accepts("model.mm_projector.")
    assert not flat.accepts("mm_projector.0.weight")
    assert flat.accepts("model.mm_projector.3.proj.0.weight")
    assert flat.accepts("model.mm_projector.conv_pool.bias")
    assert not flat.accepts("model.mm_projector.modules_to_save.default.0.weight")
    assert not flat.accepts("model.mm_projector.0.base_layer.weight")
    assert not flat.accepts("model.vision_tower.vision_tower.x.lora_A.weight")
    # LLaVA's rewrite is global: one `model.model.` key strips `model.` from all of them
    keys = ["model.mm_projector.0.weight", "base_model.model.model.image_newline"]
    assert builder_rewrite(keys) == {"model.mm_projector.0.weight": "mm_projector.0.weight",
            "base_model.model.model.image_newline": "model.image_newline"}


# --- LD301 projector-type-mismatch ---------------------------------------------------------------

def test_ld301_config_says_linear_weights_are_mlp2x(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, extra_config={"mm_projector_type": "linear"})
    f = one(run, "LD301")
    assert f.path == str(run / "config.json")
    assert f.fix == FixSafety.safe and f.severity == Severity.error
    assert f.evidence["actual"] == "linear" and f.evidence["expected"] == "mlp2x_gelu"
    assert f.evidence["weights"] == str(run / NL)
    assert "mm_projector_type is 'linear'" in f.message
    assert "sets mm_projector_type to 'mlp2x_gelu'" in f.message


def test_ld301_absent_type_defaults_to_linear(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    edit_json(run / "config.json", mm_projector_type=None)
    f = one(run, "LD301")
    assert f.evidence["explicit"] is False and f.evidence["actual"] == "linear"
    assert "absent, so LLaVA's default 'linear'" in f.message


def test_ld301_weights_from_the_llava_base(tmp_path: Path, w: dict[str, Path]) -> None:
    run = task_run(tmp_path, w, non_lora_style="empty",
                   extra_config={"mm_projector_type": "linear"})
    f = one(run, "LD301")
    assert f.path == str(run / "config.json")
    assert f.evidence["expected"] == "mlp2x_gelu" and f.evidence["weights"] == str(w["llava"])


def test_ld301_unknown_type_in_config(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, extra_config={"mm_projector_type": "mlp2x_silu"})
    f = one(run, "LD301")
    assert "ValueError: Unknown projector type: mlp2x_silu" in f.message
    assert f.fix == FixSafety.safe


@pytest.mark.parametrize("ptype", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_ld301_matching_types_pass(tmp_path: Path, w: dict[str, Path], ptype: str) -> None:
    run = lora_run(tmp_path, w, projector_type=ptype)
    assert found(run, "LD301") == []


def test_ld301_partial_projector_is_left_to_ld302(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    t = canonical_tensors(run)
    save_non_lora(run, {k: v for k, v in t.items() if ".2." not in k})
    assert found(run, "LD301") == []
    f = one(run, "LD302")
    assert "incomplete" in f.message and f.evidence["missing"] == [
        "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert "complete 'mlp1x_gelu' projector" in f.message and f.fix == FixSafety.none


# --- LD302 projector-missing ---------------------------------------------------------------------

def test_ld302_frozen_projector_on_vicuna_injects_stage1(tmp_path: Path,
                                                         w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, non_lora_style="empty",
                   extra_config={"freeze_mm_mlp_adapter": True})
    f = one(run, "LD302")
    assert f.path == str(run / NL) and f.fix == FixSafety.unsafe
    pre = tmp_path / "llava-v1.5-tiny-pretrain" / "mm_projector.bin"
    assert f.evidence["projector"] == str(pre)
    assert f.evidence["inject"] == {f"model.mm_projector.{s}": f"{CANON}{s}"
                                    for s in ("0.bias", "0.weight", "2.bias", "2.weight")}
    assert "freeze_mm_mlp_adapter: true" in f.message
    assert "leaves it randomly initialised" in f.message


def test_ld302_without_a_stage1_projector_has_no_fix(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, pretrain=False, non_lora_style="empty")
    f = one(run, "LD302")
    assert f.fix == FixSafety.none and "--projector" in f.message


def test_ld302_wrong_stage1_type_is_not_injected(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, pretrain=False, non_lora_style="empty")
    f = one(run, "LD302", projector=w["pre-linear"] / "mm_projector.bin")
    assert f.fix == FixSafety.none and "is a linear projector, not mlp2x_gelu" in f.message


def test_ld302_points_at_ld305_for_renamed_keys(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, non_lora_style="bare")
    f = one(run, "LD302")
    assert f.fix == FixSafety.none and "see LD305" in f.message


def test_ld302_frozen_projector_on_a_llava_base_is_fine(tmp_path: Path, w: dict[str, Path]) -> None:
    run = task_run(tmp_path, w, non_lora_style="empty")
    assert found(run, "LD302") == []


def test_ld302_healthy_and_identity(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "a", w)
    assert found(run, "LD302") == []
    ident = lora_run(tmp_path / "b", w, pretrain=False, non_lora_style="empty",
                     extra_config={"mm_projector_type": "identity"})
    assert found(ident, "LD302") == []


def test_ld302_skips_without_a_base(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, non_lora_style="empty", base=None)
    st, reason = status(run, "LD302")
    assert st == CheckStatus.skipped and "LD401" in (reason or "")


# --- LD303 projector-not-from-pretrain -----------------------------------------------------------

def test_ld303_random_projector_is_far_from_stage1(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    build_lora(run, TINY, base=w["vicuna"], projector_from=None)  # rewrite: no pretrain start
    f = one(run, "LD303")
    assert f.path == str(run / NL) and f.severity == Severity.warning
    assert f.evidence["distance"] > 1.0
    assert set(f.evidence["per_tensor"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert f"relative distance {f.evidence['distance']:.2f}" in f.message
    assert "--pretrain_mm_mlp_adapter" in f.message


def test_ld303_fine_tune_from_stage1_is_close(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    assert found(run, "LD303") == []
    assert status(run, "LD303")[0] == CheckStatus.passed


def test_ld303_wrong_stage1_file_given(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    f = one(run, "LD303", projector=w["pre-mlp2x"] / "mm_projector.bin")
    assert str(w["pre-mlp2x"] / "mm_projector.bin") in f.message


def test_ld303_skipped_with_fast(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    build_lora(run, TINY, base=w["vicuna"], projector_from=None)
    st, reason = status(run, "LD303", fast=True)
    assert st == CheckStatus.skipped and "--fast" in (reason or "")


def test_ld303_task_lora_compares_with_the_base_under_scan_base(tmp_path: Path,
                                                                 w: dict[str, Path]) -> None:
    good = task_run(tmp_path / "good", w)
    assert found(good, "LD303", scan_base=True) == []
    bad = task_run(tmp_path / "bad", w, projector_from=None)
    st, reason = status(bad, "LD303")
    assert st == CheckStatus.skipped and "--scan-base" in (reason or "")
    f = one(bad, "LD303", scan_base=True)
    assert f.path == str(bad / NL) and f"the base's projector ({w['llava']})" in f.message


# --- LD304 projector-dims-mismatch ---------------------------------------------------------------

def test_ld304_projector_of_another_width(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    save_non_lora(run, {f"{CANON}0.weight": torch.zeros(64, 48), f"{CANON}0.bias": torch.zeros(64),
                        f"{CANON}2.weight": torch.zeros(64, 64), f"{CANON}2.bias": torch.zeros(64)})
    f = one(run, "LD304")
    assert f.path == str(run / NL)
    assert f.evidence["tensors"] == {f"{CANON}0.weight": {"actual": [64, 48],
                                                          "expected": [64, 32]}}
    assert ("size mismatch for model.mm_projector.0.weight: copying a param with shape "
            "torch.Size([64, 48]) from checkpoint, the shape in current model is "
            "torch.Size([64, 32])") in f.message


def test_ld304_narrow_projector_in_a_wide_model(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    narrow = torch.load(w["pre-narrow"] / "mm_projector.bin", weights_only=True)
    save_non_lora(run, {"base_model.model." + k: v for k, v in narrow.items()})
    f = one(run, "LD304")
    assert set(f.evidence["tensors"]) == {f"{CANON}{s}" for s in
                                          ("0.weight", "0.bias", "2.weight", "2.bias")}


def test_ld304_config_mm_hidden_size_disagrees(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, extra_config={"mm_hidden_size": 48})
    f = one(run, "LD304")
    assert f.evidence["mm_hidden_size"] == 48


def test_ld304_identity_needs_equal_widths(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, pretrain=False, non_lora_style="empty",
                   extra_config={"mm_projector_type": "identity"})
    f = one(run, "LD304")
    assert f.path == str(run / "config.json") and "mm_hidden_size == hidden_size" in f.message


def test_ld304_base_projector_checked_too(tmp_path: Path, w: dict[str, Path]) -> None:
    run = task_run(tmp_path, w, non_lora_style="empty", extra_config={"mm_hidden_size": 16})
    f = one(run, "LD304")
    assert f.path.startswith(str(w["llava"])) and "the base's projector" in f.message


@pytest.mark.parametrize("ptype", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_ld304_healthy(tmp_path: Path, w: dict[str, Path], ptype: str) -> None:
    assert found(lora_run(tmp_path, w, projector_type=ptype), "LD304") == []


def test_ld304_zero3_placeholders_are_ld105s(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    save_non_lora(run, {k: torch.empty(0) for k in canonical_tensors(run)})
    assert found(run, "LD304") == []


# --- LD305 projector-keys-dropped ----------------------------------------------------------------

def test_ld305_ddp_prefix(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, non_lora_style="ddp")
    f = one(run, "LD305")
    assert f.path == str(run / NL) and f.fix == FixSafety.safe
    assert f.evidence["mapping"] == {f"module.{CANON}{s}": f"{CANON}{s}"
                                     for s in ("0.bias", "0.weight", "2.bias", "2.weight")}
    assert f.evidence["unmappable"] == [] and f.evidence["conflicts"] == []
    assert "randomly initialised projector" in f.message
    assert "tensors are unchanged bit for bit" in f.message


def test_ld305_bare_keys_with_image_newline(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, non_lora_style="bare", image_newline=True,
                   mm_patch_merge_type="spatial_unpad")
    f = one(run, "LD305")
    assert f.evidence["mapping"]["mm_projector.0.weight"] == f"{CANON}0.weight"
    assert f.evidence["mapping"]["image_newline"] == "base_model.model.model.image_newline"
    assert "image_newline stays uninitialised" in f.message


@pytest.mark.parametrize("ptype,expected", [
    ("mlp2x_gelu", {"multi_modal_projector.linear_1.weight": f"{CANON}0.weight",
                    "multi_modal_projector.linear_2.bias": f"{CANON}2.bias"}),
    ("linear", {"multi_modal_projector.linear_1.weight": f"{CANON}weight",
                "multi_modal_projector.linear_1.bias": f"{CANON}bias"}),
])
def test_ld305_llava_hf_names(tmp_path: Path, w: dict[str, Path], ptype: str,
                              expected: dict[str, str]) -> None:
    run = lora_run(tmp_path, w, projector_type=ptype, non_lora_style="llava-hf")
    f = one(run, "LD305")
    for k, v in expected.items():
        assert f.evidence["mapping"][k] == v
    assert f.fix == FixSafety.safe


def test_ld305_global_rewrite_trap(tmp_path: Path, w: dict[str, Path]) -> None:
    """`model.mm_projector.*` alone lands; beside one `base_model.model.model.*` key it does not."""
    run = lora_run(tmp_path, w, mm_patch_merge_type="spatial_unpad")
    t = canonical_tensors(run)
    plain = {k[len("base_model.model."):]: v for k, v in t.items()}
    save_non_lora(run, plain)
    assert found(run, "LD305") == []
    save_non_lora(run, {**plain, "base_model.model.model.image_newline": torch.zeros(64)})
    f = one(run, "LD305")
    assert f.evidence["dropped"]["model.mm_projector.0.weight"] == "mm_projector.0.weight"
    assert f.evidence["mapping"]["model.mm_projector.0.weight"] == f"{CANON}0.weight"
    assert "base_model.model.model.image_newline" not in f.evidence["mapping"]


@pytest.mark.parametrize("key", [
    "base_model.model.model.model.mm_projector.0.weight",
    f"{CANON}modules_to_save.default.0.weight",
])
def test_ld305_other_wrappings(tmp_path: Path, w: dict[str, Path], key: str) -> None:
    run = lora_run(tmp_path, w)
    t = canonical_tensors(run)
    t[key] = t.pop(f"{CANON}0.weight")
    save_non_lora(run, t)
    f = one(run, "LD305")
    assert f.evidence["mapping"] == {key: f"{CANON}0.weight"} and f.fix == FixSafety.safe


def test_ld305_unfrozen_backbone_base_layer_is_unsafe(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    t = canonical_tensors(run)
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    t[key] = torch.zeros(64, 64)
    save_non_lora(run, t)
    f = one(run, "LD305")
    assert f.evidence["mapping"] == {
        key: "base_model.model.model.layers.0.self_attn.q_proj.weight"}
    assert f.fix == FixSafety.unsafe and "LLM weights" in f.message


def test_ld305_conflicting_names_are_not_renamed(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    t = canonical_tensors(run)
    t[f"module.{CANON}0.weight"] = t[f"{CANON}0.weight"].clone()
    save_non_lora(run, t)
    f = one(run, "LD305")
    assert f.fix == FixSafety.none
    assert f.evidence["conflicts"] == [f"{CANON}0.weight", f"module.{CANON}0.weight"]


def test_ld305_newline_without_unpad_cannot_be_renamed(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    t = canonical_tensors(run)
    t["base_model.model.model.image_newline"] = torch.zeros(64)
    save_non_lora(run, t)
    f = one(run, "LD305")
    assert f.fix == FixSafety.none
    assert f.evidence["unmappable"] == ["base_model.model.model.image_newline"]
    assert "mm_patch_merge_type contains 'unpad' (it is 'flat')" in f.message


def test_ld305_canonical_and_peft_original_module_pass(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w)
    assert found(run, "LD305") == []
    t = canonical_tensors(run)
    t[f"{CANON}original_module.0.weight"] = t[f"{CANON}0.weight"].clone()
    save_non_lora(run, t)
    assert found(run, "LD305") == []


# --- LD306 pretrain-projector-invalid ------------------------------------------------------------

def test_ld306_projector_file_does_not_exist(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "r", w, pretrain=False)
    missing = tmp_path / "nowhere" / "mm_projector.bin"
    f = one(run, "LD306", projector=missing)
    assert f.path == str(missing) and "does not exist" in f.message
    assert f.evidence["source"] == "--projector"


def test_ld306_unsafe_pickle_points_at_ld502(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "r", w, pretrain=False)
    bad = tmp_path / "evil" / "mm_projector.bin"
    bad.parent.mkdir()
    write_malicious_bin(bad, {"model.mm_projector.weight": torch.zeros(2, 2)},
                        f"touch {tmp_path / 'PWNED'}")
    f = one(run, "LD306", projector=bad)
    assert f.evidence["see"] == "LD502" and "LD502 says why" in f.message
    assert not (tmp_path / "PWNED").exists()
    # the full text is LD502's, once
    rep = run_checks([run], Options(projector=bad), select=["LD306", "LD502"])
    assert [x.code for x in rep.findings if x.path == str(bad)] == ["LD306", "LD502"]


def test_ld306_no_projector_keys(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "r", w, pretrain=False)
    other = tmp_path / "other.bin"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 64)}, other)
    f = one(run, "LD306", projector=other)
    assert f.path == str(other) and "holds no mm_projector keys" in f.message


def test_ld306_linear_stage1_for_mlp2x_run(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "r", w, pretrain=False)
    f = one(run, "LD306", projector=w["pre-linear"] / "mm_projector.bin")
    assert f.evidence == {"expected": "mlp2x_gelu", "actual": "linear"}


def test_ld306_stage1_of_another_width(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "r", w, pretrain=False)
    f = one(run, "LD306", projector=w["pre-narrow"] / "mm_projector.bin")
    assert f.evidence["tensors"]["model.mm_projector.0.weight"] == {"actual": [32, 32],
                                                                    "expected": [64, 32]}


def test_ld306_stage1_trained_for_another_tower(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "r", w, pretrain=False)
    f = one(run, "LD306", projector=w["pre-224"] / "mm_projector.bin")
    assert f.severity == Severity.warning
    assert set(f.evidence["differs"]) == {"mm_vision_tower"}


def test_ld306_healthy_and_task_lora_sibling(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "a", w)
    assert found(run, "LD306") == [] and status(run, "LD306")[0] == CheckStatus.passed
    # a task LoRA next to someone's stage-1 output does not start from it
    task = task_run(tmp_path / "a", w)
    st, reason = status(task, "LD306")
    assert st == CheckStatus.skipped and "LLaVA checkpoint" in (reason or "")
    assert found(task, "LD303") == []


# --- LD307 vision-tower-unresolvable -------------------------------------------------------------

def test_ld307_training_machine_path(tmp_path: Path, w: dict[str, Path]) -> None:
    tower = "/mnt/share_1227775/ckpt/clip-vit-large-patch14-336/"
    run = lora_run(tmp_path, w, mm_vision_tower=tower)
    f = one(run, "LD307")
    assert f.path == str(run / "config.json") and f.fix == FixSafety.unsafe
    assert f.evidence["expected"] == "openai/clip-vit-large-patch14-336"
    assert f"ValueError: Unknown vision tower: {tower}" in f.message


def test_ld307_relative_unknown_path_has_no_fix(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, mm_vision_tower="./ckpt/my-tower")
    f = one(run, "LD307")
    assert f.fix == FixSafety.none and f.evidence["expected"] is None


def test_ld307_name_outside_llavas_whitelist(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, mm_vision_tower="google/siglip-so400m-patch14-384")
    f = one(run, "LD307")
    assert "openai" in f.message and "ShareGPT4V" in f.message


@pytest.mark.parametrize("tower", ["openai/clip-vit-large-patch14-336",
                                   "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "LOCAL"])
def test_ld307_resolvable(tmp_path: Path, w: dict[str, Path], tower: str) -> None:
    if tower == "LOCAL":
        (tmp_path / "clip").mkdir()
        tower = str(tmp_path / "clip")
    assert found(lora_run(tmp_path / "r", w, mm_vision_tower=tower), "LD307") == []


# --- LD308 image-newline-missing -----------------------------------------------------------------

def test_ld308_unpad_without_image_newline(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, mm_patch_merge_type="spatial_unpad")
    f = one(run, "LD308")
    assert f.path == str(run / NL) and f.severity == Severity.error
    assert "torch.empty" in f.message and "'model.image_newline'" in f.message


def test_ld308_newline_under_a_dropped_name_points_at_ld305(tmp_path: Path,
                                                            w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, mm_patch_merge_type="spatial_unpad", image_newline=True,
                   non_lora_style="ddp")
    f = one(run, "LD308")
    assert f.evidence["dropped_as"] == ["module.base_model.model.model.image_newline"]
    assert "see LD305" in f.message


def test_ld308_newline_from_non_lora_or_base(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path / "a", w, mm_patch_merge_type="spatial_unpad", image_newline=True)
    assert found(run, "LD308") == []
    task = task_run(tmp_path / "b", w, base=w["llava-unpad"], mm_patch_merge_type="spatial_unpad")
    assert found(task, "LD308") == []
    flat = lora_run(tmp_path / "c", w)
    assert found(flat, "LD308") == []


def test_ld308_wrong_shape(tmp_path: Path, w: dict[str, Path]) -> None:
    run = lora_run(tmp_path, w, mm_patch_merge_type="spatial_unpad")
    save_non_lora(run, {**canonical_tensors(run),
                        "base_model.model.model.image_newline": torch.zeros(32)})
    f = one(run, "LD308")
    assert f.evidence == {"actual": [32], "expected": [64]}
