"""LD401-LD407: the base model, on tiny real bases with one thing wrong at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from check_helpers import edit_json, found, one
from safetensors.torch import load_file, save_file

from llava_doctor.checks.base_model import generation_problems
from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures import TINY, Dims, add_checkpoint, build_base, build_lora
from llava_doctor.models import CheckStatus, Consumer, FixSafety, Severity

NARROW = Dims(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=4, vocab=128, mm_hidden=32)
DEEP = Dims(hidden=64, intermediate=128, layers=3, heads=4, kv_heads=4, vocab=128, mm_hidden=32)








@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shared bases and runs that no test modifies."""
    root = tmp_path_factory.mktemp("shared")
    out: dict[str, Path] = {}
    out["vicuna"] = build_base(root / "vicuna-tiny-v1.5", TINY, generation_config="valid")
    out["vicuna-gen"] = build_base(root / "vicuna-tiny-v1.5-gen", TINY,
                                   generation_config="vicuna")
    out["llava"] = build_base(root / "llava-v1.5-tiny", TINY, llava=True, generation_config="valid")
    out["narrow"] = build_base(root / "vicuna-narrow", NARROW, generation_config="valid")
    out["deep"] = build_base(root / "vicuna-deep", DEEP, generation_config="valid")
    out["lora"] = build_lora(root / "runs" / "llava-v1.5-tiny-lora", TINY, base=out["vicuna"])
    out["task"] = build_lora(root / "runs" / "llava-v1.5-tiny-task-lora", TINY, base=out["llava"],
                             trained_from="llava", projector_from=out["llava"])
    return out


@pytest.fixture
def base_copy(tmp_path: Path, w: dict[str, Path]) -> Path:
    """A private copy of the healthy vicuna base, to break."""
    return Path(shutil.copytree(w["vicuna"], tmp_path / "vicuna-tiny-v1.5"))


@pytest.fixture
def lora_copy(tmp_path: Path, w: dict[str, Path]) -> Path:
    return Path(shutil.copytree(w["lora"], tmp_path / "runs" / "llava-v1.5-tiny-lora"))


# --- LD401 base-incomplete -----------------------------------------------------------------------

def test_ld401_no_base_is_one_info_and_the_rest_skip(tmp_path: Path, w: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # an empty Hugging Face cache, whatever this machine has cached
    monkeypatch.setattr("huggingface_hub.utils._cache_manager.HF_HUB_CACHE",
                        str(tmp_path / "hf-cache"), raising=False)
    run = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=None)
    rep = run_checks([run], Options(), select=["LD4"])
    assert [(f.code, f.severity, f.path) for f in rep.findings] == [
        ("LD401", Severity.info, str(run / "adapter_config.json"))]
    msg = rep.findings[0].message
    assert "'lmsys/vicuna-tiny-v1.5'" in msg and "--base /path/to/vicuna-tiny-v1.5" in msg
    # the current Hugging Face CLI; `huggingface-cli download` is deprecated
    assert "(`hf download lmsys/vicuna-tiny-v1.5`)" in msg and "huggingface-cli" not in msg
    skipped = {c.code: c.reason for t in rep.targets for c in t.checks
               if c.status == CheckStatus.skipped}
    assert set(skipped) == {"LD402", "LD403", "LD404", "LD405", "LD407", "LD409"}
    assert all("LD401" in (r or "") for r in skipped.values())


def test_ld401_base_does_not_exist(tmp_path: Path, w: dict[str, Path]) -> None:
    missing = tmp_path / "nowhere"
    f = one(w["lora"], "LD401", base=missing)
    assert f.path == str(missing) and "does not exist" in f.message and "--base" in f.message


def test_ld401_recorded_training_machine_path(tmp_path: Path, w: dict[str, Path]) -> None:
    run = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=w["vicuna"])
    edit_json(run / "adapter_config.json", base_model_name_or_path="./checkpoints/vicuna-7b-v1.5")
    f = one(run, "LD401")
    assert f.severity == Severity.info and "./checkpoints/vicuna-7b-v1.5" in f.message


def test_ld401_base_is_a_file(tmp_path: Path, w: dict[str, Path]) -> None:
    f = one(w["lora"], "LD401", base=w["vicuna"] / "config.json")
    assert "is a file" in f.message


def test_ld401_base_is_the_lora_dir(w: dict[str, Path]) -> None:
    f = one(w["lora"], "LD401", base=w["lora"])
    assert f.path == str(w["lora"]) and "KeyError: 'LlavaConfig'" in f.message


