"""LD201-LD209 on tiny real artifacts: exact code and path for every positive, silence on
healthy runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_doctor.checks.adapter import exact_plain_alpha
from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures import TINY, Dims, build_base, build_lora, build_pretrain
from llava_doctor.models import Consumer, FixSafety, Report, Severity

ADAPTER = "adapter_model.safetensors"
ACFG = "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def run(path: Path, code: str, **kw: object) -> Report:
    return run_checks([path], Options(**kw), select=[code])  # type: ignore[arg-type]


def hits(rep: Report, code: str) -> list[tuple[str, str]]:
    """(code, path relative to the target) of the findings with ``code``."""
    return [(f.code, str(Path(f.path).relative_to(f.target))) for f in rep.findings
            if f.code == code]


def only(rep: Report, code: str):
    found = [f for f in rep.findings if f.code == code]
    assert len(found) == 1, rep.findings
    assert not [f for f in rep.findings if f.code == "LD000"], rep.findings
    return found[0]


def status(rep: Report, code: str) -> tuple[str, str | None]:
    c = next(c for t in rep.targets for c in t.checks if c.code == code)
    return c.status.value, c.reason


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


_DELETE = object()


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Extra artifacts beyond the standard scenarios (each built once for this module)."""
    root = tmp_path_factory.mktemp("adapter")
    a: dict[str, Path] = {}
    a["base"] = build_base(root / "vicuna-tiny-v1.5", TINY)
    a["base-llava"] = build_base(root / "llava-v1.5-tiny", TINY, llava=True,
                                 generation_config="valid")
    a["pretrain"] = build_pretrain(root / "llava-v1.5-tiny-pretrain", TINY, base=a["base"])
    a["pretrain-linear"] = build_pretrain(root / "llava-tiny-linear-pretrain", TINY,
                                          projector_type="linear", base=a["base"])
    healthy = dict(base=a["base"], projector_from=a["pretrain"])
    a["lora"] = build_lora(root / "llava-v1.5-tiny-lora", TINY, **healthy)
    a["rslora"] = build_lora(root / "llava-v1.5-tiny-rslora-lora", TINY, use_rslora=True, r=16,
                             alpha=32, alpha_pattern={"v_proj": 8}, **healthy)
    a["patterns"] = build_lora(root / "llava-v1.5-tiny-pattern-lora", TINY, peft_version="0.21.2",
                               rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
                               alpha_pattern={"v_proj": 32}, **healthy)
    a["linear"] = build_lora(root / "llava-v1.5-tiny-linear-lora", TINY, projector_type="linear",
                             base=a["base"], projector_from=a["pretrain-linear"])
    a["mlp3x"] = build_lora(root / "llava-v1.5-tiny-mlp3x-lora", TINY, projector_type="mlp3x_gelu",
                            base=a["base"])
    a["extras"] = build_lora(root / "llava-v1.5-tiny-extras-lora", TINY, peft_version="0.21.2",
                             embed_lora=True, modules_to_save=["lm_head"], **healthy)
    a["lora-bias"] = build_lora(root / "llava-v1.5-tiny-bias-lora", TINY, peft_version="0.21.2",
                                lora_bias=True, **healthy)
    # base_model_name_or_path is a hub id; --base points at a local copy of that model
    a["hub-id"] = build_lora(root / "llava-v1.5-tiny-hub-lora", TINY, projector_from=a["pretrain"])
    a["pissa"] = build_lora(root / "llava-v1.5-tiny-pissa-lora", TINY, init_lora_weights="pissa",
                            peft_version="0.21.2", **healthy)
    a["replicated"] = build_lora(root / "llava-v1.5-tiny-replicated-lora", TINY,
                                 layer_replication=[[0, 2], [1, 2]], **healthy)
    a["projector-lora"] = build_lora(root / "llava-v1.5-tiny-projtarget-lora", TINY,
                                     base=a["base-llava"], trained_from="llava",
                                     projector_from=a["base-llava"],
                                     target_modules=["q_proj", "v_proj", "mm_projector.0",
                                                     "mm_projector.2"])
    a["untrained"] = build_lora(root / "llava-v1.5-tiny-untrained-lora", TINY, trained=False,
                                **healthy)
    wide = Dims(hidden=96, intermediate=160, layers=2, heads=4, kv_heads=4, vocab=128,
                mm_hidden=32)
    a["wide"] = build_lora(root / "llava-v1.5-wide-lora", wide, base=a["base"])
    return a


