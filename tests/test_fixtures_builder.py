"""The fixture builder writes what the real tools write.

The key check: for the same LoraConfig, ``build_lora`` produces the same adapter tensor names and
shapes and the same ``adapter_config.json`` keys as peft's own ``save_pretrained``. Bases load in
transformers and give finite logits. The malicious scenario is only ever opened with
``weights_only=True`` (or as a zip), never executed.
"""

from __future__ import annotations

import json
import pickle
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

from llava_doctor.artifacts import peft_versions as pv
from llava_doctor.fixtures import (
    LLAMA_7B,
    LLAMA_13B,
    LORA_TARGETS,
    SCENARIOS,
    TINY,
    add_checkpoint,
    build_all,
    build_base,
    build_lora,
    build_pretrain,
    canary_path,
    llama_shapes,
    projector_shapes,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("base") / "vicuna-tiny-v1.5", TINY)


def st_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def st_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def bin_load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------
# THE KEY TEST: builder adapter == peft's save_pretrained
# ----------------------------------------------------------------------------------------------

# (case id, kwargs for peft's LoraConfig, kwargs for build_lora)
PEFT_CASES = [
    ("plain", {}, {}),
    ("rslora", {"use_rslora": True}, {"use_rslora": True}),
    ("dora", {"use_dora": True}, {"use_dora": True}),
    (
        "rank-pattern",
        {
            "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2},
            "alpha_pattern": {"k_proj": 32},
        },
        {
            "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2},
            "alpha_pattern": {"k_proj": 32},
        },
    ),
    ("lora-bias", {"lora_bias": True}, {"lora_bias": True}),
    ("modules-to-save", {"modules_to_save": ["lm_head"]}, {"modules_to_save": ["lm_head"]}),
    ("embedding", {"target_modules": [*LORA_TARGETS, "embed_tokens"]}, {"embed_lora": True}),
    (
        "embedding-dora",
        {"target_modules": [*LORA_TARGETS, "embed_tokens"], "use_dora": True},
        {"embed_lora": True, "use_dora": True},
    ),
    (
        "regex",
        {"target_modules": r".*\.layers\.1\..*(q_proj|v_proj)"},
        {"target_modules": r".*\.layers\.1\..*(q_proj|v_proj)"},
    ),
    (
        "lm-head-lora",
        {"target_modules": [*LORA_TARGETS, "lm_head"]},
        {"target_modules": [*LORA_TARGETS, "lm_head"]},
    ),
    ("all-linear", {"target_modules": "all-linear"}, {"target_modules": "all-linear"}),
    (
        "layer-replication",
        {"layer_replication": [[0, 2], [1, 2]]},
        {"layer_replication": [[0, 2], [1, 2]]},
    ),
]

# adapter_config.json fields whose values must agree exactly
COMPARED_VALUES = (
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "bias",
    "fan_in_fan_out",
    "peft_type",
    "task_type",
    "inference_mode",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "lora_bias",
    "layer_replication",
    "peft_version",
)


@pytest.mark.parametrize(
    "case,peft_kwargs,builder_kwargs", PEFT_CASES, ids=[c[0] for c in PEFT_CASES]
)
def test_builder_adapter_matches_peft_save_pretrained(
    tmp_path, tiny_base, case, peft_kwargs, builder_kwargs
):
    peft = pytest.importorskip(
        "peft", reason="peft is not installed: cannot compare with its writer"
    )
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    lcfg = {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": list(LORA_TARGETS),
        "task_type": "CAUSAL_LM",
        **peft_kwargs,
    }
    peft.get_peft_model(model, peft.LoraConfig(**lcfg)).save_pretrained(tmp_path / "peft")
    ours = build_lora(
        tmp_path / "llava-v1.5-tiny-lora",
        TINY,
        base=tiny_base,
        peft_version=peft.__version__,
        **builder_kwargs,
    )

    theirs_shapes = st_shapes(tmp_path / "peft" / "adapter_model.safetensors")
    our_shapes = st_shapes(ours / "adapter_model.safetensors")
    assert sorted(our_shapes) == sorted(theirs_shapes)
    assert our_shapes == theirs_shapes

    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_cfg = json.loads((ours / "adapter_config.json").read_text())
    assert sorted(our_cfg) == sorted(theirs_cfg)
    for field in COMPARED_VALUES:
        assert our_cfg[field] == theirs_cfg[field], field
    if isinstance(theirs_cfg["target_modules"], str):
        assert our_cfg["target_modules"] == theirs_cfg["target_modules"]
    else:
        assert set(our_cfg["target_modules"]) == set(theirs_cfg["target_modules"])


