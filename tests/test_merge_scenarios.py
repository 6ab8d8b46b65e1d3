"""`merge` over the standard scenario set: every healthy run merges (base taken from
adapter_config.json), every broken one is refused with its finding, and nothing is executed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_doctor.errors import MergeError
from llava_doctor.fixtures import canary_path
from llava_doctor.merge import PreflightRefused, merge

HEALTHY = ["lora", "lora-bin", "task-lora", "checkpoints-final", "lora-qlora", "lora-dora-rslora",
           "lora-ddp-keys", "lora-untrained", "LD106-name-without-lora",
           "LD108-bin-and-safetensors"]


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_runs_merge(scenarios: dict[str, Path], tmp_path: Path, name: str) -> None:
    out = tmp_path / "llava-v1.5-tiny-merged"
    r = merge(scenarios[name], None, out, device="cpu", durable=False)
    assert r.verified is not None
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava_llama"
    assert "quantization_config" not in cfg
    assert any(k.startswith("model.mm_projector.")
               for k in json.loads((out / "model.safetensors.index.json").read_text())
               ["weight_map"])
    if name == "lora-qlora":
        assert any("removed quantization_config" in n for n in r.notes)
        assert any("model_type 'llava' -> 'llava_llama'" in n for n in r.notes)


@pytest.mark.parametrize("name,code", [
    ("LD101-no-config", "LD101"), ("LD103-no-adapter-config", "LD103"),
    ("LD105-zero3-shapes", "LD105"), ("LD501-truncated-safetensors", "LD501"),
    ("LD502-malicious-pickle", "LD502"), ("LD504-lfs-pointer", "LD504"),
])
def test_broken_runs_are_refused(scenarios: dict[str, Path], tmp_path: Path, name: str,
                                 code: str) -> None:
    out = tmp_path / "llava-v1.5-tiny-merged"
    with pytest.raises(PreflightRefused) as exc:
        merge(scenarios[name], None, out, device="cpu", durable=False)
    assert code in {f.code for f in exc.value.errors}
    assert not out.exists()
    # --force gets past the checks, not past a file that cannot be merged.
    with pytest.raises(MergeError):
        merge(scenarios[name], None, out, device="cpu", durable=False, force=True)
    assert not out.exists() and not list(tmp_path.glob("*.partial-*"))
    assert not canary_path(scenarios[name]).exists()  # the malicious pickle never ran


@pytest.mark.parametrize("name,code,note", [
    ("LD104-checkpoint-no-non-lora", "LD104", "has no mm_projector (LD302)"),
    ("LD105-empty-adapter", "LD105", "the adapter holds no LoRA tensors"),
])
def test_forced_merges_say_what_is_missing(scenarios: dict[str, Path], tmp_path: Path, name: str,
                                           code: str, note: str) -> None:
    out = tmp_path / "llava-v1.5-tiny-merged"
    with pytest.raises(PreflightRefused) as exc:
        merge(scenarios[name], None, out, device="cpu", durable=False)
    assert code in {f.code for f in exc.value.errors}
    r = merge(scenarios[name], None, out, device="cpu", durable=False, force=True)
    assert any(note in n for n in r.notes), r.notes
    assert code in {f.code for f in r.warnings}  # the forced errors stay in the summary


def test_fp16_overflow_is_refused_and_bfloat16_works(scenarios: dict[str, Path],
                                                     tmp_path: Path) -> None:
    lora = scenarios["LD503-fp16-overflow"]
    out = tmp_path / "llava-v1.5-tiny-merged"
    with pytest.raises(MergeError) as exc:
        merge(lora, None, out, device="cpu", durable=False)
    assert "too large for F16" in str(exc.value) and "--dtype bfloat16" in exc.value.one_line()
    assert not out.exists() and not list(tmp_path.glob("*.partial-*"))
    merge(lora, None, out, device="cpu", durable=False, dtype="bfloat16")
    assert (out / "config.json").is_file()
