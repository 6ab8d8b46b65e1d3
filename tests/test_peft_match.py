"""peft_match against peft itself: same modules wrapped, same rank/alpha/scale, same keys."""

from __future__ import annotations

import math
import warnings

import pytest

from llava_doctor.artifacts.peft_match import (
    adapter_modules,
    config_matches,
    effective_r_alpha,
    get_pattern_key,
    lora_scaling,
    module_scaling,
    parse_adapter_keys,
    prepared,
    target_matches,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key as peft_get_pattern_key  # noqa: E402


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=40)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def names() -> list[str]:
    return [n for n, _ in _tiny_llama().named_modules() if n]


@pytest.fixture(scope="module")
def linear(names) -> set[str]:
    model = _tiny_llama()
    return {n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Specs that exercise every branch of check_target_module_exists.
SPECS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=ALL7),
    dict(target_modules=r".*\.(q_proj|v_proj)"),
    dict(target_modules=r"model\.layers\.1\..*_proj"),
    dict(target_modules=r"q_proj"),  # a string never matches by suffix: fullmatch only
    dict(target_modules=ALL7, layers_to_transform=[1]),
    dict(target_modules=ALL7, layers_to_transform=2, layers_pattern="layers"),
    dict(target_modules=ALL7, layers_to_transform=[0, 2], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=ALL7, exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]),
    dict(target_modules=ALL7, exclude_modules=r".*layers\.2\..*"),
    dict(target_modules=["q_proj", "embed_tokens", "lm_head"]),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
    dict(target_modules=["self_attn.q_proj", "mlp.down_proj"]),
]


@pytest.mark.parametrize("spec", SPECS, ids=[str(i) for i in range(len(SPECS))])
def test_target_matches_equals_peft_check(spec, names):
    cfg = LoraConfig(**spec)
    fast = prepared(spec)
    for name in names:
        want = bool(check_target_module_exists(cfg, name))
        assert config_matches(spec, name) is want, (spec, name)
        assert config_matches(fast, name) is want, (spec, name)  # lists as frozensets