def test_ld401_base_is_another_adapter(w: dict[str, Path]) -> None:
    f = one(w["lora"], "LD401", base=w["task"])
    assert f.path == str(w["task"]) and "swapped" in f.message


def test_ld401_no_config(base_copy: Path, w: dict[str, Path]) -> None:
    (base_copy / "config.json").unlink()
    f = one(w["lora"], "LD401", base=base_copy)
    assert f.path == str(base_copy / "config.json")
    assert "does not appear to have a file named config.json" in f.message


def test_ld401_no_weights(base_copy: Path, w: dict[str, Path]) -> None:
    for p in base_copy.glob("model*"):
        p.unlink()
    f = one(w["lora"], "LD401", base=base_copy)
    assert f.path == str(base_copy) and "holds no weights" in f.message


def test_ld401_missing_shard(base_copy: Path, w: dict[str, Path]) -> None:
    shard = base_copy / "model-00002-of-00002.safetensors"
    shard.unlink()
    f = one(w["lora"], "LD401", base=base_copy)
    assert f.path == str(shard) and f.evidence["kind"] == "missing-shard"
    assert f.evidence["count"] > 0 and "lm_head.weight" in f.evidence["tensors"]


def test_ld401_shard_lacks_a_promised_tensor(base_copy: Path, w: dict[str, Path]) -> None:
    shard = base_copy / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    f = one(w["lora"], "LD401", base=base_copy)
    assert f.path == str(shard) and f.evidence["tensors"] == ["lm_head.weight"]


def test_ld401_healthy_bases(w: dict[str, Path]) -> None:
    assert found(w["lora"], "LD401") == []  # resolved from adapter_config.json
    assert found(w["task"], "LD401") == []
    assert found(w["lora"], "LD401", base=w["vicuna"]) == []


# --- LD402 base-mismatch -------------------------------------------------------------------------

def test_ld402_narrower_base(w: dict[str, Path]) -> None:
    f = one(w["lora"], "LD402", base=w["narrow"])
    assert f.path == str(w["narrow"] / "config.json")
    assert f.evidence["mismatch"] == {"hidden_size": {"lora": 64, "base": 32},
                                      "intermediate_size": {"lora": 128, "base": 64}}
    assert "hidden_size 64 vs 32" in f.message and str(w["vicuna"]) in f.message


def test_ld402_deeper_base(w: dict[str, Path]) -> None:
    f = one(w["lora"], "LD402", base=w["deep"])
    assert f.evidence["mismatch"] == {"num_hidden_layers": {"lora": 2, "base": 3}}


def test_ld402_matching_bases(w: dict[str, Path]) -> None:
    assert found(w["lora"], "LD402") == []
    assert found(w["task"], "LD402") == []


# --- LD403 vocab-mismatch ------------------------------------------------------------------------

def test_ld403_lora_vocab_grown_during_training(lora_copy: Path, w: dict[str, Path]) -> None:
    edit_json(lora_copy / "config.json", vocab_size=131)
    f = one(lora_copy, "LD403")
    assert f.path == str(w["vicuna"] / "model-00001-of-00002.safetensors")
    assert f.evidence == {"tensor": "model.embed_tokens.weight", "rows": 128, "vocab_size": 131,
                          "which": "embed_tokens"}
    assert ('Trying to set a tensor of shape torch.Size([128, 64]) in "weight" (which has shape '
            'torch.Size([131, 64])), this looks incorrect.') in f.message


def test_ld403_embeddings_in_non_lora(lora_copy: Path, w: dict[str, Path]) -> None:
    nl = lora_copy / "non_lora_trainables.bin"
    t = torch.load(nl, weights_only=True)
    t["base_model.model.model.embed_tokens.weight"] = torch.zeros(130, 64, dtype=torch.bfloat16)
    torch.save(t, nl)
    f = one(lora_copy, "LD403")
    assert f.path == str(nl) and f.evidence["rows"] == 130
    assert "size mismatch for model.embed_tokens.weight" in f.message


def test_ld403_embeddings_in_the_adapter(lora_copy: Path, w: dict[str, Path]) -> None:
    ad = lora_copy / "adapter_model.safetensors"
    t = load_file(str(ad))
    t["base_model.model.lm_head.weight"] = torch.zeros(129, 64, dtype=torch.bfloat16)
    save_file(t, str(ad), metadata={"format": "pt"})
    f = one(lora_copy, "LD403")
    assert f.path == str(ad) and f.evidence["tensor"] == "base_model.model.lm_head.weight"


