"""What fix must never do: claim an unfixable case fixed, write through a symlink that leads
outside the LoRA dir, touch the base or the stage-1 projector, apply a stale plan, or undo over
edits made after the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_fix_support import CASES, codes, lora_dir, snapshot
from typer.testing import CliRunner

from llava_doctor.artifacts.torchfile import read_torch_file
from llava_doctor.checks.context import Options
from llava_doctor.cli import app
from llava_doctor.doctor import run_checks
from llava_doctor.errors import FixError
from llava_doctor.fixes import FileChange, FileOp, FixPlan, apply_plan, plan_fixes, undo_latest
from llava_doctor.fixes.workspace import sha256_bytes, tensors_to_bytes

runner = CliRunner()


def _only_non_lora(root: Path) -> tuple[Path, Path]:
    lora, base = lora_dir(root)
    for p in lora.iterdir():
        if p.name != "non_lora_trainables.bin":
            p.unlink()
    return lora, base


def _empty_adapter(root: Path) -> tuple[Path, Path]:
    lora, base = lora_dir(root)
    save_file({}, str(lora / "adapter_model.safetensors"))
    return lora, base


@pytest.mark.parametrize(("code", "build", "reason"), [
    ("LD102", _only_non_lora, "None automatic: copy the adapter from the run's output"),
    ("LD105", _empty_adapter, "None automatic: re-export from `global_stepN` with"),
])
def test_unfixable_case_exits_1_and_changes_nothing(code: str, build, reason: str,
                                                    tmp_path: Path) -> None:
    lora, base = build(tmp_path)
    before = snapshot(tmp_path)
    res = runner.invoke(app, ["fix", str(lora), "--base", str(base), "--yes", "--unsafe"])
    assert res.exit_code == 1, res.output
    assert snapshot(tmp_path) == before  # not even a .llava-doctor folder
    out = " ".join(res.output.split())
    assert "Not fixable by llava-doctor:" in out
    assert f"- {code} " in out and reason in out
    assert "Nothing was changed." in out
    assert "Applied" not in out


def test_symlinked_file_outside_is_replaced_never_written_through(tmp_path: Path) -> None:
    lora, base = lora_dir(tmp_path, model_type="llava")
    shared = tmp_path / "shared"
    shared.mkdir()
    (lora / "config.json").rename(shared / "config.json")
    (lora / "config.json").symlink_to(shared / "config.json")
    outside = snapshot(shared)
    _, plan = plan_fixes(lora, Options(base=base), select=["LD406"])
    (fc,) = plan.files
    assert fc.op == FileOp.replace and fc.was_symlink == str(shared / "config.json")
    apply_plan(plan)
    assert snapshot(shared) == outside
    assert not (lora / "config.json").is_symlink()
    assert json.loads((lora / "config.json").read_text())["model_type"] == "llava_llama"
    undo_latest(lora)
    assert os.readlink(lora / "config.json") == str(shared / "config.json")
    assert snapshot(shared) == outside


def test_refuses_a_write_through_a_folder_symlink_leading_outside(tmp_path: Path) -> None:
    lora, _ = lora_dir(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (lora / "sub").symlink_to(outside)
    data = b"{}\n"
    plan = FixPlan(lora_dir=str(lora), files=(FileChange(
        path=str(lora / "sub" / "x.json"), rel="sub/x.json", op=FileOp.create, content=data,
        sha256_after=sha256_bytes(data)),))
    with pytest.raises(FixError, match="outside"):
        apply_plan(plan)
    assert list(outside.iterdir()) == [] and not (lora / ".llava-doctor").exists()


def test_refuses_to_write_into_the_base_or_the_projector(tmp_path: Path) -> None:
    lora, base = lora_dir(tmp_path)
    data = b"{}\n"
    for target in (base / "x.json", tmp_path / "llava-v1.5-tiny-pretrain" / "mm_projector.bin"):
        plan = FixPlan(lora_dir=str(lora), protected=(str(base), str(target)), files=(FileChange(
            path=str(target), rel=os.path.relpath(target, lora), op=FileOp.create, content=data,
            sha256_after=sha256_bytes(data)),))
        with pytest.raises(FixError, match="fix never modifies"):
            apply_plan(plan)


def test_a_stale_plan_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    lora, base = lora_dir(tmp_path, model_type="llava")
    _, plan = plan_fixes(lora, Options(base=base))
    cfg = lora / "config.json"
    cfg.write_text(cfg.read_text().replace('"pad"', '"square"'))
    before = snapshot(tmp_path)
    with pytest.raises(FixError, match="changed after the plan was made; nothing was changed"):
        apply_plan(plan)
    assert snapshot(tmp_path) == before


def test_undo_refuses_over_later_edits_and_says_where_the_backup_is(tmp_path: Path) -> None:
    lora, base = lora_dir(tmp_path, model_type="llava")
    result = apply_plan(plan_fixes(lora, Options(base=base))[1])
    cfg = lora / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    edited = snapshot(tmp_path)
    res = runner.invoke(app, ["fix", "--undo", str(lora)])
    assert res.exit_code == 1
    assert (f"config.json changed after the fix of {Path(result.backup_dir).name}; nothing was "
            f"restored; restore them by hand from {result.backup_dir}") in res.output
    assert snapshot(tmp_path) == edited


def test_undo_without_a_fix_is_a_one_line_error(tmp_path: Path) -> None:
    lora, _ = lora_dir(tmp_path)
    res = runner.invoke(app, ["fix", "--undo", str(lora)])
    assert res.exit_code == 1
    assert res.output.strip() == (f"llava-doctor: error: {lora}: has no fix to undo (no backup "
                                  "under .llava-doctor/backups); nothing was changed by "
                                  "`llava-doctor fix` here")


def test_undo_is_a_stack(tmp_path: Path) -> None:
    lora, base = lora_dir(tmp_path, model_type="llava", quantization_config=True)
    original = snapshot(tmp_path, dir_mtimes=False)
    apply_plan(plan_fixes(lora, Options(base=base), select=["LD208"])[1])
    after_first = snapshot(tmp_path, dir_mtimes=False, with_state=False)
    apply_plan(plan_fixes(lora, Options(base=base), select=["LD406"])[1])
    assert undo_latest(lora).codes == ("LD406",)
    assert snapshot(tmp_path, dir_mtimes=False, with_state=False) == after_first
    assert undo_latest(lora).codes == ("LD208",)
    assert snapshot(tmp_path, dir_mtimes=False, with_state=False) == original
    with pytest.raises(FixError, match="has no fix to undo"):
        undo_latest(lora)


def test_written_weight_files_are_plain_tensor_dicts(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "LD305-ddp")
    lora, opts = case.build(tmp_path)
    old = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    apply_plan(plan_fixes(lora, opts)[1])
    tf = read_torch_file(lora / "non_lora_trainables.bin")  # our walker: nothing but tensors
    assert tf.other == {} and tf.format == "zip"
    new = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    assert type(new) is dict and all(type(v) is torch.Tensor for v in new.values())
    for k, v in old.items():  # renamed, bit for bit
        w = new[k[len("module."):]]
        assert w.dtype == v.dtype and w.view(torch.int16).equal(v.view(torch.int16))
    assert not codes(run_checks([lora], opts)) & {"LD305", "LD501", "LD502"}


def test_only_plain_tensors_can_be_serialised() -> None:
    with pytest.raises(TypeError, match="only str -> Tensor entries"):
        tensors_to_bytes({"a": torch.zeros(1), "b": 3})  # type: ignore[dict-item]
    data = tensors_to_bytes({"p": torch.nn.Parameter(torch.ones(2))})
    import io

    loaded = torch.load(io.BytesIO(data), weights_only=True)
    assert type(loaded["p"]) is torch.Tensor


def test_view_of_a_large_storage_is_saved_alone() -> None:
    big = torch.zeros(100_000)
    small = tensors_to_bytes({"v": big[:4]})
    assert len(small) < 4_000


def test_relative_path_from_inside_the_dir_and_undo_from_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lora, base = lora_dir(tmp_path, "my-finetune", model_type="llava")
    before = snapshot(tmp_path, dir_mtimes=False)
    monkeypatch.chdir(lora)
    res = runner.invoke(app, ["fix", ".", "--base", "../vicuna-tiny-v1.5", "--yes"])
    assert res.exit_code == 0, res.output
    assert "Applied LD106, LD406: wrote ../llava-my-finetune-lora, config.json." in res.output
    assert os.readlink(tmp_path / "llava-my-finetune-lora") == "my-finetune"
    monkeypatch.chdir(tmp_path.parent)
    res = runner.invoke(app, ["fix", "--undo", str(lora.relative_to(tmp_path.parent))])
    assert res.exit_code == 0, res.output
    assert snapshot(tmp_path, dir_mtimes=False, with_state=False) == before
