"""Numbers a config declares never drive unbounded work: out-of-range sizes are findings, and
the LoRA scaling is checked to be finite and within the output dtype."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from check_helpers import edit_json, found, one

from llava_doctor.artifacts.llava import (
    MAX_PROJECTOR_DEPTH,
    declared_depth,
    expected_projector,
    projector_layout,
)
from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.models import Consumer

WHOLE_PROCESS_S = 5.0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "llava_doctor", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture
def run(scenarios: dict[str, Path], tmp_path: Path) -> Path:
    d = tmp_path / "llava-v1.5-declared-lora"
    shutil.copytree(scenarios["lora"], d)
    return d


def _timed_check(d: Path, *extra: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    r = _cli("check", str(d), "--format", "json", *extra)
    return time.monotonic() - t0, r


def _codes(r: subprocess.CompletedProcess[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in json.loads(r.stdout)["findings"]:
        out.setdefault(f["code"], []).append(f)
    return out


# --- the two rows of the issue, as whole commands -----------------------------------------------

@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_huge_projector_depth_is_a_finding_not_work(run: Path, scenarios: dict[str, Path],
                                                    with_base: bool) -> None:
    edit_json(run / "config.json", mm_projector_type="mlp100000000x_gelu")
    extra = ["--base", str(scenarios["base-vicuna"])] if with_base else []
    if not with_base:
        edit_json(run / "adapter_config.json", base_model_name_or_path="nowhere/none")
    took, r = _timed_check(run, "--fast", *extra)
    assert took < WHOLE_PROCESS_S, f"{took:.2f} s"
    assert r.returncode == 1, r.stderr
    codes = _codes(r)
    assert "LD000" not in codes
    f = codes["LD301"][0]
    assert f["severity"] == "error"
    assert "mm_projector_type is 'mlp100000000x_gelu'" in f["message"]
    assert "declares 100,000,000 projector layers (over 256, far beyond any LLaVA projector) " \
           "while the weights hold 2 layer(s)" in f["message"]
    assert f["evidence"]["expected"] == "mlp2x_gelu" and f["fix"] == "safe"


def test_huge_lora_alpha_is_a_finding(run: Path, scenarios: dict[str, Path]) -> None:
    edit_json(run / "adapter_config.json", lora_alpha=1e308)
    took, r = _timed_check(run, "--fast", "--base", str(scenarios["base-vicuna"]))
    assert took < WHOLE_PROCESS_S, f"{took:.2f} s"
    assert r.returncode == 1, r.stderr
    f = _codes(r)["LD205"][0]
    assert f["severity"] == "error"
    assert ("lora_alpha / r = 1e+308 / 8, is 1.25e+307, beyond float32's range (3.403e+38): "
            "peft's merge multiplies every delta B @ A by it in float32, so the merged weights "
            "would be inf or NaN") in f["message"]
    assert f["evidence"]["count"] == 14 and f["evidence"]["scaling"] == "1.25e+307"


def test_both_rows_with_values_read_in_process(run: Path, scenarios: dict[str, Path]) -> None:
    """The full check (values read) on each row, timed in-process: findings, not work."""
    for fname, key, value, code in (("config.json", "mm_projector_type", "mlp100000000x_gelu",
                                     "LD301"),
                                    ("adapter_config.json", "lora_alpha", 1e308, "LD205")):
        original = (run / fname).read_bytes()
        edit_json(run / fname, **{key: value})
        t0 = time.monotonic()
        rep = run_checks([run], Options(base=scenarios["base-vicuna"]))
        assert time.monotonic() - t0 < WHOLE_PROCESS_S
        assert rep.exit_code() == 1
        assert code in {f.code for f in rep.findings}
        assert "LD000" not in {f.code for f in rep.findings}
        (run / fname).write_bytes(original)


# --- sizes out of any model's range ----------------------------------------------------------

@pytest.mark.parametrize("key,value,shown", [
    ("num_hidden_layers", 10**9, "1000000000"),
    ("hidden_size", -64, "-64"),
    ("vocab_size", 10**15, "1000000000000000"),
    ("mm_hidden_size", 10**12, "1000000000000"),
    ("intermediate_size", 0, "0"),
    ("num_attention_heads", 2.0**40, "1099511627776.0"),
    ("num_key_value_heads", 10**40, "a 41-digit number"),
])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_size_out_of_range_is_ld501(run: Path, scenarios: dict[str, Path], key: str, value,
                                    shown: str, with_base: bool) -> None:
    edit_json(run / "config.json", **{key: value})
    opts = {"base": scenarios["base-vicuna"]} if with_base else {}
    if not with_base:
        edit_json(run / "adapter_config.json", base_model_name_or_path="nowhere/none")
    t0 = time.monotonic()
    rep = run_checks([run], Options(fast=True, **opts))
    assert time.monotonic() - t0 < 2.0
    assert not [f for f in rep.findings if f.code == "LD000"]
    f = next(f for f in rep.findings if f.code == "LD501")
    assert f.evidence == {"rule": "size-out-of-range"}
    assert f"declares a size no model has: {key} is {shown}, outside any model's range" \
        in f.message


def test_sizes_inside_text_config_are_checked_too(run: Path) -> None:
    edit_json(run / "config.json", text_config={"hidden_size": 64, "num_hidden_layers": -1},
              vision_config={"hidden_size": 32})
    f = one(run, "LD501", fast=True)
    assert "text_config.num_hidden_layers is -1" in f.message


def test_a_number_json_cannot_hold_is_ld501(run: Path) -> None:
    (run / "config.json").write_text('{"hidden_size": ' + "9" * 5000 + "}")
    f = one(run, "LD501", fast=True)
    assert "holds a number Python refuses to read" in f.message


def test_a_ten_thousand_digit_depth(run: Path) -> None:
    edit_json(run / "config.json", mm_projector_type="mlp" + "9" * 10_000 + "x_gelu")
    f = one(run, "LD301", fast=True)
    assert "mm_projector_type is 'mlp999" in f.message and "(10,009 characters)" in f.message
    assert "declares at least 10^9999 projector layers" in f.message


def test_depth_parsing_is_bounded() -> None:
    assert declared_depth("mlp2x_gelu") == 2
    assert declared_depth("mlp2x_res3x_gelu") == 5
    assert declared_depth("linear") is None
    assert declared_depth("mlp" + "1" * 5000 + "x_gelu") == 10**4999  # no int() of 5000 digits
    assert expected_projector(f"mlp{MAX_PROJECTOR_DEPTH}x_gelu", 4, 2) is not None
    assert expected_projector(f"mlp{MAX_PROJECTOR_DEPTH + 1}x_gelu", 4, 2) is None
    assert expected_projector("mlp100000000x_res2x_gelu", 4, 2) is None
    # LLaVA's builder makes one Linear for mlp0x as for mlp1x
    assert projector_layout("mlp0x_gelu", 4, 2).keys == projector_layout("mlp1x_gelu", 4, 2).keys


# --- the LoRA scaling ------------------------------------------------------------------------

@pytest.mark.parametrize("changes,what", [
    ({"r": 0}, "lora_alpha / r = 16.0 / 0, has no value"),
    ({"lora_alpha": float("nan")}, "lora_alpha / r = nan / 8, has no value"),
    ({"lora_alpha": float("inf")}, "lora_alpha / r = inf / 8, is infinite"),
    ({"use_rslora": True, "r": -4}, "lora_alpha / sqrt(r) = 16.0 / sqrt(-4), has no value"),
])
def test_scaling_without_a_finite_value(run: Path, changes: dict, what: str) -> None:
    data = json.loads((run / "adapter_config.json").read_text())
    data.update(changes)
    (run / "adapter_config.json").write_text(json.dumps(data))  # NaN/Infinity literals
    f = one(run, "LD205", fast=True)
    assert what in f.message


def test_pattern_overrides_are_checked_per_module(run: Path) -> None:
    edit_json(run / "adapter_config.json",
              alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 1e300},
              rank_pattern={r"model\.layers\.0\.mlp\.down_proj": 0})
    f = one(run, "LD205", fast=True)
    assert f.evidence["count"] == 2
    assert set(f.evidence["modules"]) == {"model.layers.1.self_attn.q_proj",
                                          "model.layers.0.mlp.down_proj"}


def _max_abs(path: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    return {k: float(v.double().abs().max()) for k, v in load_file(str(path)).items()}


def test_delta_bound_from_the_scanned_magnitudes(run: Path) -> None:
    edit_json(run / "adapter_config.json", lora_alpha=1e8)
    f = one(run, "LD503")
    # LLaVA's merge writes float16: an error for it; llava-doctor merge takes --dtype
    assert f.severity.value == "error"
    assert one(run, "LD503", consumer=Consumer.llava_doctor).severity.value == "warning"
    mx = _max_abs(run / "adapter_model.safetensors")
    s = 1e8 / 8
    prefix = "base_model.model."
    want = {k[len(prefix):-len(".lora_B.weight")]:
            s * 8 * mx[k] * mx[k.replace("lora_B", "lora_A")]
            for k in mx if k.endswith("lora_B.weight")}
    over = {m: b for m, b in want.items() if b > 65504}
    assert f.evidence["count"] == len(over) > 0
    worst = max(over, key=lambda m: over[m])
    assert math.isclose(f.evidence["bound"], over[worst], rel_tol=1e-6)
    assert f"can reach up to {over[worst]:.4g}" in f.message
    assert f"'{worst}'), beyond float16's 65504" in f.message
    # a healthy scaling stays far below the bound: no finding
    edit_json(run / "adapter_config.json", lora_alpha=16)
    assert found(run, "LD503") == []


def test_delta_bound_beyond_float32_is_an_error(run: Path) -> None:
    """A finite scaling that overflows float32 only with these tensors' magnitudes."""
    from safetensors.torch import load_file, save_file

    path = run / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key] * 1e6
    tensors[key.replace("lora_B", "lora_A")] = tensors[key.replace("lora_B", "lora_A")] * 1e6
    save_file(tensors, str(path), metadata={"format": "pt"})
    edit_json(run / "adapter_config.json", lora_alpha=8e30)  # scaling 1e30 < float32 max
    assert found(run, "LD205") == []
    f = next(f for f in found(run, "LD503") if "scaling * B @ A" in f.message)
    assert f.severity.value == "error"
    assert "'model.layers.0.self_attn.q_proj'), beyond float32's range too: even a float32 " \
           "merge may write inf" in f.message