def _wrapped(model) -> dict[str, tuple[int, float]]:
    return {n[len("base_model.model."):]: (m.r["default"], m.scaling["default"])
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


PEFT_MODEL_SPECS = [
    dict(target_modules=ALL7, r=8, lora_alpha=16),
    dict(target_modules=r".*\.(q_proj|o_proj|down_proj)", r=4, lora_alpha=8, use_rslora=True),
    dict(target_modules=ALL7, r=8, lora_alpha=16,
         rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
         alpha_pattern={"v_proj": 32, "^model.layers.0.self_attn.k_proj": 3}),
    dict(target_modules=ALL7, r=8, lora_alpha=16, use_rslora=True,
         rank_pattern={"model.layers.2.self_attn.o_proj": 6}, alpha_pattern={"gate_proj": 5}),
    dict(target_modules=ALL7, layers_to_transform=[0, 2], layers_pattern="layers",
         exclude_modules=["up_proj"], r=2, lora_alpha=4),
    dict(target_modules="all-linear", exclude_modules=["k_proj"], r=4, lora_alpha=4),
    dict(target_modules=["q_proj", "embed_tokens"], r=4, lora_alpha=12,
         rank_pattern={"embed_tokens": 2}),
]


@pytest.mark.parametrize("spec", PEFT_MODEL_SPECS,
                         ids=[str(i) for i in range(len(PEFT_MODEL_SPECS))])
def test_same_modules_rank_and_scale_as_get_peft_model(spec, names, linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_tiny_llama(), LoraConfig(**spec))
    got = _wrapped(model)
    ours = {n for n in names if config_matches(spec, n, linear_modules=linear)}
    # peft only wraps layers it supports; our matcher is applied to those (Linear/Embedding).
    wrappable = {n for n, m in _tiny_llama().named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    assert ours & wrappable == set(got)
    for name, (r, scaling) in got.items():
        assert effective_r_alpha(spec, name)[0] == r, name
        assert module_scaling(spec, name) == pytest.approx(scaling, rel=0, abs=0), name


@pytest.mark.parametrize("keys,module", [
    (["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj"),
    ([r"layers\.[01]\.self_attn\.o_proj", "o_proj"], "model.layers.1.self_attn.o_proj"),
    (["^model.layers.0.mlp.up_proj"], "model.layers.0.mlp.up_proj"),
    (["up_proj"], "model.layers.0.mlp.up_proj_extra"),
    (["model.layers.0.mlp.up_proj"], "model.layers.0.mlp.up_proj"),
    (["p_proj"], "model.layers.0.mlp.up_proj"),
])
def test_get_pattern_key_equals_peft(keys, module):
    assert get_pattern_key(keys, module) == peft_get_pattern_key(keys, module)


def test_old_peft_pattern_rules():
    """peft 0.6-0.13 search rank and alpha keys together; 0.14 separately; anchors need 0.15."""
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4},
           "alpha_pattern": {"layers.0.self_attn.q_proj": 32}}
    m = "model.layers.0.self_attn.q_proj"
    assert effective_r_alpha(cfg, m, "0.10.0") == (4, 16)   # alpha key missed (combined search)
    assert effective_r_alpha(cfg, m, "0.14.0") == (4, 32)
    assert effective_r_alpha(cfg, m) == (4, 32)
    assert effective_r_alpha(cfg, m, "0.5.0") == (8, 16)    # no patterns at all before 0.6
    anchored = {"r": 8, "lora_alpha": 16, "rank_pattern": {"^model.layers.0.self_attn.q_proj": 2}}
    assert effective_r_alpha(anchored, m, "0.14.0") == (8, 16)
    assert effective_r_alpha(anchored, m, "0.15.0") == (2, 16)
    # the old regex needs a dot before the key, so a bare full name only works as an exact key
    assert get_pattern_key(["model.layers.0.self_attn.q_proj"], m, "0.10.0") == m


def test_scaling_and_rslora_before_0_8():
    assert lora_scaling(128, 256) == 2.0
    assert lora_scaling(128, 256, use_rslora=True) == 256 / math.sqrt(128)
    cfg = {"r": 16, "lora_alpha": 32, "use_rslora": True}
    assert module_scaling(cfg, "model.layers.0.self_attn.q_proj") == 8.0
    # peft < 0.8 does not know rslora: plain alpha/r whatever the flag says
    assert module_scaling(cfg, "model.layers.0.self_attn.q_proj", "0.7.1") == 2.0


def test_all_linear_needs_the_linear_set():
    assert not target_matches("all-linear", "model.layers.0.self_attn.q_proj")
    assert target_matches("ALL-LINEAR", "model.layers.0.self_attn.q_proj",
                          linear_modules={"model.layers.0.self_attn.q_proj"})


def test_adapter_keys_of_a_real_peft_save(tmp_path, names):
    """Every key peft saves maps to a module of the base with the right role."""
    spec = dict(target_modules=["q_proj", "down_proj", "embed_tokens"], r=4, lora_alpha=8,
                use_dora=True, modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_tiny_llama(), LoraConfig(**spec))
        model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    parsed = parse_adapter_keys(keys)
    assert parsed.unprefixed == []
    mods = parsed.modules
    assert set(mods) <= set(names)
    q = mods["model.layers.0.self_attn.q_proj"]
    assert q.A == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert q.B == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert q.magnitude == "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    emb = mods["model.embed_tokens"]
    assert emb.embedding_A == "base_model.model.model.embed_tokens.lora_embedding_A"
    assert emb.embedding_B == "base_model.model.model.embed_tokens.lora_embedding_B"
    assert emb.weight == "base_model.model.model.embed_tokens.base_layer.weight"
    assert mods["lm_head"].weight == "base_model.model.lm_head.weight"
    assert all(not m.other for m in mods.values())
    assert sum(len(m.keys()) for m in mods.values()) == len(keys)


def test_adapter_keys_lora_bias_and_odd_keys():
    keys = [
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight",
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.bias",
        "base_model.model.model.layers.0.mlp.up_proj.bias",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight",
        "model.layers.0.self_attn.q_proj.lora_A.weight",
    ]
    parsed = parse_adapter_keys(keys)
    up = parsed.modules["model.layers.0.mlp.up_proj"]
    assert (up.lora_bias, up.bias) == (keys[2], keys[3])
    assert parsed.modules["model.layers.1.self_attn.q_proj"].other == [keys[4]]
    assert parsed.unprefixed == [keys[5]]
    assert set(adapter_modules(keys)) == {"model.layers.0.mlp.up_proj",
                                          "model.layers.1.self_attn.q_proj"}