def test_ld403_tokenizer_longer_than_vocab(base_copy: Path, w: dict[str, Path]) -> None:
    (base_copy / "added_tokens.json").write_text(json.dumps({"<image>": 128, "<pad>": 129}))
    f = one(w["lora"], "LD403", base=base_copy)
    assert f.path == str(base_copy) and f.evidence == {"tokenizer_length": 130,
                                                       "vocab_size": 128}


def test_ld403_im_patch_default_true_trap(lora_copy: Path, w: dict[str, Path]) -> None:
    edit_json(lora_copy / "config.json", mm_use_im_patch_token=None)
    f = one(lora_copy, "LD403")
    assert f.path == str(lora_copy / "config.json")
    assert f.severity == Severity.warning and f.fix == FixSafety.safe
    assert f.evidence["added"] == ["<im_patch>"] and f.evidence["merged_vocab"] == 129
    # llava-doctor merge adds no tokens
    assert one(lora_copy, "LD403", consumer=Consumer.llava_doctor).severity == Severity.info
    assert f.evidence["field"] == "mm_use_im_patch_token" and f.evidence["expected"] is False
    assert "defaults it to True" in f.message and "resize_token_embeddings(129)" in f.message


def test_ld403_start_end_tokens_asked_for(lora_copy: Path, w: dict[str, Path]) -> None:
    edit_json(lora_copy / "config.json", mm_use_im_start_end=True)
    f = one(lora_copy, "LD403")
    assert f.evidence["added"] == ["<im_start>", "<im_end>"] and f.fix == FixSafety.none


def test_ld403_tokens_the_tokenizer_already_has(lora_copy: Path, base_copy: Path) -> None:
    edit_json(lora_copy / "config.json", mm_use_im_patch_token=None)
    # vocabulary 129 everywhere, <im_patch> already in the tokenizer: nothing is added
    edit_json(lora_copy / "config.json", vocab_size=129)
    edit_json(base_copy / "config.json", vocab_size=129)
    for shard in base_copy.glob("model-*.safetensors"):
        t = load_file(str(shard))
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in t:
                t[k] = torch.cat([t[k], t[k][:1]])
        save_file(t, str(shard), metadata={"format": "pt"})
    (base_copy / "added_tokens.json").write_text(json.dumps({"<im_patch>": 128}))
    assert found(lora_copy, "LD403", base=base_copy) == []


def test_ld403_healthy(w: dict[str, Path]) -> None:
    assert found(w["lora"], "LD403") == []
    assert found(w["task"], "LD403") == []


# --- LD404 generation-config-invalid -------------------------------------------------------------

VICUNA_WARNING = ("UserWarning('`do_sample` is set to `False`. However, `temperature` is set to "
                  "`0.9` -- this flag is only used in sample-based generation modes. You should "
                  "set `do_sample=True` or unset `temperature`.')")


def test_ld404_vicuna_generation_config(w: dict[str, Path]) -> None:
    f = one(w["lora"], "LD404", base=w["vicuna-gen"])
    assert f.path == str(w["vicuna-gen"] / "generation_config.json")
    # LLaVA's merge writes config.json and no weights: an error for it (and for peft's
    # save_pretrained), info for llava-doctor merge, which writes a valid generation config
    assert f.severity == Severity.error and f.fix == FixSafety.none
    assert f.evidence == {"fields": {"temperature": 0.9, "top_p": 0.6}, "do_sample": None}
    assert VICUNA_WARNING in f.message
    assert "The generation config instance is invalid" in f.message
    assert "llava-doctor merge" in f.message
    assert one(w["lora"], "LD404", base=w["vicuna-gen"],
               consumer=Consumer.llava_doctor).severity == Severity.info
    assert one(w["lora"], "LD404", base=w["vicuna-gen"],
               consumer=Consumer.peft).severity == Severity.error


def test_ld404_names_one_transformers_version_everywhere(w: dict[str, Path]) -> None:
    """Regression: the message said ">= 4.37", the README and the merge note ">= 4.38"; LLaVA
    #1144 reports the failure with the 4.37.2 LLaVA pins. One fact, one text."""
    from llava_doctor.artifacts.llava import GENERATION_SAVE_REFUSED
    from llava_doctor.checks.base import get_check
    from llava_doctor.merge.llava_parts import fixed_generation_config

    assert GENERATION_SAVE_REFUSED == ("transformers 4.37.2 (the version LLaVA pins; LLaVA "
                                       "#1144) and later")
    f = one(w["lora"], "LD404", base=w["vicuna-gen"])
    assert f"LLaVA's merge ({GENERATION_SAVE_REFUSED}) writes config.json" in f.message
    _, note = fixed_generation_config({"temperature": 0.9, "top_p": 0.6})
    assert note is not None and GENERATION_SAVE_REFUSED in note
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    spec = get_check("LD404")
    assert spec is not None
    doc = " ".join(spec.doc.split())
    assert GENERATION_SAVE_REFUSED in " ".join(readme.split())
    assert GENERATION_SAVE_REFUSED.replace("and later", "") in doc
    for text in (f.message, note, readme, doc):
        assert ">= 4.37" not in text and ">= 4.38" not in text


