"""The merge's parts, one at a time: sizes, names, configs, key placement, refusals, the LoRA
maths against peft's own layers, the shard writer, the readers, the device path, verification."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llava_doctor.artifacts.weights import read_weight_file
from llava_doctor.errors import MergeError, UsageError
from llava_doctor.fixtures import TINY, build_base, build_lora, build_pretrain
from llava_doctor.merge import build_plan, resolve_device, resolve_inputs
from llava_doctor.merge.llava_parts import (
    fixed_generation_config,
    merged_config,
    out_name_warnings,
    place_non_lora,
)
from llava_doctor.merge.lora_math import LoraSpec, LoraTensors, apply_rows, reference_merge
from llava_doctor.merge.plan import check_adapter_config, parse_size
from llava_doctor.merge.sources import TensorSource
from llava_doctor.merge.stream import Executor
from llava_doctor.merge.verify import check_hashes, check_headers, check_sample, verify_output
from llava_doctor.merge.writer import HeaderEntry, ShardWriter, build_header


# ----------------------------------------------------------------------------- small pieces
@pytest.mark.parametrize("text,value", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000),
    ("100KB", 100_000), ("64kib", 65536), ("5e9", 5 * 10**9), ("123", 123), (5e9, 5 * 10**9),
    ("10 MB", 10**7),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_resolve_device_on_this_machine() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="unknown --device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize("name,family,expected", [
    ("llava-v1.5-7b-merged", "llama", []),
    ("merged", "llama", ["lacks 'llava'"]),
    ("llava-v1.5-7b-lora-merged", "llama", ["contains 'lora'"]),
    ("llava-prompt-merged", "llama", ["contains 'mpt'"]),
    ("llava-mistral-merged", "llama", ["contains 'mistral'"]),
    ("llava-v1.6-merged", "mistral", ["lacks 'mistral'"]),
    ("llava-v1.6-mistral-merged", "mistral", []),
    ("llava-v1.5-7b/checkpoint-500", "llama", []),  # named "llava-v1.5-7b_checkpoint-500"
])
def test_out_name_warnings(tmp_path: Path, name: str, family: str, expected: list[str]) -> None:
    got = out_name_warnings(tmp_path / name, family)
    assert len(got) == len(expected)
    for w, e in zip(got, expected, strict=True):
        assert e in w


def test_generation_config_fix_keeps_the_sampling_values() -> None:
    vicuna = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
              "temperature": 0.9, "top_p": 0.6, "transformers_version": "4.31.0"}
    fixed, note = fixed_generation_config(vicuna)
    assert fixed == {**vicuna, "do_sample": True}
    # one text for the version everywhere (LD404's regression test)
    assert note == ("generation_config.json: set do_sample=true (the base sets temperature=0.9, "
                    "top_p=0.6 without it, which transformers 4.37.2 (the version LLaVA pins; "
                    "LLaVA #1144) and later refuse to save)")
    valid = {"do_sample": False, "max_length": 4096}
    assert fixed_generation_config(valid) == (valid, None)
    assert fixed_generation_config({**vicuna, "do_sample": True})[1] is None
    # transformers' defaults are no reason to sample
    assert fixed_generation_config({"temperature": 1.0, "top_p": 1.0, "top_k": 50})[1] is None


def test_merged_config() -> None:
    lora_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llava", "vocab_size": 32000,
                "torch_dtype": "bfloat16", "quantization_config": {"load_in_4bit": True},
                "mm_vision_tower": "openai/clip-vit-large-patch14-336", "_name_or_path": "x"}
    cfg, notes = merged_config(lora_cfg, out_dtype="float16", base=Path("/models/vicuna"),
                               vocab_rows=32000)
    assert cfg == {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                   "vocab_size": 32000, "torch_dtype": "float16", "_name_or_path": "/models/vicuna",
                   "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    assert notes == ["config.json: removed quantization_config (a QLoRA training setting; the "
                     "merged weights are not quantized)",
                     "config.json: model_type 'llava' -> 'llava_llama'"]
    assert lora_cfg["quantization_config"] == {"load_in_4bit": True}  # the input is untouched


def test_place_non_lora_key_styles() -> None:
    cfg = {"mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad",
           "num_hidden_layers": 2}
    keys = ["base_model.model.model.mm_projector.0.weight",       # LLaVA's own
            "module.base_model.model.model.mm_projector.0.bias",  # DDP
            "mm_projector.2.weight",                              # bare
            "multi_modal_projector.linear_2.bias",                # llava-hf
            "base_model.model.model.image_newline",
            "base_model.model.model.embed_tokens.weight",
            "base_model.model.model.vision_tower.foo.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    p = place_non_lora(keys, cfg)
    assert p.placed == {
        "model.mm_projector.0.weight": keys[0], "model.mm_projector.0.bias": keys[1],
        "model.mm_projector.2.weight": keys[2], "model.mm_projector.2.bias": keys[3],
        "model.image_newline": keys[4], "model.embed_tokens.weight": keys[5],
        "model.vision_tower.foo.weight": keys[6]}
    assert set(p.renamed) == {keys[1], keys[2], keys[3]}
    assert p.dropped == {keys[7]: "names no parameter of LlavaLlamaForCausalLM"}
    flat = place_non_lora(["base_model.model.model.image_newline"], {"mm_patch_merge_type": "flat"})
    assert flat.dropped == {"base_model.model.model.image_newline": (
        "image_newline exists only with an 'unpad' mm_patch_merge_type, and config.json has "
        "'flat'")}
    linear = place_non_lora(["multi_modal_projector.linear_1.weight"],
                            {"mm_projector_type": "linear"})
    assert linear.placed == {"model.mm_projector.weight": "multi_modal_projector.linear_1.weight"}
    with pytest.raises(ValueError, match="both land on 'model.mm_projector.0.weight'"):
        place_non_lora(["base_model.model.model.mm_projector.0.weight",
                        "module.base_model.model.model.mm_projector.0.weight"], cfg)


@pytest.mark.parametrize("extra,shown", [
    ({"peft_type": "ADALORA"}, "peft_type ADALORA is not LoRA"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication=[[0, 2], [1, 2]]"),
    ({"use_qalora": True}, "use_qalora=True"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens=[5, 6]"),
    ({"target_parameters": ["experts.w1"]}, "target_parameters=['experts.w1']"),
    ({"some_future_field": {"x": 1}}, "some_future_field={'x': 1}"),
    ({"use_dora": True, "lora_bias": True}, "combines use_dora and lora_bias"),
    ({"r": None}, "lacks r or lora_alpha"),
])
def test_unsupported_adapter_variants_are_refused(extra: dict, shown: str) -> None:
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
           "init_lora_weights": True, "use_dora": False, "use_rslora": True,
           "rank_pattern": {"q_proj": 4}, "some_default_extra": None, **extra}
    with pytest.raises(MergeError) as exc:
        check_adapter_config(cfg, Path("adapter_config.json"))
    assert shown in str(exc.value)


def test_supported_variants_pass_the_guard() -> None:
    check_adapter_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True,
                          "use_dora": True, "rank_pattern": {"q_proj": 4},
                          "alpha_pattern": {"v_proj": 2}, "modules_to_save": ["lm_head"],
                          "bias": "all", "fan_in_fan_out": True, "init_lora_weights": "gaussian",
                          "eva_config": None, "peft_version": "0.21.2"}, Path("x"))


# --------------------------------------------------------------- maths against peft layers
@pytest.mark.parametrize("dora", [False, True])
def test_fan_in_fan_out_maths_matches_peft_on_conv1d(dora: bool) -> None:
    """GPT-2's Conv1D stores (in, out): peft's fan_in_fan_out path, with and without DoRA."""
    peft = pytest.importorskip("peft")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = Conv1D(nf=12, nx=10)  # weight (in=10, out=12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(x)

    model = Tiny()
    w0 = model.c.weight.detach().clone()
    cfg = peft.LoraConfig(target_modules=["c"], r=4, lora_alpha=6, fan_in_fan_out=True,
                          use_dora=dora, init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.c
    A = layer.lora_A["default"].weight.detach().clone()
    B = layer.lora_B["default"].weight.detach().clone()
    mag = None
    if dora:
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(1.1)
        mag = layer.lora_magnitude_vector["default"].weight.detach().clone()
    merged = pm.merge_and_unload().c.weight.detach()
    spec = LoraSpec(module="c", kind="linear", a="A", b="B", r=4, alpha=6.0, scaling=1.5,
                    fan_in_fan_out=True, magnitude="m" if dora else None)
    ref = reference_merge(w0, spec, A, B, mag)
    assert torch.allclose(ref, merged, atol=1e-6, rtol=1e-5)
    # The streaming path: row blocks when it can, the whole tensor for DoRA.
    w = w0.clone()
    t = LoraTensors(A=A, B=B, magnitude=mag)
    if spec.whole_tensor:
        apply_rows(w, spec, t, 0, w.shape[0])
    else:
        for s in range(0, w.shape[0], 3):
            apply_rows(w[s:s + 3], spec, t, s, min(w.shape[0], s + 3))
    assert torch.allclose(w, merged, atol=1e-6, rtol=1e-5)


def test_row_blocks_equal_the_whole_tensor_formula() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(37, 19, generator=g)
    A, B = torch.randn(5, 19, generator=g), torch.randn(37, 5, generator=g)
    m = torch.rand(37, generator=g) + 0.5
    spec = LoraSpec(module="x", kind="linear", a="A", b="B", r=5, alpha=7.0, scaling=1.4,
                    magnitude="m")
    want = reference_merge(W, spec, A, B, m)
    got = W.clone()
    for s in range(0, 37, 8):
        apply_rows(got[s:s + 8], spec, LoraTensors(A, B, m), s, min(37, s + 8))
    assert torch.allclose(got, want, atol=1e-6)


# ------------------------------------------------------------------------------- the writer
def test_shard_writer_output_is_what_safetensors_reads(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3),
               "a": torch.tensor([1.5], dtype=torch.bfloat16), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(7, dtype=torch.int64)}
    entries = [HeaderEntry(k, {torch.float16: "F16", torch.bfloat16: "BF16",
                               torch.float32: "F32", torch.int64: "I64"}[v.dtype],
                           tuple(v.shape), v.numel() * v.element_size())
               for k, v in tensors.items()]
    header, offsets = build_header(entries)
    assert len(header) % 8 == 0
    data_size = offsets[-1][1]
    w = ShardWriter(tmp_path / "x.safetensors", header, data_size, durable=False)
    with pytest.raises(AssertionError, match="out-of-order"):
        w.write(memoryview(b"xx"), len(header) + 2)
    for v, (b, _) in zip(tensors.values(), offsets, strict=True):
        data = memoryview(v.contiguous().reshape(-1).view(torch.uint8).numpy())
        w.write(data, len(header) + b)
        w.hash(data)
    w.finish()
    digest = w.digest()
    import hashlib

    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k


def test_shard_writer_refuses_an_incomplete_shard(tmp_path: Path) -> None:
    header, _ = build_header([HeaderEntry("a", "F32", (4,), 16)])
    w = ShardWriter(tmp_path / "x.safetensors", header, 16, durable=False)
    with pytest.raises(AssertionError, match="wrote"):
        w.finish()


# ------------------------------------------------------------------------------ the readers
def test_torch_zip_tensors_are_read_in_place_or_through_the_loader(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save({"plain": base.to(torch.bfloat16), "view": base[1:3],
                "strided": base.t(), "scalar": torch.tensor(3.0)}, tmp_path / "x.bin")
    wf = read_weight_file(tmp_path / "x.bin")
    with TensorSource(wf) as src:
        assert src.direct("plain") and src.direct("view") and src.direct("scalar")
        assert not src.direct("strided")  # a transposed view: the safe loader handles it
        assert torch.equal(src.tensor("plain"), base.to(torch.bfloat16))
        assert torch.equal(src.tensor("view"), base[1:3])
        assert torch.equal(src.tensor("strided"), base.t())
        assert torch.equal(src.tensor("scalar"), torch.tensor(3.0))
        buf = torch.empty(2 * 6 * 4, dtype=torch.uint8)
        src.read_into("view", 1, 2, memoryview(buf.numpy()))  # rows 1..2 of the [1:3] view
        assert torch.equal(buf.view(torch.float32).reshape(2, 6)[:1], base[2:3])


def test_legacy_torch_format_goes_through_the_loader(tmp_path: Path) -> None:
    t = torch.randn(3, 5)
    torch.save({"w": t}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    wf = read_weight_file(tmp_path / "old.bin")
    with TensorSource(wf) as src:
        assert not src.direct("w")
        assert torch.equal(src.tensor("w"), t)


# -------------------------------------------------------------- plans, devices, verification
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-units")
    base = build_base(root / "vicuna-tiny", TINY)
    pre = build_pretrain(root / "llava-v1.5-tiny-pretrain", TINY, base=base)
    lora = build_lora(root / "llava-v1.5-tiny-lora", TINY, base=base, projector_from=pre,
                      use_dora=True, embed_lora=True, modules_to_save=["lm_head"],
                      peft_version="0.21.2")
    return {"root": root, "base": base, "pre": pre, "lora": lora}


def _plan(world: dict[str, Path], lora: Path | None = None, **kw):  # type: ignore[no-untyped-def]
    inputs, _ = resolve_inputs(lora or world["lora"], world["base"], None)
    return build_plan(inputs, **kw)


def test_plan_from_headers(world: dict[str, Path]) -> None:
    plan = _plan(world, max_shard_size=30_000)
    assert len(plan.shards) > 3
    names = [t.name for t in plan.tensors]
    assert len(names) == len(set(names))
    assert plan.lora_modules == 15  # 7 projections x 2 layers + embed_tokens
    # modules_to_save, and the copy of the targeted embedding layer peft >= 0.7 saves
    assert plan.replaced == {"lm_head.weight": "adapter", "model.embed_tokens.weight": "adapter"}
    assert sum(1 for t in plan.tensors if t.lora is not None and t.lora.dora) == 15
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.lora is not None and embed.lora.kind == "embedding" and embed.lora.whole_tensor
    assert plan.projector_source.startswith("non_lora_trainables.bin")
    assert plan.total_size == sum(t.nbytes for t in plan.tensors)


def test_rank_that_disagrees_with_the_config_is_refused(world: dict[str, Path],
                                                        tmp_path: Path) -> None:
    lora = tmp_path / "llava-v1.5-tiny-lora"
    shutil.copytree(world["lora"], lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 4}
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match=r"lora_A of 'model.layers.0.self_attn.q_proj' has rank 8 "
                                         r"but adapter_config.json gives r=4"):
        _plan(world, lora)


def test_unmatched_adapter_keys_are_refused_unless_forced(world: dict[str, Path],
                                                          tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    lora = tmp_path / "llava-v1.5-tiny-lora"
    shutil.copytree(world["lora"], lora)
    st = load_file(str(lora / "adapter_model.safetensors"))
    st["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    st["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 8)
    st["base_model.model.model.vision_tower.vision_tower.vision_model.q_proj.lora_A.weight"] = \
        torch.zeros(8, 32)
    st["base_model.model.model.vision_tower.vision_tower.vision_model.q_proj.lora_B.weight"] = \
        torch.zeros(32, 8)
    save_file(st, str(lora / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="adapter key 'base_model.model.model.layers.9"):
        _plan(world, lora)
    plan = _plan(world, lora, force=True)
    assert any("layers.9" in k for k in plan.dropped)
    assert any("vision_tower" in k and "mm_vision_tower" in v for k, v in plan.dropped.items())


def test_device_path_on_cpu_writes_the_same_bytes(world: dict[str, Path], tmp_path: Path) -> None:
    """'cpu:0' runs the code path a GPU takes (`.to(device, float32)` per block, no scratch)."""
    plan = _plan(world)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ha = Executor(plan, tmp_path / "a", "cpu", durable=False).run()
    hb = Executor(plan, tmp_path / "b", "cpu:0", durable=False).run()
    assert ha == hb
    verify_output(plan, tmp_path / "b", hb)


def test_verification_catches_corruption(world: dict[str, Path], tmp_path: Path) -> None:
    import hashlib

    plan = _plan(world)
    hashes = Executor(plan, tmp_path, "cpu", durable=False).run()
    shard = tmp_path / plan.shards[0].filename
    # 1. a flipped byte: the file no longer is what was written
    raw = bytearray(shard.read_bytes())
    t = next(t for t in plan.shards[0].tensors if t.lora is not None and not t.lora.whole_tensor)
    pos = len(plan.shards[0].header) + t.begin + 1
    raw[pos] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(MergeError, match="differs from the bytes that were written"):
        check_hashes(tmp_path, hashes)
    # 2. the same damage with a matching hash (as if the maths were wrong): the recomputed
    # sample disagrees
    hashes2 = copy.deepcopy(hashes)
    hashes2[shard.name] = hashlib.sha256(bytes(raw)).hexdigest()
    check_hashes(tmp_path, hashes2)
    with pytest.raises(MergeError, match=rf"'{t.name}' differs from its recomputation"):
        check_sample(plan, tmp_path, count=100)
    # 3. a truncated file: the header check says so
    shard.write_bytes(bytes(raw[:-10]))
    with pytest.raises(MergeError, match="verification failed: invalid safetensors file"):
        check_headers(plan, tmp_path)


def test_read_back_catches_a_write_that_differs(world: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer reads every block back right after writing it and compares it with the bytes
    it meant to write: a write that lands different bytes fails the merge there, naming where."""
    import hashlib
    import os

    from llava_doctor.merge import merge

    plan = _plan(world)
    out = tmp_path / "a"
    out.mkdir()
    hashes = Executor(plan, out, "cpu", durable=False).run()
    for name, digest in hashes.items():  # the one sha256 pass is the files' own sha256
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    real = os.pwrite
    calls = {"n": 0}

    def bad_pwrite(fd: int, data: bytes, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 5:  # a block of the first shard, after its header
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0x01
            return real(fd, bytes(damaged), offset)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", bad_pwrite)
    with pytest.raises(MergeError, match=r"verification failed: the file on disk differs from "
                                         r"the bytes that were written \(at bytes [\d,]+-[\d,]+, "
                                         r"read back right after writing them\)"):
        merge(world["lora"], world["base"], tmp_path / "llava-merged", device="cpu",
              durable=False)
    assert not (tmp_path / "llava-merged").exists()
    assert not list(tmp_path.glob("llava-merged.*"))


def test_checks_and_planning_run_without_torch(world: dict[str, Path], tmp_path: Path) -> None:
    """torch costs 1.3-1.8 s to import: a merge that the checks refuse, and everything before
    the first tensor, must not pay it (it is imported by the executor, or to ask about a GPU)."""
    import subprocess
    import sys

    script = """
import sys
from llava_doctor.merge import merge, stream

def stop(self):
    print("torch" in sys.modules)
    raise SystemExit(0)

stream.Executor.run = stop
merge(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu")
"""
    got = subprocess.run([sys.executable, "-c", script, str(world["lora"]), str(world["base"]),
                          str(tmp_path / "llava-merged")], capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "False"


@pytest.mark.parametrize("files,quota", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "400000 100000\n"}, 4.0),
    ({"cfs_quota_us": "-1\n", "cfs_period_us": "100000\n"}, None),
    ({"cfs_quota_us": "200000\n", "cfs_period_us": "100000\n"}, 2.0),
    ({}, None),
])
def test_threads_follow_the_cgroup_cpu_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             files: dict[str, str], quota: float | None) -> None:
    """A container limited to N CPUs sees every host core in its affinity mask: the merge sizes
    its torch pool by the quota (less one core for the writer and hasher threads)."""
    import os

    from llava_doctor.merge import stream

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(stream, "CGROUP_QUOTA_FILES", (
        (str(tmp_path / "cpu.max"), None),
        (str(tmp_path / "cfs_quota_us"), str(tmp_path / "cfs_period_us"))))
    assert stream._cgroup_cpus() == quota
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    expected = 64 if quota is None else max(1, int(quota + 0.5))
    assert stream.cores() == expected
    assert stream.compute_threads() == max(1, expected - 1)
    assert stream.compute_workers() == min(expected, stream.MAX_WORKERS)
