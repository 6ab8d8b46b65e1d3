"""Severity follows the merge that will run (issue 15).

Every code's severity is pinned per consumer (LLaVA's own merge, `llava-doctor merge`, peft),
and the gate is exercised through the CLI on tiny real runs that LLaVA's merge cannot complete:
exit 1 by default, exit 0 with `--merge-with llava-doctor` where that merge handles them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from check_helpers import edit_json, found, one

from llava_doctor.checks.base import Hit, all_checks, check, per_consumer
from llava_doctor.checks.context import Options, default_consumer
from llava_doctor.cli import main
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures.builder import TINY, add_checkpoint, build_base, build_lora
from llava_doctor.models import Consumer, Report, Severity

E, W, N = "error", "warning", "info"
#: code -> severity for (llava, llava-doctor, peft). Why, in one line each:
EXPECTED: dict[str, tuple[str, str, str]] = {
    "LD000": (E, E, E),  # a check crashed: nothing can be vouched for
    "LD101": (E, E, E),  # no LoRA config.json: LLaVA's loader stops; our merge refuses
    "LD102": (E, E, E),  # no adapter: nothing to merge
    "LD103": (E, E, E),  # no adapter_config.json: peft refuses, the scale is unknown
    "LD104": (E, E, E),  # no non_lora_trainables.bin: HFValidationError / no fine-tuned projector
    "LD105": (E, E, E),  # empty or ZeRO-3 placeholder adapter
    "LD106": (E, N, N),  # only LLaVA's loader dispatches on the folder name
    "LD107": (E, E, E),  # not a LoRA dir
    "LD108": (W, W, W),  # the safetensors one is merged; the stale .bin is likely a mistake
    "LD201": (W, N, W),  # per hit: error when the target peft refuses or the maths change
    "LD202": (E, E, E),  # peft refuses: target modules not found
    "LD203": (E, E, E),  # size mismatch
    "LD204": (W, W, W),  # merges, as a no-op
    "LD205": (E, E, E),  # NaN/Inf into the merged model
    "LD206": (E, E, E),  # not a W + s*B@A LoRA
    "LD207": (E, E, E),  # keys dropped silently
    "LD208": (E, N, N),  # LLaVA loads the base 4-bit; our merge drops the field; peft ignores it
    "LD209": (N, N, N),  # per hit: warning where the trained tower deltas are dropped
    "LD301": (E, E, E),  # projector silently random
    "LD302": (E, E, E),  # per hit: info/warning for llava-doctor where it takes the projector
    "LD303": (W, W, W),  # likely the wrong stage-1 projector
    "LD304": (E, E, E),  # size mismatch
    "LD305": (E, E, E),  # per hit: info for llava-doctor when every key can be renamed
    "LD306": (W, W, W),  # LLaVA's LoRA branch never reads the stage-1 file
    "LD307": (E, W, N),  # Unknown vision tower for LLaVA; our merge never loads the tower
    "LD308": (E, E, E),  # uninitialised image_newline
    "LD401": (E, E, E),  # per hit: info when no base is resolved at all
    "LD402": (E, E, E),  # another model
    "LD403": (E, E, E),  # per hit: the <im_patch> trap is a warning for LLaVA, info for others
    "LD404": (E, N, E),  # save_pretrained refuses vicuna's generation config; ours writes a valid one
    "LD405": (E, W, W),  # LLaVA's AutoTokenizer fails; the others merge without a tokenizer
    "LD406": (N, N, N),  # LLaVA reads the config with its own class; matters to AutoConfig users
    "LD407": (E, E, E),  # the wrong base: a degraded model whoever merges
    "LD408": (E, N, N),  # LLaVA's LoRA branch always builds LlavaLlamaForCausalLM
    "LD409": (E, N, N),  # tensors that Llama class drops (Qwen2 q/k/v biases)
    "LD501": (E, E, E),  # per hit: a warning for a consumer that never reads the file
    "LD502": (E, E, E),  # never load a pickle that calls os.system
    "LD503": (E, W, W),  # LLaVA merges in float16: inf; the others merge in the dtype asked for
    "LD504": (E, E, E),  # an LFS pointer, not the weights
    "LD601": (E, E, E),  # the merged model does not fit the disk
    "LD602": (N, N, N),  # a memory estimate
    # The environment (LD9xx): what LLaVA's merge imports and needs, ours does not.
    "LD901": (E, N, N),  # a broken llava import stops LLaVA's scripts; ours and peft's skip llava
    "LD902": (W, N, N),  # llava's pins: only LLaVA's code runs against them
    "LD903": (W, N, W),  # bitsandbytes for a quantized config: transformers' loaders need it
    "LD904": (W, N, N),  # a CUDA build without a GPU: LLaVA's scripts default to device='cuda'
    "LD905": (W, N, W),  # peft < 0.6 on CPU in float16: LLaVA's and peft's merges use that peft
    "LD906": (N, N, N),  # a probe that did not answer
}
# Codes other helpers add in parallel (issues 11-14, 17-18) pin their own severities.
OTHER_ISSUES = re.compile(r"^LD(21[01]|[789]\d\d)$")
CONSUMERS = (Consumer.llava, Consumer.llava_doctor, Consumer.peft)


@pytest.mark.parametrize("code", sorted(EXPECTED))
@pytest.mark.parametrize("consumer", CONSUMERS, ids=lambda c: c.value)
def test_severity_of_every_code_for_every_consumer(code: str, consumer: Consumer) -> None:
    spec = all_checks()[code]
    want = EXPECTED[code][CONSUMERS.index(consumer)]
    assert spec.severity_for(consumer).value == want
    if consumer == Consumer.llava:  # the default consumer's is the plain `severity`
        assert spec.severity.value == want


def test_every_code_of_this_issue_is_pinned() -> None:
    mine = {c for c in all_checks() if not OTHER_ISSUES.match(c)}
    assert mine <= set(EXPECTED) <= set(all_checks()), (
        "pin the new code's severity per consumer in EXPECTED")
    for spec in all_checks().values():
        assert set(spec.severities) == set(Consumer), spec.code


def test_registry_takes_one_severity_or_one_per_consumer() -> None:
    assert per_consumer(Severity.warning) == {c: Severity.warning for c in Consumer}
    assert per_consumer({"llava": Severity.error, "llava-doctor": Severity.info,
                         "peft": Severity.warning})[Consumer.llava_doctor] == Severity.info
    with pytest.raises(ValueError, match="lacks llava-doctor, peft"):
        check("LD999", "incomplete-severities", {Consumer.llava: Severity.error})
    # A hit may override some consumers only; the others keep the check's severity.
    hit = Hit("m", severity={Consumer.llava_doctor: Severity.info})
    assert hit.severity_for(Consumer.llava_doctor) == Severity.info
    assert hit.severity_for(Consumer.llava) is None
    assert Hit("m", severity=Severity.error).severity_for(Consumer.peft) == Severity.error


def test_default_consumer_is_llava_for_original_llava_runs(scenarios: dict[str, Path]) -> None:
    from llava_doctor.artifacts.discovery import DirKind

    assert default_consumer(DirKind.lora) == Consumer.llava
    assert default_consumer(None) == Consumer.llava
    assert default_consumer("llava-hf") == Consumer.peft  # the family issue 11 adds
    rep = run_checks([scenarios["lora"]], Options(), select=["LD1"])
    assert rep.consumer == Consumer.llava and rep.targets[0].consumer == Consumer.llava
    rep = run_checks([scenarios["lora"]], Options(consumer=Consumer.peft), select=["LD1"])
    assert rep.consumer == Consumer.peft and rep.targets[0].consumer == Consumer.peft


# --- runs LLaVA's merge cannot complete, through the CLI -----------------------------------------

@pytest.fixture(scope="module")
def runs(scenarios: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("consumers")
    vicuna, pretrain = scenarios["base-vicuna"], scenarios["pretrain"]
    out: dict[str, Path] = {"vicuna": vicuna}
    out["valid-vicuna"] = scenarios["base-vicuna-bin"]  # valid generation config
    # liuhaotian/llava-v1.5-7b-lora's released layout: model_type "llava", merged onto vicuna
    out["released"] = build_lora(root / "llava-v1.5-tiny-lora", TINY, base=vicuna,
                                 projector_from=pretrain, model_type="llava")
    out["qlora"] = scenarios["lora-qlora"]
    out["no-lora-name"] = scenarios["LD106-name-without-lora"]
    out["task-on-vicuna"] = scenarios["task-lora"]
    out["ddp-keys"] = scenarios["lora-ddp-keys"]             # non_lora keys with DDP's module.
    out["fp16-overflow"] = scenarios["LD503-fp16-overflow"]  # bf16 values past float16's range
    out["dora-rslora"] = scenarios["lora-dora-rslora"]       # use_dora/use_rslora: peft < 0.14
    qwen = build_base(root / "qwen2-tiny", TINY, llm="qwen2", generation_config="valid")
    out["qwen2"] = qwen
    out["onevision"] = build_lora(root / "llava-onevision-qwen2-tiny-lora", TINY, base=qwen,
                                  model_type="llava_qwen",
                                  mm_vision_tower="google/siglip-so400m-patch14-384",
                                  extra_config={"architectures": ["Qwen2ForCausalLM"]})
    return out


def _check(capsys: pytest.CaptureFixture[str], *argv: str, peft: str = "0.21.2"
           ) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exc:
        main(["check", *argv, "--format", "json", "--isolated", "--peft-version", peft])
    code = exc.value.code
    assert isinstance(code, int)
    return code, json.loads(capsys.readouterr().out)


def _sev(report: dict) -> dict[str, str]:
    return {f["code"]: f["severity"] for f in report["findings"]}


@pytest.mark.parametrize(("name", "base", "peft", "llava_errors"), [
    ("released", "vicuna", "0.21.2", {"LD404"}),
    ("qlora", "vicuna", "0.21.2", {"LD208", "LD404"}),
    ("no-lora-name", "vicuna", "0.21.2", {"LD106", "LD404"}),
    ("onevision", "qwen2", "0.21.2", {"LD307", "LD408", "LD409"}),
    ("ddp-keys", "valid-vicuna", "0.21.2", {"LD302", "LD305"}),
    ("fp16-overflow", "valid-vicuna", "0.21.2", {"LD503"}),
    ("dora-rslora", "valid-vicuna", "0.13.2", {"LD201"}),
])
def test_exit_1_for_llavas_merge_exit_0_where_llava_doctor_merge_handles_it(
        runs: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str, base: str,
        peft: str, llava_errors: set[str]) -> None:
    target, b = str(runs[name]), str(runs[base])
    code, rep = _check(capsys, target, "--base", b, peft=peft)
    assert code == 1
    assert rep["consumer"] == "llava" and rep["targets"][0]["consumer"] == "llava"
    assert {c for c, s in _sev(rep).items() if s == "error"} == llava_errors
    code, rep = _check(capsys, target, "--base", b, "--merge-with", "llava-doctor", peft=peft)
    assert code == 0, rep["findings"]
    assert rep["consumer"] == "llava-doctor"
    assert not [c for c, s in _sev(rep).items() if s == "error"]


def test_a_wrong_base_is_an_error_whoever_merges(runs: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for consumer in ("llava", "llava-doctor", "peft"):
        code, rep = _check(capsys, str(runs["task-on-vicuna"]), "--base", str(runs["vicuna"]),
                           "--merge-with", consumer)
        assert code == 1 and _sev(rep)["LD407"] == "error"


def test_text_report_says_whose_merge(runs: dict[str, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check", str(runs["released"]), "--base", str(runs["vicuna"]), "--isolated",
              "--select", "LD4"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("severities for: LLaVA's merge_lora_weights.py "
                                   "(transformers 4.37.2)")
    with pytest.raises(SystemExit) as exc:
        main(["check", str(runs["released"]), "--merge-with", "nonsense", "--isolated"])
    assert exc.value.code == 2


def test_merge_refuses_only_what_it_cannot_handle(runs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # LLaVA's merge stops on the QLoRA config and on vicuna's generation config; ours handles
    # both, so it merges and does not list them among the findings it prints.
    out = tmp_path / "llava-v1.5-tiny-merged"
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(runs["qlora"]), "--base", str(runs["vicuna"]), "--out", str(out),
              "--device", "cpu", "--quiet"])
    text = capsys.readouterr().out
    assert exc.value.code == 0, text
    assert "LD208" not in text and "LD404" not in text
    # A task LoRA onto vicuna is wrong for every merge: refused, nothing written.
    out2 = tmp_path / "llava-v1.5-tiny-task-merged"
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(runs["task-on-vicuna"]), "--base", str(runs["vicuna"]), "--out",
              str(out2), "--device", "cpu", "--quiet"])
    assert exc.value.code == 1 and not out2.exists()
    assert "LD407" in capsys.readouterr().err


def test_merge_keeps_qwen2_biases_and_writes_the_llava_qwen_class(
        runs: dict[str, Path], tmp_path: Path) -> None:
    from llava_doctor.merge import merge

    out = tmp_path / "llava-onevision-qwen2-tiny-merged"
    merge(runs["onevision"], runs["qwen2"], out, device="cpu", durable=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("llava_qwen", ["LlavaQwenForCausalLM"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.bias" in index["weight_map"]


# --- LD408 / LD409: LLaVA-NeXT runs --------------------------------------------------------------

def test_ld408_names_the_class_and_who_can_merge(runs: dict[str, Path]) -> None:
    f = one(runs["onevision"], "LD408")
    assert f.path == str(runs["onevision"] / "config.json")
    assert f.evidence["family"] == "qwen" and f.evidence["llava_class"] == "LlavaQwenForCausalLM"
    assert ("haotian-liu/LLaVA's merge_lora_weights.py builds LlavaLlamaForCausalLM in its LoRA "
            "branch whatever the LLM") in f.message
    assert "LLaVA-NeXT's has no 'qwen' case either" in f.message
    assert one(runs["onevision"], "LD408", consumer=Consumer.llava_doctor).severity == \
        Severity.info


@pytest.mark.parametrize(("extra", "family", "who"), [
    ({"model_type": "llava_mistral", "architectures": ["MistralForCausalLM"]}, "mistral",
     "LLaVA-NeXT's builder builds LlavaMistralForCausalLM when the model name contains 'mistral'"),
    ({"model_type": "llava_gemma", "architectures": ["GemmaForCausalLM"]}, "gemma",
     "LLaVA-NeXT's builder builds LlavaGemmaForCausalLM"),
    ({"model_type": "llava_mixtral", "architectures": ["LlavaMixtralForCausalLM"]}, "mixtral",
     "LlavaMixtralForCausalLM when the model name contains 'mixtral'"),
])
def test_ld408_other_next_classes(tmp_path: Path, runs: dict[str, Path], extra: dict,
                                  family: str, who: str) -> None:
    run = build_lora(tmp_path / "llava-next-tiny-lora", TINY, base=runs["vicuna"])
    edit_json(run / "config.json", **extra)
    f = one(run, "LD408")
    assert f.severity == Severity.error and f.evidence["family"] == family and who in f.message


def test_ld408_negatives(scenarios: dict[str, Path]) -> None:
    for name in ("lora", "task-lora", "lora-qlora"):  # llava_llama, and "llava" before v1.6
        assert found(scenarios[name], "LD408") == []


def test_ld409_qwen2_biases_are_dropped_by_the_llama_class(runs: dict[str, Path]) -> None:
    f = one(runs["onevision"], "LD409")
    assert f.path == str(runs["qwen2"]) and f.severity == Severity.error
    assert f.evidence["dropped"] == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv")
    assert f.evidence["missing"] == []
    assert "no attention_bias: true" in f.message
    for consumer in (Consumer.llava_doctor, Consumer.peft):
        assert one(runs["onevision"], "LD409", consumer=consumer).severity == Severity.info


def test_ld409_attention_bias_keeps_them_and_llama_bases_drop_nothing(
        tmp_path: Path, runs: dict[str, Path], scenarios: dict[str, Path]) -> None:
    run = Path(shutil.copytree(runs["onevision"], tmp_path / "llava-onevision-qwen2-tiny-lora"))
    edit_json(run / "config.json", attention_bias=True)
    assert found(run, "LD409", base=runs["qwen2"]) == []
    assert found(scenarios["lora"], "LD409") == []
    assert found(scenarios["task-lora"], "LD409") == []  # a LLaVA base: projector is expected


def test_ld409_mixtral_experts_dropped_and_mlp_left_random(tmp_path: Path,
                                                           runs: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    base = Path(shutil.copytree(runs["vicuna"], tmp_path / "mixtral-tiny"))
    for shard in base.glob("model-*.safetensors"):
        t = load_file(str(shard))
        for k in [k for k in t if ".mlp." in k]:
            layer, proj = k.split(".mlp.")
            t[f"{layer}.block_sparse_moe.experts.0.{proj}"] = t.pop(k)
        save_file(t, str(shard), metadata={"format": "pt"})
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {
        (k.replace(".mlp.", ".block_sparse_moe.experts.0.") if ".mlp." in k else k): v
        for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    f = one(runs["released"], "LD409", base=base)
    assert "model.layers.0.block_sparse_moe.experts.0.down_proj.weight" in f.evidence["dropped"]
    assert "model.layers.0.mlp.down_proj.weight" in f.evidence["missing"]
    assert "stay randomly initialised" in f.message


# --- LD106: the branch that is actually taken ----------------------------------------------------

def test_ld106_on_a_checkpoint_with_a_llava_base_describes_the_autoconfig_error(
        tmp_path: Path, scenarios: dict[str, Path]) -> None:
    """Regression: on `output/checkpoint-N` of a task LoRA the message claimed a text-only model;
    the plain-LLM branch's AutoModelForCausalLM raises on the base's model_type "llava"."""
    run = Path(shutil.copytree(scenarios["task-lora"], tmp_path / "output"))
    ckpt = add_checkpoint(run, 50)
    f = one(ckpt, "LD106", base=scenarios["base-llava"])
    assert f.evidence == {"model_name": "output_checkpoint-50", "branch": "plain-llm"}
    assert "for a checkpoint LLaVA joins the parent folder's name: 'output'" in f.message
    assert ("the base " + str(scenarios["base-llava"]) + "'s config.json says model_type "
            "\"llava\"") in f.message
    assert ("`ValueError: Unrecognized configuration class <class "
            "'transformers.models.llava.configuration_llava.LlavaConfig'> for this kind of "
            "AutoModel: AutoModelForCausalLM`") in f.message
    assert "text-only" not in f.message
    assert f.severity == Severity.error


def test_ld106_on_a_vicuna_base_is_a_text_only_model(tmp_path: Path,
                                                     scenarios: dict[str, Path]) -> None:
    run = Path(shutil.copytree(scenarios["lora"], tmp_path / "output"))
    ckpt = add_checkpoint(run, 50)
    f = one(ckpt, "LD106", base=scenarios["base-vicuna"])
    assert "is a plain LLM, so it silently writes a text-only model" in f.message
    assert "non_lora_trainables.bin and config.json here are never read" in f.message
    # without 'lora' (but with 'llava') the projector-only branch
    g = one(scenarios["LD106-name-without-lora"], "LD106", base=scenarios["base-vicuna"])
    assert "projector-only branch and fails with FileNotFoundError" in g.message
    assert one(ckpt, "LD106", base=scenarios["base-vicuna"],
               consumer=Consumer.llava_doctor).severity == Severity.info


# --- LD501: only for the files a consumer reads --------------------------------------------------

def test_ld501_stray_text_in_the_base_config_is_a_warning_for_llava(
        tmp_path: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = Path(shutil.copytree(runs["valid-vicuna"], tmp_path / "vicuna-tiny-v1.5"))
    lora = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=base,
                      projector_from=runs["released"] / "non_lora_trainables.bin")
    cfg = base / "config.json"
    cfg.write_text(cfg.read_text() + "\nthis line was appended by a copy script\n")
    f = one(lora, "LD501", base=base)
    assert f.path == str(cfg) and f.severity == Severity.warning
    assert ("It does not stop LLaVA's merge_lora_weights.py (transformers 4.37.2): LLaVA's LoRA "
            "branch passes the LoRA dir's config.json to from_pretrained(model_base, "
            "config=...) and never parses the base's") in f.message
    assert set(f.evidence["unread_by"]) == {"llava"}
    g = one(lora, "LD501", base=base, consumer=Consumer.llava_doctor)
    assert g.severity == Severity.error and "does not stop" not in g.message
    code, rep = _check(capsys, str(lora), "--base", str(base))
    assert code == 0, rep["findings"]
    code, rep = _check(capsys, str(lora), "--base", str(base), "--merge-with", "llava-doctor")
    assert code == 1 and _sev(rep)["LD501"] == "error"


def test_ld501_stays_an_error_for_files_llava_reads(tmp_path: Path,
                                                    scenarios: dict[str, Path]) -> None:
    run = Path(shutil.copytree(scenarios["lora"], tmp_path / "llava-v1.5-tiny-lora"))
    (run / "config.json").write_text((run / "config.json").read_text() + "}")
    f = one(run, "LD501", base=scenarios["base-vicuna"])
    assert f.severity == Severity.error and "does not stop" not in f.message
    # peft never reads LLaVA's config.json
    assert one(run, "LD501", base=scenarios["base-vicuna"],
               consumer=Consumer.peft).severity == Severity.warning
    assert one(scenarios["LD501-truncated-safetensors"], "LD501").severity == Severity.error


# --- explain, the README table, fix --------------------------------------------------------------

def test_explain_shows_the_severity_per_consumer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["explain", "LD404"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# LD404 generation-config-invalid (error/info/error, fix: none)"
    at = out.index("## Severity")
    assert out[at + 2:at + 5] == [
        "- llava: error (LLaVA's merge_lora_weights.py (transformers 4.37.2))",
        "- llava-doctor: info (llava-doctor merge)",
        "- peft: error (peft's merge_and_unload (PeftModel on the transformers model class))"]
    # the registry doc itself says it (SARIF's rule help is the doc)
    spec = all_checks()["LD404"]
    assert spec.section("Severity").splitlines()[1] == out[at + 2]
    with pytest.raises(SystemExit):
        main(["explain", "--all"])
    rows = capsys.readouterr().out.splitlines()
    assert "severity (llava/llava-doctor/peft)" in rows[0]
    assert any(r.startswith("LD208 ") and " error/info/info " in r for r in rows)


def test_readme_table_has_the_per_consumer_column() -> None:
    from llava_doctor.checks.base import codes_table_markdown

    table = codes_table_markdown().splitlines()
    assert table[0] == ("| code | name | severity for llava / llava-doctor / peft | fix | runs | "
                        "what it catches |")
    assert any(r.startswith("| LD404 | `generation-config-invalid` | error / info / error |")
               for r in table)


def test_fix_recheck_says_whose_merge(tmp_path: Path, scenarios: dict[str, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(scenarios["lora-qlora"], tmp_path / "llava-v1.5-tiny-qlora"))
    argv = ["fix", str(run), "--base", str(scenarios["base-vicuna"]), "--yes",
            "--select", "LD208", "--select", "LD404"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr().out
    # LD208 is fixed; vicuna's generation config (the base is never modified) still stops
    # LLaVA's merge, so the default consumer's re-check exits 1 and says whose merge it means
    assert exc.value.code == 1
    assert ("After the fix:\nseverities for: LLaVA's merge_lora_weights.py (transformers 4.37.2)"
            in out)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--merge-with", "llava-doctor"])
    assert exc.value.code == 0, capsys.readouterr().out


def test_report_consumer_defaults(scenarios: dict[str, Path]) -> None:
    assert Report().consumer == Consumer.llava
    mixed = run_checks([scenarios["lora"]], Options(), select=["LD1"])
    other = mixed.model_copy(update={"consumer": None})
    assert other.consumer_label() == "each target's own consumer (llava)"


def test_config_file_names_the_consumer(runs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".llava-doctor.toml").write_text('merge-with = "llava-doctor"\n')
    monkeypatch.chdir(tmp_path)
    argv = ["check", str(runs["released"]), "--base", str(runs["vicuna"]), "--format", "json"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and json.loads(capsys.readouterr().out)["consumer"] == \
        "llava-doctor"
    with pytest.raises(SystemExit) as exc:  # the flag wins over the file
        main([*argv, "--merge-with", "llava"])
    assert exc.value.code == 1
    capsys.readouterr()
    (tmp_path / ".llava-doctor.toml").write_text('merge-with = "vllm"\n')
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "'merge-with' = 'vllm' is not a consumer" in capsys.readouterr().err


def test_ld106_is_info_once_a_correctly_named_symlink_exists(tmp_path: Path,
                                                             scenarios: dict[str, Path]) -> None:
    run = Path(shutil.copytree(scenarios["LD106-name-without-lora"],
                               tmp_path / "llava-v1.5-tiny-finetune"))
    assert one(run, "LD106", base=scenarios["base-vicuna"]).severity == Severity.error
    (tmp_path / "llava-v1.5-tiny-finetune-lora").symlink_to(run.name)
    (tmp_path / "unrelated-lora").symlink_to(run.name)  # no 'llava': LLaVA would still misroute
    f = one(run, "LD106", base=scenarios["base-vicuna"])
    assert f.severity == Severity.info and f.fix.value == "none"
    assert f.evidence["symlink"] == str(tmp_path / "llava-v1.5-tiny-finetune-lora")
    assert f"pass {tmp_path / 'llava-v1.5-tiny-finetune-lora'} as --model-path" in f.message


def test_config_overrides_keep_each_targets_consumer(runs: dict[str, Path]) -> None:
    from llava_doctor.config import Config

    rep = run_checks([runs["released"]], Options(base=runs["vicuna"],
                                                 consumer=Consumer.llava_doctor), select=["LD4"])
    out = Config(severity={"LD503": Severity.error}).apply(rep)
    assert out.consumer == Consumer.llava_doctor
    assert [t.consumer for t in out.targets] == [Consumer.llava_doctor]
    assert out.targets[0].inputs == rep.targets[0].inputs


def test_the_training_callback_gates_on_llava_doctor_merge_unless_told(
        scenarios: dict[str, Path], tmp_path: Path) -> None:
    from llava_doctor.integrations.transformers import CheckpointDoctor

    ckpt = Path(shutil.copytree(scenarios["checkpoint-50"], tmp_path / "run" / "checkpoint-50"))
    base = scenarios["base-vicuna"]
    ours = CheckpointDoctor(base, report_name=None, log=lambda _: None).check_checkpoint(ckpt)
    assert ours.report.consumer == Consumer.llava_doctor and ours.blocking == ()
    llava = CheckpointDoctor(base, report_name=None, log=lambda _: None,
                             merge_with="llava").check_checkpoint(ckpt)
    assert [f.code for f in llava.blocking] == ["LD404"]


def test_text_report_of_targets_with_different_consumers(scenarios: dict[str, Path]) -> None:
    from llava_doctor.report.text import render_text

    rep = run_checks([scenarios["lora"], scenarios["task-lora"]], Options(), select=["LD1"])
    mixed = rep.model_copy(update={"consumer": None, "targets": [
        rep.targets[0], rep.targets[1].model_copy(update={"consumer": Consumer.peft})]})
    lines = render_text(mixed).splitlines()
    assert lines[0] == "severities for: each target's own consumer (llava, peft)"
    at = next(i for i, ln in enumerate(lines) if ln.startswith(str(scenarios["task-lora"])))
    assert lines[at + 1].startswith("  severities for: peft's merge_and_unload")
