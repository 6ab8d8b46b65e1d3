"""The streaming merge against the references it must reproduce.

* Every output tensor of the language model is compared with peft's own pipeline
  (`LlamaForCausalLM.from_pretrained(base)` -> `PeftModel.from_pretrained(lora)` ->
  `merge_and_unload()`, in float32) within float16 rounding, for each adapter variant.
* Projector / image_newline tensors are compared, bit for bit, with what LLaVA's builder loads:
  its key rewrite of non_lora_trainables.bin followed by `load_state_dict(strict=False)` into a
  float16 model (for key styles LLaVA would drop, the keys `llava-doctor fix` rewrites them to).
* The merged directory loads with transformers' `LlamaForCausalLM` and gives the logits of
  peft's merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llava_doctor.fixtures import TINY, build_base, build_lora, build_pretrain
from llava_doctor.merge import merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FP16_ULP = 2.0 ** -10


# ------------------------------------------------------------------------------ references
def peft_merged(base: Path, lora: Path) -> torch.nn.Module:
    """peft's pipeline, in float32 so the reference itself carries no rounding."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, lora).merge_and_unload()


def read_output(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    assert set(tensors) == set(index["weight_map"])
    return tensors


def read_base(base: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(base.glob("*.safetensors")):
        out.update(load_file(str(p)))
    for p in sorted(base.glob("*.bin")):
        if p.name != "mm_projector.bin":
            out.update(torch.load(p, map_location="cpu", weights_only=True))
    return out


def llava_builder_state(lora: Path, base: Path, rename: dict[str, str] | None = None,
                        ) -> dict[str, torch.Tensor]:
    """The float16 state LLaVA's builder produces before PEFT: base, then non_lora_trainables
    rewritten exactly as builder.py does and loaded with strict=False (keys naming no parameter
    are dropped). ``rename`` first maps keys the way `llava-doctor fix` rewrites them."""
    cfg = json.loads((lora / "config.json").read_text())
    state = {k: v.to(torch.float16) for k, v in read_base(base).items()}
    params = set(state)
    h, c = cfg["hidden_size"], cfg["mm_hidden_size"]
    if cfg["mm_projector_type"] == "linear":
        params |= {"model.mm_projector.weight", "model.mm_projector.bias"}
    else:
        depth = int(cfg["mm_projector_type"][3])
        for i in range(depth):
            params |= {f"model.mm_projector.{2 * i}.weight", f"model.mm_projector.{2 * i}.bias"}
    if "unpad" in cfg.get("mm_patch_merge_type", ""):
        params.add("model.image_newline")
    del h, c
    raw = torch.load(lora / "non_lora_trainables.bin", map_location="cpu", weights_only=True)
    if rename:
        raw = {rename.get(k, k): v for k, v in raw.items()}
    # builder.py, verbatim in spirit:
    non_lora = {(k[11:] if k.startswith("base_model.") else k): v for k, v in raw.items()}
    if any(k.startswith("model.model.") for k in non_lora):
        non_lora = {(k[6:] if k.startswith("model.") else k): v for k, v in non_lora.items()}
    for k, v in non_lora.items():
        if k in params:
            state[k] = v.to(torch.float16)
    return state


def assert_close_fp16(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert ours.dtype == torch.float16, name
    assert tuple(ours.shape) == tuple(ref.shape), name
    ok = torch.isclose(ours.float(), ref.float(), rtol=FP16_ULP, atol=2.0 ** -24)
    assert bool(ok.all()), (f"{name}: max abs diff {(ours.float() - ref.float()).abs().max()}")


def check_against_references(out: Path, base: Path, lora: Path,
                             rename: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    ours = read_output(out)
    ref = {k: v for k, v in peft_merged(base, lora).state_dict().items()}
    llm = {k for k in ours
           if not k.startswith("model.mm_projector.") and k != "model.image_newline"}
    assert llm == set(ref), (sorted(llm ^ set(ref))[:5])
    for k in sorted(llm):
        assert_close_fp16(ours[k], ref[k], k)
    builder = llava_builder_state(lora, base, rename)
    multimodal = sorted(set(ours) - llm)
    assert multimodal, "the merged model has no projector"
    for k in multimodal:
        assert torch.equal(ours[k], builder[k]), k
    return ours


# ------------------------------------------------------------------------------- fixtures
def biased_base(path: Path) -> Path:
    """A tiny Llama with attention_bias and mlp_bias (lora_bias needs base biases)."""
    build_base(path, TINY, shards=1)
    st = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    for i in range(TINY.layers):
        for proj, width in (("self_attn.q_proj", TINY.hidden), ("self_attn.k_proj", TINY.kv_dim),
                            ("self_attn.v_proj", TINY.kv_dim), ("self_attn.o_proj", TINY.hidden),
                            ("mlp.gate_proj", TINY.intermediate),
                            ("mlp.up_proj", TINY.intermediate),
                            ("mlp.down_proj", TINY.hidden)):
            st[f"model.layers.{i}.{proj}.bias"] = (torch.randn(width, generator=g) * 0.02).half()
    save_file(st, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(attention_bias=True, mlp_bias=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-peft")
    w = {
        "vicuna": build_base(root / "vicuna-tiny", TINY),
        "vicuna-bin": build_base(root / "vicuna-tiny-bin", TINY, fmt="bin",
                                 generation_config="valid"),
        "llava": build_base(root / "llava-v1.5-tiny", TINY, llava=True),
        "llava-linear": build_base(root / "llava-tiny-linear", TINY, llava=True,
                                   projector_type="linear"),
        "biased": biased_base(root / "vicuna-tiny-biased"),
        "root": root,
    }
    w["pretrain"] = build_pretrain(root / "llava-v1.5-tiny-pretrain", TINY, base=w["vicuna"])
    w["pretrain-linear"] = build_pretrain(root / "llava-tiny-linear-pretrain", TINY,
                                          projector_type="linear", base=w["vicuna"])
    return w


# name -> (base key, build_lora kwargs, projector pretrain key or None)
CASES: dict[str, tuple[str, dict, str | None]] = {
    "plain": ("vicuna", {}, "pretrain"),
    "adapter-bin": ("vicuna", {"adapter_format": "bin", "peft_version": "0.6.0"}, "pretrain"),
    "base-bin": ("vicuna-bin", {}, "pretrain"),
    "rslora": ("vicuna", {"use_rslora": True, "r": 16, "alpha": 32}, "pretrain"),
    "rank-alpha-patterns": ("vicuna", {
        "r": 8, "alpha": 16, "peft_version": "0.15.0",
        "rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 12},
        "alpha_pattern": {"v_proj": 40, "layers.0.self_attn.o_proj": 3}}, "pretrain"),
    "dora": ("vicuna", {"use_dora": True, "peft_version": "0.21.2"}, "pretrain"),
    "dora-rslora-embedding": ("vicuna", {"use_dora": True, "use_rslora": True, "embed_lora": True,
                                         "peft_version": "0.21.2"}, "pretrain"),
    "lora-bias": ("biased", {"lora_bias": True, "peft_version": "0.14.0"}, "pretrain"),
    "embedding-lora": ("vicuna", {"embed_lora": True}, "pretrain"),
    "modules-to-save": ("vicuna", {"modules_to_save": ["lm_head"]}, "pretrain"),
    "fan-in-fan-out-ignored": ("vicuna", {"extra_adapter_config": {"fan_in_fan_out": True}},
                               "pretrain"),
    "linear-projector": ("vicuna", {"projector_type": "linear", "r": 64, "alpha": 16,
                                    "peft_version": "0.6.0", "adapter_format": "bin"},
                         "pretrain-linear"),
    "task-lora": ("llava", {"trained_from": "llava"}, None),
    "task-lora-linear": ("llava-linear", {"trained_from": "llava", "projector_type": "linear"},
                         None),
}


def _lora(world: dict[str, Path], name: str, base_key: str, kwargs: dict,
          pre_key: str | None) -> Path:
    kwargs = dict(kwargs)
    if pre_key is not None:
        kwargs.setdefault("projector_from", world[pre_key])
    elif kwargs.get("trained_from") == "llava":
        kwargs.setdefault("projector_from", world[base_key])
    return build_lora(world["root"] / name / f"llava-v1.5-tiny-{name}-lora", TINY,
                      base=world[base_key], **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_tensor_matches_peft_and_llava_builder(world: dict[str, Path], case: str) -> None:
    base_key, kwargs, pre_key = CASES[case]
    lora = _lora(world, case, base_key, kwargs, pre_key)
    out = lora.parent / f"llava-v1.5-tiny-{case}-merged"
    result = merge(lora, world[base_key], out, device="cpu", durable=False)
    assert result.verified is not None and result.verified.sampled
    ours = check_against_references(out, world[base_key], lora)
    n_lora = sum(1 for k in load_file(str(next(lora.glob("adapter_model.safetensors"))))
                 if ".lora_A." in k or "lora_embedding_A" in k) \
        if (lora / "adapter_model.safetensors").is_file() else result.lora_modules
    assert result.lora_modules == n_lora
    assert "model.mm_projector.0.weight" in ours or "model.mm_projector.weight" in ours


def test_fan_in_fan_out_on_linear_is_ignored_like_peft(world: dict[str, Path]) -> None:
    lora = _lora(world, "fifo-note", "vicuna", {"extra_adapter_config": {"fan_in_fan_out": True}},
                 "pretrain")
    result = merge(lora, world["vicuna"], lora.parent / "llava-fifo-merged", device="cpu",
                   durable=False)
    assert any("fan_in_fan_out" in n and "peft ignores" in n for n in result.notes)


@pytest.mark.parametrize("style", ["ddp", "bare", "llava-hf"])
def test_non_lora_key_styles_land_where_llava_puts_them(world: dict[str, Path], style: str) -> None:
    lora = _lora(world, f"style-{style}", "vicuna", {"non_lora_style": style}, "pretrain")
    out = lora.parent / f"llava-v1.5-tiny-{style}-merged"
    result = merge(lora, world["vicuna"], out, device="cpu", durable=False)
    assert "keys normalised" in result.projector_source
    # The names `llava-doctor fix` gives these keys, which LLaVA's builder then loads.
    raw = torch.load(lora / "non_lora_trainables.bin", map_location="cpu", weights_only=True)
    rename = {}
    for k in raw:
        sub = k.split("mm_projector.", 1)[-1] if "mm_projector." in k else None
        if style == "llava-hf":
            i, kind = k.split("linear_", 1)[1].split(".")
            sub = f"{2 * (int(i) - 1)}.{kind}"
        rename[k] = f"base_model.model.model.mm_projector.{sub}"
    check_against_references(out, world["vicuna"], lora, rename)


def test_stage1_projector_used_only_when_neither_has_one(world: dict[str, Path]) -> None:
    lora = _lora(world, "frozen-projector", "vicuna", {"non_lora_style": "empty"}, "pretrain")
    out = lora.parent / "llava-v1.5-tiny-frozen-merged"
    result = merge(lora, world["vicuna"], out, projector=world["pretrain"] / "mm_projector.bin",
                   device="cpu", durable=False)
    assert result.projector_source.startswith("stage-1 projector")
    assert any("stage-1" in n for n in result.notes)
    ours = read_output(out)
    stage1 = torch.load(world["pretrain"] / "mm_projector.bin", weights_only=True)
    for k, v in stage1.items():
        assert torch.equal(ours[k], v.to(torch.float16)), k


def test_task_lora_with_frozen_projector_keeps_the_base_projector(world: dict[str, Path]) -> None:
    lora = _lora(world, "task-frozen", "llava",
                 {"trained_from": "llava", "non_lora_style": "empty"}, None)
    out = lora.parent / "llava-v1.5-tiny-task-frozen-merged"
    result = merge(lora, world["llava"], out, device="cpu", durable=False)
    assert result.projector_source.startswith("base model")
    ours = read_output(out)
    base = read_base(world["llava"])
    for k in (k for k in base if k.startswith("model.mm_projector.")):
        assert torch.equal(ours[k], base[k]), k


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16),
                                                ("float32", torch.float32)])
def test_output_dtypes(world: dict[str, Path], dtype: str, torch_dtype: torch.dtype) -> None:
    lora = _lora(world, f"dtype-{dtype}", "vicuna", {}, "pretrain")
    out = lora.parent / f"llava-v1.5-tiny-{dtype}-merged"
    merge(lora, world["vicuna"], out, device="cpu", dtype=dtype, durable=False)
    ours = read_output(out)
    ref = peft_merged(world["vicuna"], lora).state_dict()
    eps = torch.finfo(torch_dtype).eps
    for k, v in ref.items():
        assert ours[k].dtype == torch_dtype, k
        assert torch.allclose(ours[k].float(), v, rtol=eps, atol=1e-6), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == dtype


def test_auto_dtype_keeps_the_base_dtype(world: dict[str, Path]) -> None:
    lora = _lora(world, "dtype-auto", "vicuna", {}, "pretrain")
    out = lora.parent / "llava-v1.5-tiny-auto-merged"
    result = merge(lora, world["vicuna"], out, device="cpu", dtype="auto", durable=False)
    assert result.dtype == "float16"
    ours = read_output(out)
    assert {v.dtype for v in ours.values()} == {torch.float16}  # the base is float16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_merged_dir_loads_in_transformers_with_peft_logits(world: dict[str, Path]) -> None:
    from transformers import LlamaForCausalLM

    lora = _lora(world, "logits", "vicuna", {"use_dora": True, "peft_version": "0.21.2"},
                 "pretrain")
    out = lora.parent / "llava-v1.5-tiny-logits-merged"
    merge(lora, world["vicuna"], out, device="cpu", durable=False)
    ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = peft_merged(world["vicuna"], lora).to(torch.float16).to(torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 64, 127]])
    with torch.no_grad():
        a = ours(ids).logits
        b = ref(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


def test_lora_on_the_projector_matches_peft_on_a_llava_shaped_model(world: dict[str, Path]) -> None:
    """A task LoRA whose targets include the projector's linears (LD209): peft, given a model
    that has LLaVA's `model.mm_projector` loaded the way the builder loads it, merges the same
    deltas into it as we do."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llava_doctor.fixtures import LORA_TARGETS

    lora = _lora(world, "projector-lora", "llava",
                 {"trained_from": "llava",
                  "target_modules": [*LORA_TARGETS, "mm_projector.0", "mm_projector.2"]}, None)
    out = lora.parent / "llava-v1.5-tiny-projector-lora-merged"
    merge(lora, world["llava"], out, device="cpu", durable=False)
    ours = read_output(out)

    model = LlamaForCausalLM.from_pretrained(world["llava"], dtype=torch.float32)
    proj = torch.nn.Sequential(torch.nn.Linear(TINY.mm_hidden, TINY.hidden), torch.nn.GELU(),
                               torch.nn.Linear(TINY.hidden, TINY.hidden))
    model.model.mm_projector = proj
    builder = llava_builder_state(lora, world["llava"])
    with torch.no_grad():
        for k, v in builder.items():
            if k.startswith("model.mm_projector."):
                proj.get_parameter(k[len("model.mm_projector."):]).copy_(v.float())
    ref = PeftModel.from_pretrained(model, lora).merge_and_unload().state_dict()
    assert set(ref) == set(ours)
    for k in sorted(ref):
        assert_close_fp16(ours[k], ref[k], k)
    base_proj = read_base(world["llava"])["model.mm_projector.0.weight"]
    assert not torch.equal(ours["model.mm_projector.0.weight"], base_proj)  # it did change