def test_a_token_id_of_thousands_of_digits(run: Path, scenarios: dict[str, Path],
                                           tmp_path: Path) -> None:
    base = tmp_path / "vicuna-huge-id"
    shutil.copytree(scenarios["base-vicuna"], base)
    tc = json.loads((base / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {"9" * 5000: {"content": "<x>"}, "40": {"content": "<y>"}}
    (base / "tokenizer_config.json").write_text(json.dumps(tc))
    rep = run_checks([run], Options(base=base, fast=True))
    assert not [f for f in rep.findings if f.code == "LD000"], rep.findings


@pytest.mark.parametrize("changes", [{"r": 10**400}, {"lora_alpha": float("nan")},
                                     {"alpha_pattern": {"q_proj": float("inf")}}])
def test_rslora_rewrite_of_extreme_numbers_is_refused_not_crashed(run: Path, changes) -> None:
    data = json.loads((run / "adapter_config.json").read_text())
    data.update({"use_rslora": True, **changes})
    (run / "adapter_config.json").write_text(json.dumps(data))
    rep = run_checks([run], Options(fast=True, peft_version="0.7.0"))
    assert not [f for f in rep.findings if f.code == "LD000"], rep.findings
    ld201 = [f for f in rep.findings if f.code == "LD201"]
    assert ld201 and all("rewrite" not in f.evidence for f in ld201)
    from llava_doctor.fixes import plan_fixes

    _, plan = plan_fixes(run, Options(fast=True, peft_version="0.7.0"), allow_unsafe=True)
    assert not [c for c in plan.changes if c.code == "LD201"]
    assert [u for u in plan.unfixable if u.code == "LD201"]