def test_ld404_lora_dir_generation_config(lora_copy: Path, w: dict[str, Path]) -> None:
    shutil.copyfile(w["vicuna-gen"] / "generation_config.json",
                    lora_copy / "generation_config.json")
    f = one(lora_copy, "LD404")
    assert f.path == str(lora_copy / "generation_config.json") and "LoRA dir's" in f.message
    # LLaVA's merge takes the base's generation config: this file never stops it
    assert f.severity == Severity.warning
    assert "Neither LLaVA's merge nor peft's reads this file (they take the base's)" in f.message


def test_ld404_valid_configs(w: dict[str, Path]) -> None:
    assert found(w["lora"], "LD404") == []
    assert found(w["task"], "LD404") == []


@pytest.mark.parametrize("cfg", [
    {"temperature": 0.9, "top_p": 0.6}, {"top_k": 40}, {"top_k": 50}, {"typical_p": 0.5},
    {"do_sample": True, "temperature": 0.9}, {"length_penalty": 2.0}, {"early_stopping": True},
    {"temperature": 1.0}, {"epsilon_cutoff": 0.1}, {"num_beams": 4, "length_penalty": 2.0},
    {"max_length": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
])
def test_generation_rules_agree_with_transformers(tmp_path: Path, cfg: dict[str, Any]) -> None:
    """Our reading of validate() refuses exactly what transformers' save_pretrained refuses."""
    transformers = pytest.importorskip("transformers")
    try:
        transformers.GenerationConfig(**cfg).save_pretrained(tmp_path)
        saves = True
    except ValueError:
        saves = False
    assert saves == (generation_problems(cfg) == [])


# --- LD405 tokenizer-missing ---------------------------------------------------------------------

def test_ld405_no_tokenizer_files(tmp_path: Path, w: dict[str, Path]) -> None:
    base = build_base(tmp_path / "vicuna-tiny-v1.5", TINY, tokenizer=False,
                      generation_config="valid")
    f = one(w["lora"], "LD405", base=base)
    # LLaVA's merge stops at AutoTokenizer; llava-doctor merge completes without a tokenizer
    assert f.path == str(base / "tokenizer.model") and f.severity == Severity.error
    assert one(w["lora"], "LD405", base=base,
               consumer=Consumer.llava_doctor).severity == Severity.warning
    assert "has no tokenizer.model and no tokenizer.json" in f.message


def test_ld405_points_at_a_checkpoint_with_the_tokenizer(tmp_path: Path, lora_copy: Path) -> None:
    base = build_base(tmp_path / "vicuna-tiny-v1.5-notok", TINY, tokenizer=False,
                      generation_config="valid")
    ckpt = add_checkpoint(lora_copy, 50)
    f = one(lora_copy, "LD405", base=base)
    assert f.evidence["copy_from"] == str(ckpt) and str(ckpt) in f.message


def test_ld405_fast_only_llama_tokenizer(base_copy: Path, w: dict[str, Path]) -> None:
    (base_copy / "tokenizer.model").unlink()
    (base_copy / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    f = one(w["lora"], "LD405", base=base_copy)
    assert "use_fast=False" in f.message and f.evidence["tokenizer_class"] == "LlamaTokenizer"
    edit_json(base_copy / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    assert found(w["lora"], "LD405", base=base_copy) == []


def test_ld405_healthy(w: dict[str, Path]) -> None:
    assert found(w["lora"], "LD405") == []


# --- LD406 model-type-collision ------------------------------------------------------------------

def test_ld406_original_llava_config_named_llava(tmp_path: Path, w: dict[str, Path]) -> None:
    run = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=w["vicuna"], model_type="llava")
    f = one(run, "LD406")
    assert f.path == str(run / "config.json") and f.fix == FixSafety.safe
    assert f.evidence == {"file": str(run / "config.json"), "field": "model_type",
                          "actual": "llava", "expected": "llava_llama"}
    assert "'LlavaConfig' object has no attribute 'attention_dropout'" in f.message
    # LLaVA's own loader reads the config with its own class: harmless to every merge
    assert "(vLLM, LLaVA-NeXT's builder, LLaVA before commit 04fb03d)" in f.message
    assert "LLaVA's own merge reads it with its own class and is unaffected" in f.message
    for consumer in Consumer:
        assert one(run, "LD406", consumer=consumer).severity == Severity.info


@pytest.mark.parametrize(("architectures", "expected"), [
    (["MistralForCausalLM"], "llava_mistral"),
    (["Qwen2ForCausalLM"], "llava_qwen"),
    (["MPTForCausalLM"], "llava_mpt"),
    (["LlavaMistralForCausalLM"], "llava_mistral"),
])
def test_ld406_fix_writes_the_llava_type_of_the_runs_llm(
        tmp_path: Path, w: dict[str, Path], architectures: list[str], expected: str) -> None:
    """Regression: the safe fix wrote llava_llama whatever the LLM."""
    from llava_doctor.fixes import plan_fixes

    run = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=w["vicuna"], model_type="llava",
                     extra_config={"architectures": architectures})
    f = one(run, "LD406")
    assert f.evidence["expected"] == expected and f.fix == FixSafety.safe
    assert f"sets it to \"{expected}\" (safe)" in f.message
    _, plan = plan_fixes(run, Options(base=w["vicuna"]), select=["LD406"])
    (entry,) = [c for c in plan.to_apply if c.code == "LD406"]
    assert f"to '{expected}'" in entry.title


def test_ld406_no_fix_when_the_llm_is_unknown(tmp_path: Path, w: dict[str, Path]) -> None:
    from llava_doctor.fixes import plan_fixes

    run = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=w["vicuna"], model_type="llava",
                     extra_config={"architectures": ["PhiForCausalLM"]})
    f = one(run, "LD406")
    assert f.fix == FixSafety.none and f.evidence["expected"] is None
    assert "there is no automatic fix" in f.message
    _, plan = plan_fixes(run, Options(base=w["vicuna"]), select=["LD406"])
    assert not [c for c in plan.to_apply if c.code == "LD406"]