def test_builder_adapter_loads_into_peft_and_merges(tmp_path, tiny_base):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    transformers = pytest.importorskip("transformers")
    lora = build_lora(
        tmp_path / "llava-v1.5-tiny-lora",
        TINY,
        base=tiny_base,
        use_dora=True,
        peft_version="0.10.0",
    )
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with _no_missing_key_warning():
        merged = peft.PeftModel.from_pretrained(model, lora).merge_and_unload()
    after = merged.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(after).all()
    rel = ((after - before).norm() / before.norm()).item()
    assert 0.01 < rel < 1.0  # a trained adapter moves the weights, but not absurdly


class _no_missing_key_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.records = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        msgs = [str(w.message) for w in self.records]
        assert not [m for m in msgs if "missing adapter keys" in m], msgs
        return False


def test_untrained_dora_magnitude_equals_peft_init(tmp_path, tiny_base):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    transformers = pytest.importorskip("transformers")
    ours = build_lora(
        tmp_path / "llava-v1.5-tiny-lora",
        TINY,
        base=tiny_base,
        use_dora=True,
        trained=False,
        dtype=torch.float32,
    )
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=list(LORA_TARGETS))
    )
    theirs = (
        pm.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    )
    mine = st_tensors(ours / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    ]
    torch.testing.assert_close(mine, theirs.detach(), rtol=1e-4, atol=1e-5)
    b = [v for k, v in st_tensors(ours / "adapter_model.safetensors").items() if ".lora_B." in k]
    assert b and all(torch.count_nonzero(t) == 0 for t in b)


def test_builder_is_deterministic(tmp_path):
    kw = {
        "use_dora": True,
        "embed_lora": True,
        "modules_to_save": ["lm_head"],
        "image_newline": True,
    }
    a = build_lora(tmp_path / "a-lora", TINY, **kw)
    b = build_lora(tmp_path / "b-lora", TINY, **kw)
    assert (a / "adapter_model.safetensors").read_bytes() == (
        b / "adapter_model.safetensors"
    ).read_bytes()
    na, nb = bin_load(a / "non_lora_trainables.bin"), bin_load(b / "non_lora_trainables.bin")
    assert na.keys() == nb.keys() and all(torch.equal(na[k], nb[k]) for k in na)
    c = build_lora(tmp_path / "c-lora", TINY, seed=3, **kw)
    assert (a / "adapter_model.safetensors").read_bytes() != (
        c / "adapter_model.safetensors"
    ).read_bytes()


# ----------------------------------------------------------------------------------------------
# peft_versions
# ----------------------------------------------------------------------------------------------


def test_peft_versions_match_installed_lora_config():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    written = json.loads(json.dumps(peft.LoraConfig().to_dict(), default=str))
    written["inference_mode"] = True  # save_pretrained flips it
    ours = pv.adapter_config_fields(peft.__version__)
    assert sorted(ours) == sorted(written)
    for k, v in ours.items():
        if k == "peft_type":
            assert str(written[k]).endswith("LORA")
        else:
            assert v == written[k], k


def test_peft_versions_history():
    assert pv.parse_version("0.10.0") > pv.parse_version("0.9.2")
    assert pv.parse_version("0.18.0.dev0") == (0, 18, 0)
    assert pv.parse_version("v0.21.2+local") == (0, 21, 2)
    with pytest.raises(ValueError):
        pv.parse_version("main")
    assert "use_dora" in pv.fields_known_by("0.9.0")
    assert "use_dora" not in pv.fields_known_by("0.8.2")
    assert "merge_weights" in pv.fields_known_by("0.2.0")
    assert "merge_weights" not in pv.fields_known_by("0.3.0")
    assert "runtime_config" not in pv.fields_known_by("0.21.2")  # never persisted
    assert "kasa_config" in pv.fields_known_by("0.21.0") - pv.fields_known_by("0.20.0")
    assert pv.default_of("lora_alpha", "0.3.0") is None and pv.default_of("lora_alpha") == 8
    assert pv.default_of("megatron_core") == "megatron.core"
    assert pv.adapter_config_fields("0.18.0")["peft_version"] == "0.18.0"
    assert "peft_version" not in pv.adapter_config_fields("0.17.1")
    assert {
        "use_rslora",
        "use_dora",
        "layer_replication",
        "rank_pattern",
        "alpha_pattern",
        "lora_bias",
        "trainable_token_indices",
        "target_parameters",
    } <= pv.MATH_FIELDS
    assert pv.changes_math("use_dora", True) and not pv.changes_math("use_dora", False)
    assert pv.changes_math("init_lora_weights", "pissa_niter_4")
    assert not pv.changes_math("init_lora_weights", "gaussian")
    assert not pv.changes_math("rank_pattern", {})
    assert not pv.changes_math("lora_dropout", 0.1)
    assert pv.non_default_math_fields({"use_rslora": True, "r": 8, "layer_replication": None}) == {
        "use_rslora": True
    }