# --- healthy runs: nothing from LD2xx -------------------------------------------------------

HEALTHY = ["lora", "rslora", "patterns", "linear", "mlp3x", "extras", "lora-bias"]


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_artifacts_have_no_adapter_findings(art: dict[str, Path], name: str) -> None:
    rep = run_checks([art[name]], Options(base=art["base"], peft_version="0.21.2"),
                     select=["LD2"])
    assert rep.findings == []


@pytest.mark.parametrize("name", ["lora", "lora-bin", "task-lora", "lora-dora-rslora",
                                  "checkpoints-final"])
def test_standard_healthy_scenarios_have_no_adapter_findings(scenarios: dict[str, Path],
                                                             name: str) -> None:
    base = scenarios["base-llava"] if name == "task-lora" else scenarios["base-vicuna"]
    rep = run_checks([scenarios[name]], Options(base=base, peft_version="0.21.2"), select=["LD2"])
    assert rep.findings == []


def test_task_lora_without_base_flag_uses_recorded_base(scenarios: dict[str, Path]) -> None:
    rep = run_checks([scenarios["task-lora"]], Options(peft_version="0.21.2"), select=["LD2"])
    assert rep.findings == []


def test_hub_id_base_with_local_copy(art: dict[str, Path]) -> None:
    recorded = json.loads((art["hub-id"] / ACFG).read_text())["base_model_name_or_path"]
    assert recorded == "lmsys/vicuna-tiny-v1.5"
    rep = run_checks([art["hub-id"]], Options(base=art["base"], peft_version="0.21.2"),
                     select=["LD2"])
    assert rep.findings == []


# --- LD201 ------------------------------------------------------------------------------------

def test_ld201_default_fields_refused_by_old_peft_are_an_error_with_a_safe_fix(
        art: dict[str, Path]) -> None:
    # written by peft 0.10: use_dora (false) and layer_replication (null) are new to 0.8, which
    # refuses the file: LLaVA's merge (and peft's) stops there
    f = only(run(art["lora"], "LD201", peft_version="0.8.0"), "LD201")
    assert (f.code, Path(f.path)) == ("LD201", art["lora"] / ACFG)
    assert f.severity == Severity.error and f.fix == FixSafety.safe
    assert only(run(art["lora"], "LD201", peft_version="0.8.0", consumer=Consumer.peft),
                "LD201").severity == Severity.error
    # llava-doctor merge reads adapter_config.json itself: no peft to refuse it
    assert only(run(art["lora"], "LD201", peft_version="0.8.0", consumer=Consumer.llava_doctor),
                "LD201").severity == Severity.info
    assert set(f.evidence["unknown"]) == {"use_dora", "layer_replication"}
    assert f.evidence["loader"] == "TypeError"
    assert ("`TypeError: LoraConfig.__init__() got an unexpected keyword argument "
            "'layer_replication'`") in f.message
    assert "`llava-doctor fix` removes them (safe)" in f.message


def test_ld201_peft_0_5_ignores_silently(art: dict[str, Path]) -> None:
    f = only(run(art["lora"], "LD201", peft_version="0.5.0"), "LD201")
    assert f.severity == Severity.info  # every unknown key holds its default: harmless
    assert f.evidence["loader"] == "ignores"
    assert {"rank_pattern", "alpha_pattern", "use_rslora", "use_dora"} <= set(f.evidence["default"])
    assert "ignores keys it does not know without a word" in f.message


def test_ld201_newer_writer_on_peft_0_14_warns_and_peft_version_is_harmless(
        scenarios: dict[str, Path], art: dict[str, Path]) -> None:
    f = only(run(art["patterns"], "LD201", peft_version="0.14.0"), "LD201")
    assert f.severity == Severity.info and f.fix == FixSafety.safe  # dropped exactly
    assert f.evidence["loader"] == "warns"
    assert f.evidence["no_math_effect"] == ["peft_version"]
    assert "target_parameters" in f.evidence["default"]
    assert ("Unexpected keyword arguments [...] for class LoraConfig, these are ignored."
            in f.message)


