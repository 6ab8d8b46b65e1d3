"""llava-hf runs: family detection, LD701-LD706, and the reused checks, on fixtures written by
transformers 5.x + peft 0.2x (hf5) and transformers 4.46.3 + peft 0.13.2 (hf4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from check_helpers import edit_json, found, one
from hf_support import World
from safetensors.torch import load_file, save_file

from llava_doctor.artifacts.discovery import Family, base_family, lora_family
from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.models import CheckStatus, Severity

T5 = "5.24.0"
T4 = "4.46.3"
ADAPTER = "adapter_model.safetensors"
ACFG = "adapter_config.json"


def _rewrite(path: Path, fn) -> None:  # noqa: ANN001
    t = load_file(str(path))
    save_file(fn(t), str(path), metadata={"format": "pt"})


def test_family_from_files(hf5: World, scenarios: dict[str, Path], tmp_path: Path) -> None:
    assert lora_family(hf5.adapters["lm"]) == Family.llava_hf  # auto_mapping names the class
    ad = hf5.copy("names", tmp_path)
    edit_json(ad / ACFG, auto_mapping=None, task_type="CAUSAL_LM")
    assert lora_family(ad) == Family.llava  # nothing in the config says llava-hf ...
    keys = load_file(str(ad / ADAPTER))
    assert lora_family(ad, keys) == Family.llava_hf  # ... its key paths do
    assert run_checks([ad], Options(), select=["LD1"]).targets[0].family == "llava-hf"
    assert lora_family(scenarios["lora"]) == Family.llava
    cfg = json.loads((hf5.bases["llava_next"] / "config.json").read_text())
    assert base_family(cfg) == Family.llava_hf
    vic = json.loads((scenarios["base-vicuna"] / "config.json").read_text())
    assert base_family(vic) == Family.llm
    llava = json.loads((scenarios["base-llava"] / "config.json").read_text())
    assert base_family(llava) == Family.llava


@pytest.mark.usefixtures("needs_processors")
def test_healthy_trl_style_run_is_not_taken_for_broken_llava(hf5: World) -> None:
    # The regression: a healthy llava-hf adapter got LD101 and LD104 errors.
    rep = run_checks([hf5.adapters["mts"]], Options(base=hf5.bases["llava"],
                                                    transformers_version=T5))
    target = rep.targets[0]
    assert target.family == "llava-hf"
    status = {c.code: c for c in target.checks}
    for code in ("LD101", "LD104", "LD106", "LD301", "LD302"):
        assert status[code].status == CheckStatus.skipped
        assert status[code].reason == "does not apply to llava-hf runs"
    assert not [f for f in rep.findings if f.severity != Severity.info]


def test_no_llava_hf_check_fires_on_an_original_run(scenarios: dict[str, Path]) -> None:
    rep = run_checks([scenarios["lora"]], Options(base=scenarios["base-vicuna"],
                                                  transformers_version=T5))
    assert rep.targets[0].family == "llava"
    for c in rep.targets[0].checks:
        if c.code.startswith("LD7"):
            assert (c.status, c.reason) == (CheckStatus.skipped, "does not apply to llava runs")
    assert not [f for f in rep.findings if f.code.startswith("LD7")]


def _strict_clean(path: Path, base: Path, version: str) -> None:
    rep = run_checks([path], Options(base=base, transformers_version=version))
    bad = [f for f in rep.findings if f.severity != Severity.info]
    assert not bad, [(f.code, f.message) for f in bad]
    assert rep.exit_code(Severity.warning) == 0


@pytest.mark.parametrize("name", ["lm", "mts", "all-linear", "names", "dora", "next-mts",
                                  "next-all-linear"])
def test_healthy_runs_have_no_warning(hf5: World, hf4: World, name: str) -> None:
    arch = "llava_next" if name.startswith("next") else "llava"
    assert hf5.proc, "processor files come from the 4.46 venv"
    _strict_clean(hf5.adapters[name], hf5.bases[arch], T5)
    _strict_clean(hf4.adapters[name], hf4.bases[arch], T4)
    # a 4.46 adapter without projector tensors is portable: transformers 5 reads it too (not
    # "mts": projector modules_to_save; not "all-linear": projector LoRA; LD701)
    if name in ("lm", "names", "dora"):
        _strict_clean(hf4.adapters[name], hf4.bases[arch], T5)


def test_cli_strict_on_a_healthy_run(hf5: World, hf4: World, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    from llava_doctor.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["check", str(hf5.adapters["lm"]), "--base", str(hf5.bases["llava"]), "--strict",
              "--isolated", "--transformers-version", T5, "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0, out["findings"]
    assert out["targets"][0]["family"] == "llava-hf"


# --- LD701 ----------------------------------------------------------------------------------

def test_ld701_pre452_modules_to_save_under_5(hf4: World) -> None:
    f = one(hf4.adapters["mts"], "LD701", base=hf4.bases["llava"], transformers_version=T5)
    assert (f.severity, Path(f.path)) == (Severity.error, hf4.adapters["mts"] / ADAPTER)
    assert f.evidence["layout"] == "canonical" and f.evidence["target_layout"] == "runtime-5"
    assert len(f.evidence["crash"]) == 4 and not f.evidence["dropped"]
    assert ("loading fails with `KeyError: 'base_model.model.model.multi_modal_projector."
            "linear_") in f.message
    assert not found(hf4.adapters["mts"], "LD701", base=hf4.bases["llava"],
                     transformers_version=T4)


def test_ld701_pre452_all_linear_under_5(hf4: World) -> None:
    f = one(hf4.adapters["all-linear"], "LD701", base=hf4.bases["llava"],
            transformers_version=T5)
    assert not f.evidence["crash"]
    dropped = f.evidence["dropped"]
    assert sorted(dropped) == sorted(f"base_model.model.multi_modal_projector.linear_{i}.lora_{m}"
                                     ".weight" for i in (1, 2) for m in "AB")
    assert "silently not applied" in f.message


def test_ld701_new_adapter_and_new_checkpoint_under_446(hf5: World) -> None:
    fs = found(hf5.adapters["lm"], "LD701", base=hf5.bases["llava"], transformers_version=T4)
    assert [f.evidence["what"] for f in fs] == ["adapter", "base"]
    ad, base = fs
    assert ad.evidence["layout"] == "runtime-5" or ad.evidence["layout"] == "runtime-4.52"
    assert ad.evidence["count"] == 28 and ad.fix.value == "safe"
    assert base.evidence["layout"] == "saved-5" and base.fix.value == "none"
    assert "randomly initialised vision tower" in base.message


def test_ld701_info_without_target(hf5: World) -> None:
    fs = found(hf5.adapters["lm"], "LD701", base=hf5.bases["llava"])
    assert {f.severity for f in fs} == {Severity.info}
    assert not found(hf5.adapters["lm"], "LD701", base=hf5.bases["llava"],
                     transformers_version=T5)


# --- LD702 / LD703 --------------------------------------------------------------------------

@pytest.mark.usefixtures("needs_processors")
def test_ld702_ld703_missing_files(hf5: World, tmp_path: Path) -> None:
    base = hf5.copy_base("llava", tmp_path)
    for n in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
        (base / n).unlink()
    f = one(hf5.adapters["lm"], "LD702", base=base)
    assert (f.severity, Path(f.path)) == (Severity.warning, base)
    g = one(hf5.adapters["lm"], "LD703", base=base)
    assert g.severity == Severity.warning and "no chat template" in g.message
    # the adapter dir's own files count (trainers save them there)
    ad = hf5.copy("lm", tmp_path)
    shutil.copyfile(hf5.bases["llava"] / "chat_template.json", ad / "chat_template.json")
    shutil.copyfile(hf5.bases["llava"] / "processor_config.json", ad / "processor_config.json")
    assert not found(ad, "LD703", base=base)
    assert not found(ad, "LD702", base=base, transformers_version=T5)
    # transformers 4.x cannot build an image processor from processor_config.json alone
    f = one(ad, "LD702", base=base, transformers_version=T4)
    assert "cannot build the image processor" in f.message


@pytest.mark.usefixtures("needs_processors")
def test_ld702_ld703_healthy(hf5: World) -> None:
    assert not found(hf5.adapters["lm"], "LD702", base=hf5.bases["llava"])
    assert not found(hf5.adapters["lm"], "LD703", base=hf5.bases["llava"])


# --- LD704 -----------------------------------------------------------------------------------

@pytest.mark.usefixtures("needs_processors")
def test_ld704_processor_saved_by_446_read_by_5(hf5: World, tmp_path: Path) -> None:
    base = hf5.copy_base("llava", tmp_path)
    shutil.copyfile(hf5.proc["raw-llava"] / "processor_config.json",
                    base / "processor_config.json")
    f = one(hf5.adapters["lm"], "LD704", base=base, transformers_version=T5)
    assert (f.severity, Path(f.path)) == (Severity.error, base / "processor_config.json")
    assert (f.evidence["tokens"], f.evidence["features"]) == (3, 4)
    assert "`Image features and image tokens do not match: tokens: 3, features 4`" in f.message
    assert f.evidence["expected"] == {"patch_size": 14, "vision_feature_select_strategy":
                                      "default", "num_additional_image_tokens": 1}
    assert not found(hf5.adapters["lm"], "LD704", base=base, transformers_version=T4)
    assert not found(hf5.adapters["lm"], "LD704", base=hf5.bases["llava"], transformers_version=T5)


@pytest.mark.usefixtures("needs_processors")
def test_ld704_patch_size_in_adapter_dir(hf5: World, tmp_path: Path) -> None:
    ad = hf5.copy("lm", tmp_path)
    shutil.copyfile(hf5.bases["llava"] / "processor_config.json", ad / "processor_config.json")
    edit_json(ad / "processor_config.json", patch_size=7)
    f = one(ad, "LD704", base=hf5.bases["llava"], transformers_version=T5)
    assert Path(f.path) == ad / "processor_config.json"
    assert (f.evidence["tokens"], f.evidence["features"]) == (16, 4)


# --- LD705 -----------------------------------------------------------------------------------

@pytest.mark.usefixtures("needs_processors")
def test_ld705_index_past_embeddings_and_tokenizer_disagrees(hf5: World, tmp_path: Path) -> None:
    base = hf5.copy_base("llava", tmp_path)
    edit_json(base / "config.json", image_token_index=300)
    fs = found(hf5.adapters["lm"], "LD705", base=base)
    assert len(fs) == 2
    assert fs[0].evidence == {"image_token_index": 300, "rows": 192}
    assert fs[1].evidence["tokenizer_id"] == 128
    edit_json(base / "config.json", image_token_index=127)
    f = one(hf5.adapters["lm"], "LD705", base=base)
    assert "gives <image> the id 128" in f.message
    assert not found(hf5.adapters["lm"], "LD705", base=hf5.bases["llava"])


# --- LD706 -----------------------------------------------------------------------------------

@pytest.mark.usefixtures("needs_processors")
def test_ld706_grid_pinpoints(hf5: World, tmp_path: Path) -> None:
    base = hf5.copy_base("llava_next", tmp_path)
    edit_json(base / "preprocessor_config.json", image_grid_pinpoints=[[28, 56], [56, 28]])
    f = one(hf5.adapters["next-mts"], "LD706", base=base)
    assert (f.severity, Path(f.path)) == (Severity.error, base / "preprocessor_config.json")
    assert f.evidence["config"] == [[28, 56], [56, 28], [56, 56]]
    assert not found(hf5.adapters["next-mts"], "LD706", base=hf5.bases["llava_next"])


# --- reused checks on llava-hf runs -----------------------------------------------------------

def test_ld105_zero3_modules_to_save(hf5: World, tmp_path: Path) -> None:
    ad = hf5.copy("mts", tmp_path)
    key = "base_model.model.model.multi_modal_projector.linear_1.weight"
    _rewrite(ad / ADAPTER, lambda t: {**t, key: torch.empty(0)})
    f = one(ad, "LD105", base=hf5.bases["llava"])
    assert f.evidence["empty_tensors"] == [key]
    assert not found(hf5.adapters["mts"], "LD105", base=hf5.bases["llava"])


def test_ld202_regex_for_the_other_layout(hf5: World, hf4: World, tmp_path: Path) -> None:
    ad = hf5.copy("lm", tmp_path)
    # axolotl's documented regex: matches module names only from transformers 4.52
    edit_json(ad / ACFG, target_modules=r"model.language_model.layers.[\d]+.(mlp|self_attn)."
                                        r"(up|down|gate|q|k|v)_proj")
    f = one(ad, "LD202", base=hf5.bases["llava"], transformers_version=T4)
    assert "module names of transformers 4.46.3" in f.message
    assert not found(ad, "LD202", base=hf5.bases["llava"], transformers_version=T5)
    edit_json(ad / ACFG, target_modules="all-linear", exclude_modules=r".*")
    assert one(ad, "LD202", base=hf5.bases["llava"], transformers_version=T5)
    edit_json(ad / ACFG, target_modules=["language_model.layers.0.self_attn.q_proj"],
              exclude_modules=None)  # a full path (LLaMA-Factory) in the 5.x naming
    assert one(ad, "LD202", base=hf5.bases["llava"], transformers_version=T4)
    assert not found(ad, "LD202", base=hf5.bases["llava"], transformers_version=T5)
    for name in ("all-linear", "names"):
        assert not found(hf4.adapters[name], "LD202", base=hf4.bases["llava"],
                         transformers_version=T5)


def test_ld203_ld207_shapes_and_keys(hf5: World, tmp_path: Path) -> None:
    ad = hf5.copy("lm", tmp_path)
    a = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(ad / ADAPTER, lambda t: {**t, a: torch.zeros(4, 48)})
    f = one(ad, "LD203", base=hf5.bases["llava"])
    assert f.evidence["mismatches"][0]["key"] == a
    ad2 = hf5.copy("names", tmp_path)
    _rewrite(ad2 / ADAPTER, lambda t: {k.replace("layers.1.", "layers.7."): v
                                       for k, v in t.items()})
    g = one(ad2, "LD207", base=hf5.bases["llava"])
    assert all(".layers.7." in k for k in g.evidence["missing_module"])
    for name in ("lm", "all-linear", "names", "dora"):
        assert not found(hf5.adapters[name], "LD203", base=hf5.bases["llava"])
        assert not found(hf5.adapters[name], "LD207", base=hf5.bases["llava"])


def test_ld204_ld205_values(hf5: World, tmp_path: Path) -> None:
    ad = hf5.copy("lm", tmp_path)
    _rewrite(ad / ADAPTER, lambda t: {k: (torch.zeros_like(v) if "lora_B" in k else v)
                                      for k, v in t.items()})
    assert one(ad, "LD204", base=hf5.bases["llava"]).severity == Severity.warning
    ad2 = hf5.copy("mts", tmp_path)
    key = "base_model.model.model.multi_modal_projector.linear_2.bias"
    _rewrite(ad2 / ADAPTER, lambda t: {**t, key: torch.full_like(t[key], float("nan"))})
    f = one(ad2, "LD205", base=hf5.bases["llava"])
    assert list(f.evidence["tensors"]) == [key]


def test_ld206_pissa(hf5: World, tmp_path: Path) -> None:
    ad = hf5.copy("lm", tmp_path)
    edit_json(ad / ACFG, init_lora_weights="pissa")
    assert one(ad, "LD206", base=hf5.bases["llava"]).severity == Severity.error
    assert not found(hf5.adapters["lm"], "LD206", base=hf5.bases["llava"])


@pytest.mark.usefixtures("needs_processors")
def test_ld403_tokenizer_longer_than_embeddings(hf5: World, tmp_path: Path) -> None:
    ad = hf5.copy("lm", tmp_path)
    for n in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json"):
        shutil.copyfile(hf5.bases["llava"] / n, ad / n)
    assert not found(ad, "LD403", base=hf5.bases["llava"])
    edit_json(ad / "added_tokens.json", **{"<extra>": 250})
    f = one(ad, "LD403", base=hf5.bases["llava"])
    assert (f.evidence["tokenizer_length"], f.evidence["rows"]) == (251, 192)
    assert Path(f.path) == ad


def test_ld407_across_families(hf5: World, scenarios: dict[str, Path]) -> None:
    f = one(hf5.adapters["lm"], "LD407", base=scenarios["base-vicuna"])
    assert (f.severity, f.evidence["given"]) == (Severity.error, "llm")
    g = one(hf5.adapters["lm"], "LD407", base=scenarios["base-llava"])
    assert g.evidence["given"] == "llava"
    h = one(scenarios["lora"], "LD407", base=hf5.bases["llava"])
    assert (h.severity, h.evidence["given"]) == (Severity.error, "llava-hf")
    assert not found(hf5.adapters["lm"], "LD407", base=hf5.bases["llava"])


def test_inspect_names_family_and_layout(hf5: World, hf4: World) -> None:
    from llava_doctor.inspect_ import inspect_path, render_inspect_text

    rep = inspect_path(hf5.bases["llava"])
    assert (rep.kind, rep.family, rep.layout) == ("model", "llava-hf", "saved-5")
    assert (inspect_path(hf4.bases["llava"]).layout) == "canonical"
    ad = inspect_path(hf4.adapters["mts"])
    assert (ad.kind, ad.family, ad.layout) == ("lora-output", "llava-hf", "canonical")
    assert render_inspect_text(ad).splitlines()[0].endswith(
        "(lora-output, llava-hf, canonical key layout)")


def test_ld501_truncated_adapter_on_a_llava_hf_run(hf5: World, tmp_path: Path) -> None:
    ad = hf5.copy("mts", tmp_path)
    data = (ad / ADAPTER).read_bytes()
    (ad / ADAPTER).write_bytes(data[: len(data) // 2])
    f = one(ad, "LD501", base=hf5.bases["llava"])
    assert Path(f.path) == ad / ADAPTER
    rep = run_checks([ad], Options(base=hf5.bases["llava"], transformers_version=T5))
    assert rep.targets[0].family == "llava-hf"  # still told apart: modules_to_save names it
    assert "LD000" not in {f.code for f in rep.findings}
    assert not found(hf5.adapters["mts"], "LD501", base=hf5.bases["llava"])


def test_text_report_names_the_family(hf5: World, scenarios: dict[str, Path]) -> None:
    from llava_doctor.report import RENDERERS

    rep = run_checks([hf5.adapters["lm"], scenarios["lora"]], Options(transformers_version=T5),
                     select=["LD1"])
    text = RENDERERS["text"](rep, color=False)
    assert f"{hf5.adapters['lm']}  (lora-output, llava-hf)" in text
    assert f"{scenarios['lora']}  (lora-output, llava)" in text