@pytest.mark.parametrize("version", ["0.3.0", "0.6.0", "0.10.0", "0.14.0", "0.18.0", "0.21.2"])
def test_builder_writes_exactly_the_fields_of_the_version(tmp_path, version):
    lora = build_lora(
        tmp_path / "llava-v1.5-tiny-lora",
        TINY,
        peft_version=version,
        adapter_format="bin" if pv.parse_version(version) < (0, 7, 0) else "safetensors",
    )
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert set(cfg) == pv.fields_known_by(version)
    assert (lora / "README.md").is_file() == (pv.parse_version(version) >= (0, 4, 0))


def test_builder_refuses_fields_the_version_does_not_know(tmp_path):
    with pytest.raises(ValueError, match="peft 0.8.0 has no 'use_dora' field"):
        build_lora(tmp_path / "x-lora", TINY, peft_version="0.8.0", use_dora=True)


# ----------------------------------------------------------------------------------------------
# bases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,shards", [("safetensors", 2), ("bin", 2), ("safetensors", 1)])
def test_base_loads_in_transformers_with_finite_logits(tmp_path, fmt, shards):
    transformers = pytest.importorskip("transformers")
    base = build_base(tmp_path / "vicuna-tiny-v1.5", TINY, fmt=fmt, shards=shards)
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42, 2]])).logits
    assert logits.shape == (1, 5, TINY.vocab)
    assert torch.isfinite(logits).all()
    sd = model.state_dict()
    assert set(sd) == set(llama_shapes(TINY))
    assert 0.01 < sd["model.layers.0.self_attn.q_proj.weight"].std().item() < 0.03


