"""Where `check` finds the base and the stage-1 projector when not told, and that the report
says which files were used."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures import TINY, build_base, build_lora, build_pretrain
from llava_doctor.report.text import render_text


def inputs(path: Path, **opts) -> dict[str, tuple[str | None, str]]:
    rep = run_checks([path], Options(**opts), select=["LD401"])
    return {i.role: (i.path, i.source) for i in rep.targets[0].inputs}


def put_in_hf_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """Lay `src` out as huggingface_hub stores a downloaded snapshot: content-addressed blobs,
    a snapshot folder of relative symlinks, and refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_base_from_flag_and_from_adapter_config(tmp_path: Path) -> None:
    base = build_base(tmp_path / "vicuna-tiny-v1.5", TINY)
    lora = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=base)
    assert inputs(lora)["base"] == (str(base), "adapter_config.json")
    assert inputs(lora, base=base)["base"] == (str(base), "--base")


def test_hub_id_base_found_in_the_local_hf_cache(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("huggingface_hub")
    base = build_base(tmp_path / "src" / "vicuna-tiny-v1.5", TINY)
    lora = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base="lmsys/vicuna-tiny-v1.5")
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "lmsys/vicuna-tiny-v1.5"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert inputs(lora)["base"] == (None, "none")
    snap = put_in_hf_cache(tmp_path / "hub", "lmsys/vicuna-tiny-v1.5", base)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert inputs(lora)["base"] == (str(snap), "hf-cache")
    rep = run_checks([lora], Options())
    assert not [f for f in rep.findings if f.code == "LD401"]  # the cached base was checked


def test_projector_beside_the_run(tmp_path: Path) -> None:
    base = build_base(tmp_path / "vicuna-tiny-v1.5", TINY)
    pre = build_pretrain(tmp_path / "llava-v1.5-tiny-pretrain", TINY, base=base)
    lora = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=base, projector_from=pre)
    want = (str(pre / "mm_projector.bin"), "sibling *-pretrain")
    assert inputs(lora)["projector"] == want
    ckpt = tmp_path / "llava-v1.5-tiny-lora" / "checkpoint-50"
    from llava_doctor.fixtures import add_checkpoint

    add_checkpoint(lora, 50)
    assert inputs(ckpt)["projector"] == want  # a checkpoint looks beside its run
    rep = run_checks([lora], Options(), select=["LD401"])
    assert "projector: " in render_text(rep) and "found beside the run" in render_text(rep)
    shutil.copytree(pre, tmp_path / "llava-other-pretrain")
    assert inputs(lora)["projector"] == (None, "ambiguous")
    assert "pass --projector" in render_text(run_checks([lora], Options(), select=["LD401"]))