def test_ld201_rslora_on_peft_0_7_is_an_error_with_an_exact_rewrite(art: dict[str, Path]) -> None:
    f = only(run(art["rslora"], "LD201", peft_version="0.7.1"), "LD201")
    assert (f.code, Path(f.path)) == ("LD201", art["rslora"] / ACFG)
    assert f.severity == Severity.error and f.fix == FixSafety.unsafe
    assert f.evidence["changes_math"] == ["use_rslora"]
    rewrite = f.evidence["rewrite"]
    # plain LoRA scale new/r must equal the rslora scale alpha/sqrt(r), bit for bit
    assert rewrite["lora_alpha"] / 16 == 32 / math.sqrt(16)
    assert rewrite["alpha_pattern"]["v_proj"] / 16 == 8 / math.sqrt(16)
    assert "use_rslora=true: scaling alpha/sqrt(r) instead of alpha/r" in f.message


def test_ld201_dora_on_peft_0_8_is_an_error_without_fix(scenarios: dict[str, Path]) -> None:
    f = only(run(scenarios["lora-dora-rslora"], "LD201", peft_version="0.8.0"), "LD201")
    assert f.severity == Severity.error and f.fix == FixSafety.none
    assert "use_dora" in f.evidence["changes_math"]
    assert "upgrade peft to >= " in f.message


def test_ld201_layer_replication_before_0_10_is_an_error(art: dict[str, Path]) -> None:
    f = only(run(art["replicated"], "LD201", peft_version="0.9.0"), "LD201")
    assert f.severity == Severity.error
    assert f.evidence["changes_math"] == ["layer_replication"]


def test_ld201_lora_bias_before_0_14_is_an_error(art: dict[str, Path]) -> None:
    f = only(run(art["lora-bias"], "LD201", peft_version="0.13.2"), "LD201")
    assert f.severity == Severity.error
    assert "lora_bias" in f.evidence["changes_math"]


def test_ld201_unrecognised_key_is_a_warning_without_fix(art: dict[str, Path],
                                                         tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, my_fork_option=3)
    # peft 0.14 drops it with a warning: the merge runs, but maybe not the trained maths
    f = only(run(d, "LD201", peft_version="0.14.0"), "LD201")
    assert f.severity == Severity.warning and f.fix == FixSafety.none
    assert f.evidence["unrecognised"] == ["my_fork_option"]
    # peft 0.10 refuses the file
    f = only(run(d, "LD201", peft_version="0.10.0"), "LD201")
    assert f.severity == Severity.error and f.evidence["loader"] == "TypeError"


def test_ld201_negatives(art: dict[str, Path]) -> None:
    assert run(art["lora"], "LD201", peft_version="0.10.0").findings == []
    assert run(art["rslora"], "LD201", peft_version="0.10.0").findings == []
    assert run(art["patterns"], "LD201", peft_version="0.21.2").findings == []


def test_ld201_without_a_target_peft_names_the_oldest_peft_that_reads_the_file(
        art: dict[str, Path], scenarios: dict[str, Path], tmp_path: Path) -> None:
    # No peft installed and no --peft-version: the merge runs elsewhere, so say what it needs.
    f = only(run(art["lora"], "LD201"), "LD201")
    assert (f.code, Path(f.path)) == ("LD201", art["lora"] / ACFG)
    assert f.severity == Severity.info and f.fix == FixSafety.none
    # written by peft 0.10: layer_replication is its newest field
    assert f.evidence["needs_peft"] == "0.10.0"
    assert f.message == (
        f"{art['lora'] / ACFG} needs peft >= 0.10.0 (its newest field, layer_replication, first "
        "appeared there). No peft is installed here and no --peft-version was given: pass "
        "--peft-version to check against the merge environment's peft")
    g = only(run(scenarios["lora-dora-rslora"], "LD201"), "LD201")
    # written by peft 0.21.2 itself: the issue's own example
    assert g.severity == Severity.info and g.evidence["needs_peft"] == "0.21.0"
    assert "needs peft >= 0.21.0" in g.message
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, my_fork_option=3)
    h = only(run(d, "LD201"), "LD201")
    assert h.evidence["unrecognised"] == ["my_fork_option"]
    assert "my_fork_option is unknown to every peft release up to" in h.message