def test_base_layout_and_determinism(tmp_path):
    st = build_base(tmp_path / "st", TINY)
    bn = build_base(tmp_path / "bn", TINY, fmt="bin")
    single = build_base(tmp_path / "one", TINY, shards=1, generation_config=None, tokenizer=False)
    assert sorted(p.name for p in st.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    assert (bn / "pytorch_model-00002-of-00002.bin").is_file()
    index = json.loads((st / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        2 * torch.Size(s).numel() for s in llama_shapes(TINY).values()
    )
    assert set(index["weight_map"]) == set(llama_shapes(TINY))
    bin_index = json.loads((bn / "pytorch_model.bin.index.json").read_text())
    a = {}
    for f in sorted(set(index["weight_map"].values())):
        a.update(st_tensors(st / f))
    b = {}
    for f in sorted(set(bin_index["weight_map"].values())):
        b.update(bin_load(bn / f))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values())
    gen = json.loads((st / "generation_config.json").read_text())
    assert gen["temperature"] == 0.9 and gen["top_p"] == 0.6 and "do_sample" not in gen
    cfg = json.loads((st / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["vocab_size"] == TINY.vocab and cfg["tie_word_embeddings"] is False


def test_llava_base_has_projector_and_llava_config(tmp_path):
    base = build_base(
        tmp_path / "llava-v1.5-tiny", TINY, llava=True, image_newline=True, mm_projector_file=True
    )
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava"
    assert cfg["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert cfg["mm_hidden_size"] == TINY.mm_hidden
    wm = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    proj = {k for k in wm if k.startswith("model.mm_projector.")}
    assert proj == {f"model.mm_projector.{k}" for k in projector_shapes("mlp2x_gelu", TINY)}
    assert "model.image_newline" in wm
    assert set(bin_load(base / "mm_projector.bin")) == proj


def test_tokenizer_loads_with_sentencepiece_and_matches_vocab(tiny_base):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    assert sp.get_piece_size() == TINY.vocab
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.decode(sp.encode("what is shown in the image?")) == "what is shown in the image?"
    tok_cfg = json.loads((tiny_base / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer"


def test_sparse_7b_base_and_adapter_have_real_headers_and_no_data(tmp_path):
    base = build_base(tmp_path / "vicuna-7b-v1.5", LLAMA_7B, sparse=True, tokenizer=False)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 6_738_415_616 * 2  # layout.md §C totals
    allocated = 0
    for f in sorted(set(index["weight_map"].values())):
        shapes = st_shapes(base / f)
        assert all(shapes[k] == llama_shapes(LLAMA_7B)[k] for k in shapes)
        allocated += (base / f).stat().st_blocks * 512
    assert allocated < 1 << 20, "sparse shards should be holes"
    lora = build_lora(tmp_path / "llava-v1.5-7b-lora", LLAMA_7B, r=128, alpha=256, sparse=True)
    shapes = st_shapes(lora / "adapter_model.safetensors")
    assert len(shapes) == 448
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 319_815_680
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (128, 11008)
    non_lora = bin_load(lora / "non_lora_trainables.bin")
    assert sum(v.numel() for v in non_lora.values()) == 20_979_712


def test_13b_shapes():
    assert sum(torch.Size(s).numel() for s in llama_shapes(LLAMA_13B).values()) == 13_015_864_320
    assert (
        sum(torch.Size(s).numel() for s in projector_shapes("mlp2x_gelu", LLAMA_13B).values())
        == 31_467_520
    )
    assert projector_shapes("linear", LLAMA_7B) == {"weight": (4096, 1024), "bias": (4096,)}
    assert projector_shapes("mlp3x_gelu", TINY)["4.weight"] == (64, 64)
    assert projector_shapes("mlp2x_res2x_gelu", TINY)["4.proj.2.weight"] == (64, 64)
    with pytest.raises(ValueError, match="Unknown projector type: resampler"):
        projector_shapes("resampler", TINY)


# ----------------------------------------------------------------------------------------------
# pretrain, LoRA dir, checkpoint
# ----------------------------------------------------------------------------------------------


def test_lora_dir_layout_and_projector_close_to_pretrain(tmp_path, tiny_base):
    pre = build_pretrain(tmp_path / "llava-v1.5-tiny-pretrain", TINY, base=tiny_base)
    pre_w = bin_load(pre / "mm_projector.bin")
    assert set(pre_w) == {f"model.mm_projector.{k}" for k in projector_shapes("mlp2x_gelu", TINY)}
    assert all(v.dtype == torch.bfloat16 for v in pre_w.values())
    lora = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=tiny_base, projector_from=pre)
    assert sorted(p.name for p in lora.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "non_lora_trainables.bin",
        "trainer_state.json",
    ]
    cfg = json.loads((lora / "config.json").read_text())
    assert cfg["_name_or_path"] == str(tiny_base)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llava_llama"
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["use_mm_proj"] is True
    adapter = st_tensors(lora / "adapter_model.safetensors")
    assert len(adapter) == 14 * TINY.layers
    assert all(v.dtype == torch.bfloat16 for v in adapter.values())
    assert any(torch.count_nonzero(v) for k, v in adapter.items() if ".lora_B." in k)
    non_lora = bin_load(lora / "non_lora_trainables.bin")
    for sub in projector_shapes("mlp2x_gelu", TINY):
        ft = non_lora[f"base_model.model.model.mm_projector.{sub}"].float()
        pt = pre_w[f"model.mm_projector.{sub}"].float()
        rel = ((ft - pt).norm() / pt.norm()).item()
        assert 0.0 < rel < 0.15, (sub, rel)
    random_proj = build_lora(tmp_path / "r-lora", TINY, base=tiny_base)
    ft = bin_load(random_proj / "non_lora_trainables.bin")[
        "base_model.model.model.mm_projector.0.weight"
    ]
    assert (
        (ft.float() - pre_w["model.mm_projector.0.weight"].float()).norm()
        / pre_w["model.mm_projector.0.weight"].float().norm()
    ).item() > 0.5


@pytest.mark.parametrize(
    "style,keys",
    [
        (
            "canonical",
            {
                "base_model.model.model.mm_projector.0.weight",
                "base_model.model.model.image_newline",
            },
        ),
        (
            "ddp",
            {
                "module.base_model.model.model.mm_projector.0.weight",
                "module.base_model.model.model.image_newline",
            },
        ),
        ("bare", {"mm_projector.0.weight", "image_newline"}),
        (
            "llava-hf",
            {
                "multi_modal_projector.linear_1.weight",
                "multi_modal_projector.linear_2.bias",
                "image_newline",
            },
        ),
    ],
)
def test_non_lora_styles(tmp_path, style, keys):
    lora = build_lora(
        tmp_path / "llava-v1.5-tiny-lora",
        TINY,
        non_lora_style=style,
        image_newline=True,
        mm_patch_merge_type="spatial_unpad",
    )
    got = bin_load(lora / "non_lora_trainables.bin")
    assert keys <= set(got) and len(got) == 5
    empty = build_lora(tmp_path / "e-lora", TINY, non_lora_style="empty")
    assert bin_load(empty / "non_lora_trainables.bin") == {}


def test_task_lora_from_llava_base(tmp_path):
    base = build_base(tmp_path / "llava-v1.5-tiny", TINY, llava=True)
    lora = build_lora(
        tmp_path / "llava-v1.5-tiny-task-lora",
        TINY,
        base=base,
        trained_from="llava",
        projector_from=base,
        quantization_config=True,
        model_type="llava",
        extra_config={"mm_vision_tower": "/mnt/clip"},
    )
    cfg = json.loads((lora / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava"
    assert cfg["quantization_config"]["load_in_4bit"] is True
    assert cfg["mm_vision_tower"] == "/mnt/clip"
    acfg = json.loads((lora / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(base)


def test_untrained_lora_and_modules_to_save(tmp_path):
    lora = build_lora(
        tmp_path / "llava-v1.5-tiny-lora",
        TINY,
        trained=False,
        adapter_format="bin",
        peft_version="0.6.0",
        modules_to_save=["lm_head"],
    )
    adapter = bin_load(lora / "adapter_model.bin")
    assert all(torch.count_nonzero(v) == 0 for k, v in adapter.items() if ".lora_B." in k)
    assert adapter["base_model.model.lm_head.weight"].shape == (TINY.vocab, TINY.hidden)
    assert not (lora / "adapter_model.safetensors").exists()


def test_add_checkpoint_is_a_trainer_save(tmp_path):
    lora = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY)
    ckpt = add_checkpoint(lora, 50)
    assert ckpt == lora / "checkpoint-50"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "trainer_state.json",
        "training_args.bin",
    ]
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 50
    args = bin_load(ckpt / "training_args.bin")
    assert isinstance(args, dict) and args["save_steps"] == 50
    final = st_tensors(lora / "adapter_model.safetensors")
    early = st_tensors(ckpt / "adapter_model.safetensors")
    assert final.keys() == early.keys()
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.equal(final[k], early[k])


# ----------------------------------------------------------------------------------------------
# the standard set
# ----------------------------------------------------------------------------------------------


def test_build_all_is_fast_small_and_complete(tmp_path):
    start = time.perf_counter()
    paths = build_all(tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, elapsed
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size < 5 * 2**20, size
    assert set(paths) == set(SCENARIOS)
    assert all(p.exists() for p in paths.values())
    assert not canary_path(paths["LD502-malicious-pickle"]).exists()


BAD_ST = {"LD501-truncated-safetensors", "LD504-lfs-pointer"}
BAD_BIN = {"LD502-malicious-pickle"}


def test_every_safetensors_file_opens_except_the_broken_ones(scenarios):
    root = scenarios["base-vicuna"].parent
    seen = 0
    for f in sorted(root.rglob("*.safetensors")):
        if any(str(f).startswith(str(scenarios[n])) for n in BAD_ST):
            with pytest.raises(SafetensorError):
                safe_open(str(f), "pt").keys()
        else:
            st_shapes(f)
            seen += 1
    assert seen > 15


def test_every_bin_loads_weights_only_except_the_malicious_one(scenarios):
    root = scenarios["base-vicuna"].parent
    seen = 0
    for f in sorted(root.rglob("*.bin")):
        if (
            any(str(f).startswith(str(scenarios[n]) + "/") for n in BAD_BIN)
            and f.name == "non_lora_trainables.bin"
        ):
            continue
        assert isinstance(bin_load(f), dict), f
        seen += 1
    assert seen > 15


def test_malicious_pickle_is_refused_by_weights_only_and_never_runs(scenarios):
    d = scenarios["LD502-malicious-pickle"]
    f = d / "non_lora_trainables.bin"
    with zipfile.ZipFile(f) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert b"cos\nsystem\n" in pkl
    assert str(canary_path(d)).encode() in pkl
    with pytest.raises(pickle.UnpicklingError):
        torch.load(f, map_location="cpu", weights_only=True)
    assert not canary_path(d).exists()


def test_broken_scenarios(scenarios):
    s = scenarios
    assert not (s["LD101-no-config"] / "config.json").exists()
    assert (s["LD101-no-config"] / "adapter_config.json").is_file()
    assert [p.name for p in s["LD102-only-non-lora"].iterdir()] == ["non_lora_trainables.bin"]
    assert not (s["LD103-no-adapter-config"] / "adapter_config.json").exists()
    ck = s["LD104-checkpoint-no-non-lora"]
    assert ck.name == "checkpoint-50" and (ck / "config.json").is_file()
    assert not (ck / "non_lora_trainables.bin").exists()
    assert not any(p.is_file() for p in ck.parent.iterdir())
    assert st_shapes(s["LD105-empty-adapter"] / "adapter_model.safetensors") == {}
    zero = st_shapes(s["LD105-zero3-shapes"] / "adapter_model.safetensors")
    assert len(zero) == 14 * TINY.layers and set(zero.values()) == {(0,)}
    assert {
        tuple(v.shape)
        for v in bin_load(s["LD105-zero3-shapes"] / "non_lora_trainables.bin").values()
    } == {(0,)}
    assert "lora" not in s["LD106-name-without-lora"].name
    assert sorted(p.name for p in s["LD107-pretrain-dir"].iterdir()) == [
        "config.json",
        "mm_projector.bin",
        "trainer_state.json",
    ]
    d = s["LD108-bin-and-safetensors"]
    a, b = st_tensors(d / "adapter_model.safetensors"), bin_load(d / "adapter_model.bin")
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
    d = s["LD503-fp16-overflow"]
    big = [
        v
        for v in st_tensors(d / "adapter_model.safetensors").values()
        if v.float().abs().max() > 65504
    ]
    assert big and big[0].dtype == torch.bfloat16 and not torch.isfinite(big[0].half()).all()
    proj = bin_load(d / "non_lora_trainables.bin")["base_model.model.model.mm_projector.0.weight"]
    assert proj.float().abs().max() > 65504
    text = (s["LD504-lfs-pointer"] / "adapter_model.safetensors").read_text()
    assert text.startswith("version https://git-lfs.github.com/spec/v1\noid sha256:")
    ckpt = s["checkpoint-50"]
    assert not (ckpt / "config.json").exists() and not (ckpt / "non_lora_trainables.bin").exists()
    assert (ckpt.parent / "config.json").is_file()
    untrained = st_tensors(s["lora-untrained"] / "adapter_model.safetensors")
    assert all(torch.count_nonzero(v) == 0 for k, v in untrained.items() if ".lora_B." in k)
    dora = st_shapes(s["lora-dora-rslora"] / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in dora) == 7 * TINY.layers


def test_all_linear_is_expanded_as_the_writing_peft_version_did(tmp_path):
    old = build_lora(
        tmp_path / "old-lora", TINY, target_modules="all-linear", peft_version="0.10.0"
    )
    assert sorted(
        json.loads((old / "adapter_config.json").read_text())["target_modules"]
    ) == sorted(LORA_TARGETS)
    new = build_lora(
        tmp_path / "new-lora", TINY, target_modules="all-linear", peft_version="0.14.0"
    )
    assert (
        "model.layers.1.mlp.down_proj"
        in json.loads((new / "adapter_config.json").read_text())["target_modules"]
    )


def test_readme_describes_every_scenario():
    readme = Path(__file__).resolve().parents[1] / "fixtures" / "README.md"
    if not readme.is_file():
        pytest.skip("fixtures/README.md is not part of an installed package")
    text = readme.read_text()
    assert [n for n in SCENARIOS if f"| `{n}` |" not in text] == []
