"""LD601/LD602: merge preflight from headers, against sizes computed here independently."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llava_doctor.checks import preflight
from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures import TINY, build_base, build_lora, build_pretrain
from llava_doctor.models import Report, Severity

Usage = namedtuple("Usage", "total used free")


def run(path: Path, code: str, **kw: object) -> Report:
    return run_checks([path], Options(**kw), select=[code])  # type: ignore[arg-type]


def only(rep: Report, code: str):
    found = [f for f in rep.findings if f.code == code]
    assert len(found) == 1, rep.findings
    return found[0]


def status(rep: Report, code: str) -> tuple[str, str | None]:
    c = next(c for t in rep.targets for c in t.checks if c.code == code)
    return c.status.value, c.reason


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preflight")
    a: dict[str, Path] = {}
    a["base"] = build_base(root / "vicuna-tiny-v1.5", TINY)
    a["base-llava"] = build_base(root / "llava-v1.5-tiny", TINY, llava=True,
                                 generation_config="valid")
    a["pretrain"] = build_pretrain(root / "llava-v1.5-tiny-pretrain", TINY, base=a["base"])
    a["lora"] = build_lora(root / "llava-v1.5-tiny-lora", TINY, base=a["base"],
                           projector_from=a["pretrain"])
    a["task-lora"] = build_lora(root / "llava-v1.5-tiny-task-lora", TINY, base=a["base-llava"],
                                trained_from="llava", projector_from=a["base-llava"])
    a["hub-id"] = build_lora(root / "llava-v1.5-tiny-hub-lora", TINY)
    return a


def _base_fp16_bytes(base: Path) -> tuple[int, int]:
    """(sum of numel * 2 over the base's tensors, numel of the largest), read with safetensors."""
    total, largest = 0, 0
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                total += 2 * n
                largest = max(largest, n)
    return total, largest


def _projector_fp16_bytes(lora: Path) -> int:
    nl = torch.load(lora / "non_lora_trainables.bin", map_location="cpu", weights_only=True)
    return sum(2 * v.numel() for v in nl.values())


def _side_files(base: Path) -> int:
    names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json",
             "config.json")
    return sum((base / n).stat().st_size for n in names if (base / n).is_file())


def _expected_output(a: dict[str, Path]) -> int:
    base_bytes, _ = _base_fp16_bytes(a["base"])
    return base_bytes + _projector_fp16_bytes(a["lora"]) + _side_files(a["base"])


# --- LD601 ------------------------------------------------------------------------------------

def test_ld601_estimate_matches_an_independent_count(art: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    want = _expected_output(art)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 0, want - 1))
    out = tmp_path / "merged" / "llava-v1.5-tiny"
    f = only(run(art["lora"], "LD601", base=art["base"], out=out), "LD601")
    assert (f.code, Path(f.path)) == ("LD601", out)
    assert f.severity == Severity.error
    assert f.evidence["estimated_bytes"] == want
    assert f.evidence["free_bytes"] == want - 1
    # out does not exist yet: the free space is read where it will be created
    assert f.evidence["checked_at"] == str(tmp_path)
    assert f"{tmp_path} has " in f.message and "the merge would run out of space" in f.message
    assert "4 tensor(s) of non_lora_trainables.bin" in f.message


def test_ld601_little_headroom_is_a_warning(art: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    want = _expected_output(art)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 0, int(want * 1.05)))
    f = only(run(art["lora"], "LD601", base=art["base"], out=tmp_path / "o"), "LD601")
    assert f.severity == Severity.warning
    assert "only 1.05x" in f.message


def test_ld601_task_lora_projector_is_already_in_the_base(art: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base_bytes, _ = _base_fp16_bytes(art["base-llava"])
    want = base_bytes + _side_files(art["base-llava"])
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 0, 1000))
    f = only(run(art["task-lora"], "LD601", base=art["base-llava"], out=tmp_path / "o"), "LD601")
    assert f.evidence["estimated_bytes"] == want
    assert f.evidence["extra_bytes"] == 0


def test_ld601_negatives(art: dict[str, Path], tmp_path: Path) -> None:
    # the real filesystem has room for a tiny merge
    rep = run(art["lora"], "LD601", base=art["base"], out=tmp_path / "merged")
    assert rep.findings == [] and status(rep, "LD601") == ("passed", None)
    rep = run(art["lora"], "LD601", base=art["base"])
    assert status(rep, "LD601") == ("skipped", "no --out given: nothing to check the free space of")
    rep = run(art["hub-id"], "LD601", out=tmp_path / "merged")
    assert status(rep, "LD601") == ("skipped", "no readable base model: the merged size cannot be "
                                                "estimated")


def test_existing_ancestor(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("x")
    assert preflight.existing_ancestor(tmp_path / "a" / "b" / "c") == tmp_path / "a"
    assert preflight.existing_ancestor(tmp_path / "a") == tmp_path / "a"
    assert preflight.existing_ancestor(tmp_path / "f") == tmp_path


# --- LD602 ------------------------------------------------------------------------------------

def test_ld602_memory_plan(art: dict[str, Path]) -> None:
    f = only(run(art["lora"], "LD602", base=art["base"]), "LD602")
    assert (f.code, Path(f.path)) == ("LD602", art["base"])
    assert f.severity == Severity.info
    base_bytes, largest = _base_fp16_bytes(art["base"])
    fp16_model = base_bytes + _projector_fp16_bytes(art["lora"])
    adapter = (art["lora"] / "adapter_model.safetensors").stat().st_size
    projector = (art["lora"] / "non_lora_trainables.bin").stat().st_size
    assert f.evidence["fp16_model_bytes"] == fp16_model
    assert f.evidence["llava_merge_bytes"] == 2 * fp16_model + adapter + projector
    assert f.evidence["streaming_merge_bytes"] == 4 * largest + adapter + projector
    assert f.evidence["largest_tensor"] in ("model.embed_tokens.weight", "lm_head.weight")
    total, avail = preflight.memory_info()
    assert f.evidence["ram_total_bytes"] == total and total is not None and total > 0
    assert "LLaVA's merge_lora_weights.py would need about" in f.message
    assert "`llava-doctor merge` streams one tensor at a time" in f.message


def test_ld602_says_when_llava_merge_will_not_fit(art: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "memory_info", lambda: (100_000, 50_000))
    f = only(run(art["lora"], "LD602", base=art["base"]), "LD602")
    assert "(more than is available: expect it to be OOM-killed)" in f.message
    assert "this machine has 100.00 KB total and 50.00 KB available" in f.message


def test_memory_info_reads_proc_meminfo() -> None:
    total, avail = preflight.memory_info()
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        first = meminfo.read_text().splitlines()[0].split()
        assert first[0] == "MemTotal:" and total == int(first[1]) * 1024
    assert total is not None and avail is not None and 0 < avail <= total


def test_ld602_negative_without_base(art: dict[str, Path]) -> None:
    rep = run(art["hub-id"], "LD602")
    assert rep.findings == []
    assert status(rep, "LD602") == ("skipped", "no readable base model: the model size cannot be "
                                                "estimated")
