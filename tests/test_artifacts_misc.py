"""Discovery, configs, model dirs, inspect and the demo, on the real scenario set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llava_doctor.artifacts.configs import (
    load_model_config,
    read_json,
    sentencepiece_size,
    tokenizer_length,
)
from llava_doctor.artifacts.discovery import DirKind, classify, find_lora_dirs
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.errors import FileCorruptError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,kind", [
    ("lora", DirKind.lora), ("lora-bin", DirKind.lora), ("checkpoint-50", DirKind.checkpoint),
    ("LD102-only-non-lora", DirKind.lora_partial), ("pretrain", DirKind.pretrain),
    ("base-vicuna", DirKind.model), ("base-llava", DirKind.model),
    ("LD104-checkpoint-no-non-lora", DirKind.lora),  # a hand-copied config.json: a LoRA output
])
def test_classify_from_files(scenarios: dict[str, Path], name: str, kind: DirKind) -> None:
    assert classify(scenarios[name]) == kind


def test_classification_ignores_names(scenarios: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "checkpoint-7"  # a name that says checkpoint, files that say pretrain
    shutil.copytree(scenarios["pretrain"], d)
    assert classify(d) == DirKind.pretrain
    assert classify(tmp_path / "missing") == DirKind.missing
    assert classify(scenarios["lora"] / "config.json") == DirKind.not_a_dir


def test_find_lora_dirs(scenarios: dict[str, Path]) -> None:
    found = list(find_lora_dirs(scenarios["checkpoints"]))
    assert found == [scenarios["checkpoints-final"], scenarios["checkpoint-50"]]


def test_tokenizer_length_matches_sentencepiece(scenarios: dict[str, Path]) -> None:
    spm = pytest.importorskip("sentencepiece")
    base = scenarios["base-vicuna"]
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    assert sentencepiece_size(base / "tokenizer.model") == sp.get_piece_size()
    assert tokenizer_length(base) == sp.get_piece_size()


def test_tokenizer_length_counts_added_tokens(scenarios: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "tok"
    shutil.copytree(scenarios["base-vicuna"], d)
    n = tokenizer_length(d)
    assert n is not None
    (d / "added_tokens.json").write_text(json.dumps({"<im_patch>": n, "<im_start>": n + 1}))
    assert tokenizer_length(d) == n + 2


def test_configs_views(scenarios: dict[str, Path]) -> None:
    cfg = load_model_config(scenarios["lora"] / "config.json")
    assert cfg.is_llava and not cfg.is_llava_hf and cfg.mm_projector_type == "mlp2x_gelu"
    assert cfg.architectures == ["LlamaForCausalLM"]
    base = load_model_config(scenarios["base-vicuna"] / "config.json")
    assert not base.is_llava and base.llm_dims["hidden_size"] == 64


def test_read_json_errors_name_the_file(tmp_path: Path) -> None:
    for text, rule in [("{", "invalid-json"), ("[1]", "invalid-json"), ("\xff", "invalid-json"),
                       ("[" * 100_000 + "]" * 100_000, "invalid-json")]:
        p = tmp_path / "config.json"
        p.write_text(text, encoding="latin-1")
        with pytest.raises(FileCorruptError) as ei:
            read_json(p)
        assert ei.value.rule == rule and str(p) in str(ei.value)


def test_model_dir_problems(scenarios: dict[str, Path], tmp_path: Path) -> None:
    for name in ("base-vicuna", "base-vicuna-bin"):
        md = ModelDir.find(scenarios[name])
        assert md is not None and md.problems == []
        assert "model.embed_tokens.weight" in md.tensors
        assert md.index_total_size == md.total_bytes
    d = tmp_path / "base"
    shutil.copytree(scenarios["base-vicuna"], d)
    md = ModelDir.find(d)
    assert md is not None
    (d / md.shard_names[-1]).unlink()
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.99.mlp.up_proj.weight"] = md.shard_names[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    probs = {(p.kind, p.path.name) for p in ModelDir.find(d).problems}  # type: ignore[union-attr]
    assert probs == {("missing-shard", md.shard_names[-1]), ("missing-tensor", md.shard_names[0])}


def test_inspect_cli(scenarios: dict[str, Path]) -> None:
    out = subprocess.run([sys.executable, "-m", "llava_doctor", "inspect", "--format", "json",
                          str(scenarios["base-vicuna"])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["kind"] == "model" and len(rep["files"]) == 2
    md = ModelDir.find(scenarios["base-vicuna"])
    assert rep["total_bytes"] == md.total_bytes  # type: ignore[union-attr]
    row = next(t for f in rep["files"] for t in f["tensors"] if t["name"] == "lm_head.weight")
    assert row["shape"] == [128, 64] and row["dtype"] == "F16" and row["bytes"] == 128 * 64 * 2
    bad = subprocess.run([sys.executable, "-m", "llava_doctor", "inspect",
                          str(scenarios["LD502-malicious-pickle"] / "non_lora_trainables.bin")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "os.system" in bad.stdout and "Traceback" not in bad.stderr


def test_demo_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "llava_doctor", "demo", "--dir",
                          str(tmp_path / "demo")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "LD502" in out.stdout and "LD102" in out.stdout and "LD101" in out.stdout


def test_wheel_ships_what_the_demo_needs(tmp_path: Path) -> None:
    """`pip install .` gets the builder and its data, so the demo works outside a checkout."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip()[-200:]}")
    wheel = next(tmp_path.glob("llava_doctor-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llava_doctor/fixtures/data/tokenizer.model" in names
    assert "llava_doctor/fixtures/builder.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    # Installed from the wheel (not the checkout), the demo runs end to end.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import llava_doctor; print(llava_doctor.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(target)), where.stdout
    demo = subprocess.run([sys.executable, "-m", "llava_doctor", "demo"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
