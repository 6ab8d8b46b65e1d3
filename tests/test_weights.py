"""Weight-file dispatch and streaming reads against safetensors' and torch's own loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_doctor.artifacts.tensor_stats import tensor_stats
from llava_doctor.artifacts.weights import iter_tensors, load_tensors, read_weight_file
from llava_doctor.errors import LfsPointerError


@pytest.fixture()
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g).bfloat16(), "b": torch.randn(7, generator=g),
            "c": torch.tensor(3.5, dtype=torch.float16), "d": torch.zeros(0, 4),
            "e": torch.arange(6, dtype=torch.int64).reshape(2, 3)}


@pytest.mark.parametrize("reuse", [False, True])
def test_iter_tensors_safetensors_equals_load_file(tmp_path: Path, tensors, reuse: bool) -> None:
    p = tmp_path / "w.safetensors"
    save_file(tensors, str(p))
    ref = load_file(str(p))
    wf = read_weight_file(p)
    for name, t in iter_tensors(wf, reuse_buffer=reuse):
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name


def test_torch_files_load_the_same(tmp_path: Path, tensors) -> None:
    p = tmp_path / "w.bin"
    torch.save(tensors, p)
    wf = read_weight_file(p)
    assert wf.format == "torch-zip"
    got = load_tensors(wf)
    for name, t in tensors.items():
        assert torch.equal(got[name], t)
    assert {n for n, _ in iter_tensors(wf, ["a", "e"])} == {"a", "e"}


def test_lfs_pointer_is_recognised_for_any_weight_file(tmp_path: Path) -> None:
    for name in ("adapter_model.safetensors", "non_lora_trainables.bin", "mm_projector.bin"):
        p = tmp_path / name
        p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 41959424\n")
        with pytest.raises(LfsPointerError) as ei:
            read_weight_file(p)
        assert "41,959,424" in str(ei.value) and "git lfs pull" in ei.value.one_line()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tensor_stats(dtype: torch.dtype) -> None:
    t = torch.tensor([0.5, -3.0, 2.0], dtype=dtype)
    s = tensor_stats(t)
    assert (s.nonfinite, s.max_abs, s.all_zero) == (0, 3.0, False)
    t = torch.tensor([0.5, float("nan"), -float("inf"), -7.0], dtype=dtype)
    s = tensor_stats(t)
    assert (s.nonfinite, s.max_abs) == (2, 7.0)
    assert tensor_stats(torch.zeros(4, dtype=dtype)).all_zero
    assert tensor_stats(-torch.zeros(4, dtype=dtype)).all_zero
    if dtype != torch.float16:
        assert tensor_stats(torch.tensor([70000.0], dtype=dtype)).overflows_fp16
