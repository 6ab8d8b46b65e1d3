"""After `fix`, LLaVA's own loading path accepts the dir.

`llava_lora_branch` replays haotian-liu/LLaVA @ c121f04 `model/builder.py:load_pretrained_model`'s
LoRA branch step by step with transformers and peft (the test extra): the name dispatch,
`LlavaConfig.from_pretrained(model_path)`, `LlavaLlamaForCausalLM.from_pretrained(model_base,
config=...)` (mimicked: transformers' `LlamaForCausalLM` plus the `model.mm_projector` that
`LlavaMetaModel.__init__` builds from the config), the `non_lora_trainables.bin` key rewrite
exactly as written there, `load_state_dict(strict=False)`, `PeftModel.from_pretrained` and
`merge_and_unload`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_fix_support import edit_config, lora_dir
from torch import nn
from typer.testing import CliRunner

from llava_doctor.artifacts.llava import get_model_name_from_path
from llava_doctor.cli import app
from llava_doctor.fixtures import add_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class LlavaConfig(transformers.LlamaConfig):
    """llava/model/language_model/llava_llama.py: LlavaConfig(LlamaConfig)."""

    model_type = "llava_llama"


def build_vision_projector(config: Any) -> nn.Module:
    """llava/model/multimodal_projector/builder.py (linear and mlpNx_gelu)."""
    ptype = getattr(config, "mm_projector_type", "linear")
    if ptype == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    m = re.match(r"^mlp(\d+)x_gelu$", ptype)
    if m:
        modules: list[nn.Module] = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
        for _ in range(1, int(m.group(1))):
            modules += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
        return nn.Sequential(*modules)
    raise ValueError(f"Unknown projector type: {ptype}")


class LlavaLlamaForCausalLM(transformers.LlamaForCausalLM):
    """LlamaForCausalLM whose inner model has the projector LlavaMetaModel builds."""

    config_class = LlavaConfig

    def __init__(self, config: Any):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None) is not None:  # LlavaMetaModel.__init__
            self.model.mm_projector = build_vision_projector(config)


@dataclass
class Replay:
    non_lora: dict[str, torch.Tensor]    # after the builder's rewrite
    projector: dict[str, torch.Tensor]   # model.model.mm_projector.state_dict() after loading
    missing_adapter_keys: list[str]
    lora: dict[str, torch.Tensor]        # the PeftModel's lora_* parameters before merging
    merged: Any


def llava_lora_branch(model_path: str, model_base: str) -> Replay:
    """builder.py's LoRA branch, in order (device_map='cpu', torch_dtype=float16 as the merge
    script uses)."""
    model_name = get_model_name_from_path(model_path)
    if not ("llava" in model_name.lower() and "lora" in model_name.lower()):
        raise AssertionError(f"LLaVA would not take its LoRA branch for '{model_name}'")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        # LLaVA pins transformers 4.37.2, which raises this; transformers 5 would silently
        # return a default config instead.
        raise OSError(f"{model_path} does not appear to have a file named config.json.")
    lora_cfg_pretrained = LlavaConfig.from_pretrained(model_path)
    model = LlavaLlamaForCausalLM.from_pretrained(model_base, low_cpu_mem_usage=True,
                                                  config=lora_cfg_pretrained,
                                                  dtype=torch.float16)
    token_num, tokem_dim = model.lm_head.out_features, model.lm_head.in_features
    if model.lm_head.weight.shape[0] != token_num:
        model.lm_head.weight = nn.Parameter(torch.empty(token_num, tokem_dim, dtype=model.dtype))
        model.model.embed_tokens.weight = nn.Parameter(torch.empty(token_num, tokem_dim,
                                                                   dtype=model.dtype))
    # The real builder uses a plain torch.load; these are our own files, read weights_only.
    non_lora_trainables = torch.load(os.path.join(model_path, "non_lora_trainables.bin"),
                                     map_location="cpu", weights_only=True)
    non_lora_trainables = {(k[11:] if k.startswith("base_model.") else k): v
                           for k, v in non_lora_trainables.items()}
    if any(k.startswith("model.model.") for k in non_lora_trainables):
        non_lora_trainables = {(k[6:] if k.startswith("model.") else k): v
                               for k, v in non_lora_trainables.items()}
    model.load_state_dict(non_lora_trainables, strict=False)
    projector = {k: v.detach().clone() for k, v in model.model.mm_projector.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(model, model_path)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    merged = model.merge_and_unload()
    return Replay(non_lora_trainables, projector, missing, lora, merged)


def _assert_accepted(replay: Replay, lora: Path, projector_source: dict[str, torch.Tensor],
                     base: Path) -> None:
    # The projector the merge uses is the one in the file, loaded under its real names.
    assert sorted(replay.projector) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for sub, want in projector_source.items():
        assert replay.projector[sub].equal(want.to(torch.float16)), sub
    # Every adapter tensor landed on its module: no missing keys, values as saved.
    assert replay.missing_adapter_keys == []
    adapter = load_file(str(lora / "adapter_model.safetensors"))
    assert len(replay.lora) == len(adapter)
    for k, v in adapter.items():
        got = replay.lora[k.replace(".weight", ".default.weight")]
        assert got.equal(v.to(got.dtype)), k
    # ... and merging applied them: W' = W + (alpha / r) * B @ A.
    cfg = json.loads((lora / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = adapter[f"{pre}.lora_A.weight"].float(), adapter[f"{pre}.lora_B.weight"].float()
    w0 = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    got = replay.merged.model.layers[0].self_attn.q_proj.weight.float()
    assert torch.allclose(got, w0.float() + scale * (b @ a), atol=2e-3)


def test_checkpoint_of_a_misnamed_ddp_run_loads_after_fix(tmp_path: Path) -> None:
    """checkpoint-50 of a run called `output` whose final save used DDP key names and
    model_type 'llava': no config.json, no non_lora_trainables.bin, a name LLaVA routes to its
    plain-LLM branch. fix --unsafe: LD101 copy (+ LD406 on the copy), LD104 copy (+ LD305 on
    the copy), LD106 link."""
    run, base = lora_dir(tmp_path, "output", non_lora_style="ddp")
    edit_config(run / "config.json", model_type="llava")
    ckpt = add_checkpoint(run, 50)
    with pytest.raises(AssertionError, match="output_checkpoint-50"):
        llava_lora_branch(str(ckpt), str(base))
    (tmp_path / "llava-ckpt-lora").symlink_to(ckpt)  # even under a good name: no config.json
    with pytest.raises(OSError, match="does not appear to have a file named config.json"):
        llava_lora_branch(str(tmp_path / "llava-ckpt-lora"), str(base))
    (tmp_path / "llava-ckpt-lora").unlink()

    res = CliRunner().invoke(app, ["fix", str(ckpt), "--base", str(base), "--yes", "--unsafe"])
    assert res.exit_code == 0, res.output
    link = run / "llava-output-checkpoint-50-lora"
    assert f"--model-path {link} --model-base {base}" in res.output

    replay = llava_lora_branch(str(link), str(base))
    final = torch.load(run / "non_lora_trainables.bin", weights_only=True)
    source = {k.split("mm_projector.")[1]: v for k, v in final.items()}
    _assert_accepted(replay, ckpt, source, base)
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "llava_llama"


def test_ddp_keys_are_dropped_before_fix_and_loaded_after(tmp_path: Path) -> None:
    lora, base = lora_dir(tmp_path, non_lora_style="ddp")
    saved = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    source = {k.split("mm_projector.")[1]: v for k, v in saved.items()}

    before = llava_lora_branch(str(lora), str(base))
    assert all(k.startswith("module.") for k in before.non_lora)  # nothing the model has
    assert not any(before.projector[s].equal(v.to(torch.float16)) for s, v in source.items())

    res = CliRunner().invoke(app, ["fix", str(lora), "--base", str(base), "--yes"])
    assert res.exit_code == 0, res.output
    after = llava_lora_branch(str(lora), str(base))
    assert sorted(after.non_lora) == sorted(f"model.mm_projector.{s}" for s in source)
    _assert_accepted(after, lora, source, base)