def test_ld406_needs_no_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.utils._cache_manager.HF_HUB_CACHE",
                        str(tmp_path / "hf-cache"), raising=False)
    run = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=None, model_type="llava")
    assert one(run, "LD406").code == "LD406"


def test_ld406_negatives(lora_copy: Path, w: dict[str, Path]) -> None:
    assert found(w["lora"], "LD406") == []  # llava_llama
    # a llava-hf config legitimately says "llava": its Llama fields live in text_config
    cfg = json.loads((lora_copy / "config.json").read_text())
    hf = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
          "text_config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
          "vision_config": {"hidden_size": 32}}
    (lora_copy / "config.json").write_text(json.dumps(hf))
    assert found(lora_copy, "LD406") == []


# --- LD407 wrong-base-kind -----------------------------------------------------------------------

def test_ld407_vicuna_lora_on_a_llava_base(w: dict[str, Path]) -> None:
    f = one(w["lora"], "LD407", base=w["llava"])
    assert f.path == str(w["llava"] / "config.json")
    # every merge completes and writes a degraded model: an error whoever merges
    assert f.severity == Severity.error
    assert one(w["lora"], "LD407", base=w["llava"],
               consumer=Consumer.llava_doctor).severity == Severity.error
    assert f.evidence["trained_on"] == "llm" and f.evidence["given"] == "llava"
    assert str(w["vicuna"]) in f.message and "degraded" in f.message


def test_ld407_task_lora_on_vicuna(w: dict[str, Path]) -> None:
    f = one(w["task"], "LD407", base=w["vicuna"])
    assert f.evidence["trained_on"] == "llava" and f.evidence["given"] == "llm"
    assert "LlavaLlamaForCausalLM" in f.message


def test_ld407_recorded_name_when_architectures_are_absent(tmp_path: Path,
                                                           w: dict[str, Path]) -> None:
    task = Path(shutil.copytree(w["task"], tmp_path / "llava-v1.5-tiny-task-lora"))
    edit_json(task / "config.json", architectures=None)
    edit_json(task / "adapter_config.json", base_model_name_or_path="liuhaotian/llava-v1.5-7b")
    f = one(task, "LD407", base=w["vicuna"])
    assert "the recorded base 'liuhaotian/llava-v1.5-7b'" in f.message
    lora = Path(shutil.copytree(w["lora"], tmp_path / "llava-v1.5-tiny-lora"))
    edit_json(lora / "config.json", architectures=None)
    assert found(lora, "LD407", base=w["llava"]) == []  # nothing says what it was trained on


def test_ld407_matching_kinds(w: dict[str, Path]) -> None:
    assert found(w["lora"], "LD407") == []
    assert found(w["task"], "LD407") == []