def test_exact_plain_alpha() -> None:
    for alpha in (1, 7, 16, 32.5, 256, 1000):
        for r in (1, 2, 3, 7, 8, 12, 64, 100, 128):
            assert exact_plain_alpha(alpha, r) / r == alpha / math.sqrt(r)


# --- LD202 ------------------------------------------------------------------------------------

def test_ld202_llava_hf_regex_matches_nothing(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, target_modules=r"language_model\.model\.layers\.\d+\.self_attn\.(q|v)_proj")
    f = only(run(d, "LD202", base=art["base"]), "LD202")
    assert (f.code, Path(f.path)) == ("LD202", d / ACFG)
    assert "not found in the base model" in f.message
    assert f"the base model {art['base']}" in f.message
    assert f.evidence["modules_source"] == "base"


def test_ld202_layers_to_transform_beyond_the_base(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, layers_to_transform=[5], layers_pattern="layers")
    f = only(run(d, "LD202", base=art["base"]), "LD202")
    assert f.evidence["filters"] == {"layers_to_transform": [5], "layers_pattern": "layers"}


def test_ld202_without_base_uses_the_config_layout(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["hub-id"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, target_modules=["c_attn"])
    f = only(run(d, "LD202"), "LD202")
    assert f.evidence["modules_source"] == "config"
    assert f"the Llama layout {d / 'config.json'} describes" in f.message


def test_ld202_negatives(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
    assert run(d, "LD202", base=art["base"]).findings == []
    assert run(art["hub-id"], "LD202").findings == []  # config layout, list targets
    assert status(run(art["hub-id"], "LD202"), "LD202") == ("passed", None)


# --- LD203 ------------------------------------------------------------------------------------

def test_ld203_adapter_for_another_model_size(art: dict[str, Path]) -> None:
    f = only(run(art["wide"], "LD203", base=art["base"]), "LD203")
    assert (f.code, Path(f.path)) == ("LD203", art["wide"] / ADAPTER)
    assert ("`size mismatch for base_model.model.model.layers.0.mlp.down_proj.lora_A.default."
            "weight: copying a param with shape torch.Size([8, 160]) from checkpoint, the shape "
            "in current model is torch.Size([8, 128])`") in f.message
    assert f.evidence["count"] == 2 * 7 * TINY.layers  # every lora_A and lora_B


def test_ld203_rank_disagrees_with_config(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, rank_pattern={"down_proj": 4})
    f = only(run(d, "LD203", base=art["base"], peft_version="0.21.2"), "LD203")
    assert (f.code, Path(f.path)) == ("LD203", d / ACFG)
    assert f.evidence["config_vs_file"] == [[4, 8]]
    assert f.evidence["count"] == TINY.layers


def test_ld203_rank_pattern_read_by_old_peft(art: dict[str, Path]) -> None:
    # "^model..." style anchoring and bare names: the patterns fixture uses a regex key that
    # peft 0.10's `.*\.{key}$` rule also matches, so only a genuinely different reading fires.
    assert run(art["patterns"], "LD203", base=art["base"], peft_version="0.10.0").findings == []
    # peft 0.5 knows no rank_pattern: every module gets r=8, but q_proj/down_proj hold less
    rep = run(art["patterns"], "LD203", base=art["base"], peft_version="0.5.0")
    assert hits(rep, "LD203") == [("LD203", ACFG)]
    assert only(rep, "LD203").evidence["config_vs_file"] == [[8, 2], [8, 4]]


def test_ld203_without_base_uses_config_dims(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["hub-id"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / "config.json", intermediate_size=256)
    f = only(run(d, "LD203"), "LD203")
    assert (f.code, Path(f.path)) == ("LD203", d / ADAPTER)
    assert f.evidence["modules_source"] == "config"
    assert "no base model resolved" in f.message


def test_ld203_negatives(art: dict[str, Path], scenarios: dict[str, Path]) -> None:
    for name in ("lora", "patterns", "extras", "rslora", "lora-bias"):
        assert run(art[name], "LD203", base=art["base"], peft_version="0.21.2").findings == []
    assert run(art["hub-id"], "LD203").findings == []
    assert run(scenarios["lora-dora-rslora"], "LD203", base=scenarios["base-vicuna"]).findings == []


# --- LD204 ------------------------------------------------------------------------------------

def test_ld204_untrained(art: dict[str, Path], scenarios: dict[str, Path]) -> None:
    f = only(run(art["untrained"], "LD204", base=art["base"]), "LD204")
    assert (f.code, Path(f.path)) == ("LD204", art["untrained"] / ADAPTER)
    assert f.severity == Severity.warning
    assert f"all {7 * TINY.layers} lora_B tensors are exactly zero" in f.message
    assert hits(run(scenarios["lora-untrained"], "LD204"), "LD204") == [("LD204", ADAPTER)]


def test_ld204_negatives(art: dict[str, Path], scenarios: dict[str, Path]) -> None:
    assert run(art["lora"], "LD204").findings == []
    assert run(scenarios["lora-bin"], "LD204").findings == []
    rep = run(art["untrained"], "LD204", fast=True)
    assert status(rep, "LD204") == ("skipped", "--fast: tensor values are not read")


def test_ld204_one_trained_b_is_enough(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["untrained"], tmp_path / "llava-v1.5-tiny-lora")
    t = load_file(str(d / ADAPTER))
    t[f"{Q0}.lora_B.weight"][3, 1] = 1e-3
    save_file(t, str(d / ADAPTER), metadata={"format": "pt"})
    assert run(d, "LD204").findings == []


# --- LD205 ------------------------------------------------------------------------------------

def test_ld205_nan_in_adapter(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    t = load_file(str(d / ADAPTER))
    t[f"{Q0}.lora_A.weight"][0, 0] = float("nan")
    t[f"{Q0}.lora_A.weight"][1, 0] = float("inf")
    save_file(t, str(d / ADAPTER), metadata={"format": "pt"})
    f = only(run(d, "LD205"), "LD205")
    assert (f.code, Path(f.path)) == ("LD205", d / ADAPTER)
    assert f"'{Q0}.lora_A.weight' (2 of " in f.message
    assert f.evidence["tensors"] == {f"{Q0}.lora_A.weight": 2}


def test_ld205_inf_in_non_lora_bin(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    nl = torch.load(d / "non_lora_trainables.bin", map_location="cpu", weights_only=True)
    key = "base_model.model.model.mm_projector.2.bias"
    nl[key][5] = float("-inf")
    torch.save(nl, d / "non_lora_trainables.bin")
    assert hits(run(d, "LD205"), "LD205") == [("LD205", "non_lora_trainables.bin")]
    assert f"'{key}' (1 of " in only(run(d, "LD205"), "LD205").message


def test_ld205_nan_in_stage1_projector(art: dict[str, Path], tmp_path: Path) -> None:
    pre = tmp_path / "mm_projector.bin"
    w = torch.load(art["pretrain"] / "mm_projector.bin", map_location="cpu", weights_only=True)
    w["model.mm_projector.0.weight"][0, 0] = float("nan")
    torch.save(w, pre)
    f = only(run(art["lora"], "LD205", projector=pre), "LD205")
    assert Path(f.path) == pre


def test_ld205_negatives(art: dict[str, Path], scenarios: dict[str, Path]) -> None:
    assert run(art["lora"], "LD205", projector=art["pretrain"] / "mm_projector.bin").findings == []
    assert run(scenarios["lora-bin"], "LD205").findings == []
    rep = run(art["lora"], "LD205", fast=True)
    assert status(rep, "LD205") == ("skipped", "--fast: tensor values are not read")


# --- LD206 ------------------------------------------------------------------------------------

def test_ld206_pissa(art: dict[str, Path]) -> None:
    f = only(run(art["pissa"], "LD206"), "LD206")
    assert (f.code, Path(f.path)) == ("LD206", art["pissa"] / ACFG)
    assert 'init_lora_weights is "pissa"' in f.message
    assert "path_initial_model_for_weight_conversion" in f.message


def test_ld206_pissa_tensors_look_converted(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["pissa"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, r=4)  # tensors have rank 8 = 2r
    f = only(run(d, "LD206"), "LD206")
    assert "its tensors have rank 8 = 2r" in f.message


def test_ld206_layer_replication_and_adalora(art: dict[str, Path], tmp_path: Path) -> None:
    f = only(run(art["replicated"], "LD206"), "LD206")
    assert f.evidence == {"field": "layer_replication", "value": [[0, 2], [1, 2]]}
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, peft_type="ADALORA")
    f = only(run(d, "LD206"), "LD206")
    assert (f.code, Path(f.path)) == ("LD206", d / ACFG)
    assert 'peft_type is "ADALORA", not LORA' in f.message


def test_ld206_trainable_tokens(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["patterns"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, trainable_token_indices=[5, 6])
    f = only(run(d, "LD206"), "LD206")
    assert f.evidence["field"] == "trainable_token_indices"


def test_ld206_negatives(art: dict[str, Path], scenarios: dict[str, Path]) -> None:
    for name in ("lora", "rslora", "extras", "patterns", "lora-bias"):
        assert run(art[name], "LD206").findings == []
    assert run(scenarios["lora-dora-rslora"], "LD206").findings == []


# --- LD207 ------------------------------------------------------------------------------------

def _rename_keys(d: Path, old: str, new: str) -> None:
    t = load_file(str(d / ADAPTER))
    save_file({k.replace(old, new, 1): v for k, v in t.items()}, str(d / ADAPTER),
              metadata={"format": "pt"})


def test_ld207_llava_hf_prefix_on_original_base(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    _rename_keys(d, "base_model.model.model.layers.",
                 "base_model.model.language_model.model.layers.")
    f = only(run(d, "LD207", base=art["base"]), "LD207")
    assert (f.code, Path(f.path)) == ("LD207", d / ADAPTER)
    assert f.evidence["count"] == 2 * 7 * TINY.layers
    assert f.evidence["prefix_remap"] == ["language_model.model.", "model."]
    assert ("rewriting 'base_model.model.language_model.model.' to 'base_model.model.model.' in "
            "every key makes them all match") in f.message
    assert "peft drops them silently" in f.message


def test_ld207_adapter_name_left_in_keys(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    _rename_keys(d, ".lora_A.weight", ".lora_A.default.weight")
    f = only(run(d, "LD207", base=art["base"]), "LD207")
    assert f.evidence["count"] == 7 * TINY.layers
    assert f.evidence["unloadable"][0].endswith(".lora_A.default.weight")


def test_ld207_untargeted_module(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    f = only(run(d, "LD207", base=art["base"]), "LD207")
    assert f.evidence["count"] == 2 * 3 * TINY.layers
    assert "target_modules does not select" in f.message
    assert f.evidence["prefix_remap"] is None


def test_ld207_layer_beyond_base_without_base(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["hub-id"], tmp_path / "llava-v1.5-tiny-lora")
    _rename_keys(d, "base_model.model.model.layers.1.", "base_model.model.model.layers.7.")
    f = only(run(d, "LD207"), "LD207")
    assert f.evidence["modules_source"] == "config"
    assert f.evidence["count"] == 14


def test_ld207_negatives(art: dict[str, Path], scenarios: dict[str, Path]) -> None:
    for name in ("lora", "extras", "patterns", "linear", "mlp3x", "lora-bias"):
        assert run(art[name], "LD207", base=art["base"]).findings == []
    assert run(art["projector-lora"], "LD207", base=art["base-llava"]).findings == []
    # the projector LLaVA builds from config.json is targetable even on a vicuna base
    assert run(art["projector-lora"], "LD207", base=art["base"]).findings == []
    assert run(scenarios["task-lora"], "LD207", base=scenarios["base-llava"]).findings == []


# --- LD208 ------------------------------------------------------------------------------------

def test_ld208_qlora_config(scenarios: dict[str, Path]) -> None:
    f = only(run(scenarios["lora-qlora"], "LD208"), "LD208")
    assert (f.code, Path(f.path)) == ("LD208", scenarios["lora-qlora"] / "config.json")
    assert f.severity == Severity.error and f.fix == FixSafety.safe  # LLaVA's merge: 4-bit base
    assert only(run(scenarios["lora-qlora"], "LD208", consumer=Consumer.llava_doctor),
                "LD208").severity == Severity.info
    assert "loads the base 4-bit" in f.message
    assert f.evidence["quant_method"] == "bitsandbytes"


def test_ld208_bare_load_in_8bit(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / "config.json", load_in_8bit=True)
    f = only(run(d, "LD208"), "LD208")
    assert "loads the base 8-bit" in f.message


def test_ld208_negatives(art: dict[str, Path], scenarios: dict[str, Path]) -> None:
    assert run(art["lora"], "LD208").findings == []
    assert run(scenarios["task-lora"], "LD208").findings == []


# --- LD209 ------------------------------------------------------------------------------------

def test_ld209_projector_lora(art: dict[str, Path]) -> None:
    f = only(run(art["projector-lora"], "LD209", base=art["base-llava"]), "LD209")
    assert (f.code, Path(f.path)) == ("LD209", art["projector-lora"] / ADAPTER)
    assert f.severity == Severity.info
    assert f.evidence["part"] == "projector" and f.evidence["count"] == 4
    assert "on top of the projector loaded from non_lora_trainables.bin" in f.message


def test_ld209_vision_tower_lora(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    t = load_file(str(d / ADAPTER))
    pre = "base_model.model.model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn"
    t[f"{pre}.q_proj.lora_A.weight"] = torch.zeros(8, 32, dtype=torch.bfloat16)
    t[f"{pre}.q_proj.lora_B.weight"] = torch.zeros(32, 8, dtype=torch.bfloat16)
    save_file(t, str(d / ADAPTER), metadata={"format": "pt"})
    rep = run_checks([d], Options(base=art["base"]), select=["LD207", "LD209"])
    assert hits(rep, "LD209") == [("LD209", ADAPTER)]
    assert hits(rep, "LD207") == []  # tower keys are LD209's, not an error
    f = only(rep, "LD209")
    # no unfreeze_mm_vision_tower: LLaVA delay-loads the tower and drops the trained deltas;
    # this vicuna base holds no tower either, so llava-doctor merge drops them too
    assert ("config.json has no unfreeze_mm_vision_tower: true, so LLaVA's builder "
            "delay-loads the tower, peft finds no module for these keys and drops them") \
        in f.message
    assert "`llava-doctor merge` drops them and says so" in f.message
    assert f.severity == Severity.warning and f.evidence["count"] == 2
    assert only(run_checks([d], Options(base=art["base"], consumer=Consumer.llava_doctor),
                           select=["LD209"]), "LD209").severity == Severity.warning
    assert only(run_checks([d], Options(base=art["base"], consumer=Consumer.peft),
                           select=["LD209"]), "LD209").severity == Severity.info

    # v1.6 configs unfreeze the tower: LLaVA builds it with the model and peft merges them
    edit_json(d / "config.json", unfreeze_mm_vision_tower=True)
    f = only(run_checks([d], Options(base=art["base"]), select=["LD209"]), "LD209")
    assert ("unfreeze_mm_vision_tower: true, so LLaVA's builder loads the tower while building "
            "the model, peft merges these deltas and the merged checkpoint holds the merged "
            "tower") in f.message
    assert f.severity == Severity.info and f.evidence["unfreeze_mm_vision_tower"] is True
    assert "delay-loads" not in f.message


def test_ld209_negatives(art: dict[str, Path], scenarios: dict[str, Path]) -> None:
    assert run(art["lora"], "LD209").findings == []
    assert run(scenarios["task-lora"], "LD209").findings == []


def test_ld203_invalid_pattern_regex_is_reported_not_a_crash(art: dict[str, Path],
                                                             tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, rank_pattern={"q_proj(": 4})
    f = only(run(d, "LD203", base=art["base"]), "LD203")
    assert (f.code, Path(f.path)) == ("LD203", d / ACFG)
    assert "is not a valid regular expression" in f.message


def test_ld202_invalid_regex(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, target_modules="model.(q_proj")
    f = only(run(d, "LD202", base=art["base"]), "LD202")
    assert (f.code, Path(f.path)) == ("LD202", d / ACFG)
    assert "is not a valid regular expression" in f.message
    assert run_checks([d], Options(base=art["base"]), select=["LD207"]).findings == []


def test_ld206_unrecognised_set_field(art: dict[str, Path], tmp_path: Path) -> None:
    d = copy(art["lora"], tmp_path / "llava-v1.5-tiny-lora")
    edit_json(d / ACFG, my_fork_option=3, my_fork_unused=None)
    f = only(run(d, "LD206"), "LD206")
    assert f.evidence == {"field": "my_fork_option", "value": 3, "unrecognised": True}
