"""Every fix on a target built to need it: before -> plan -> apply -> check clean for that code,
then a second run plans nothing and `--undo` restores the original bytes; `--dry-run` writes
nothing at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_fix_support import CASES, Case, codes, snapshot, under
from typer.testing import CliRunner

from llava_doctor.checks.context import Options
from llava_doctor.cli import app
from llava_doctor.doctor import run_checks
from llava_doctor.fixes import apply_plan, plan_fixes, undo_latest
from llava_doctor.models import FixSafety

runner = CliRunner()


def _cli_args(lora: Path, opts: Options, *extra: str) -> list[str]:
    args = ["fix", str(lora), "--base", str(opts.base)]
    if opts.peft_version:
        args += ["--peft-version", opts.peft_version]
    return args + list(extra)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fix_applies_checks_clean_is_idempotent_and_undoes(case: Case, tmp_path: Path) -> None:
    lora, opts = case.build(tmp_path)
    before = snapshot(tmp_path, dir_mtimes=False)
    report, plan = plan_fixes(lora, opts, allow_unsafe=case.unsafe)
    assert case.code in codes(report)

    change = next(c for c in plan.changes if c.code == case.code)
    assert change.safety == case.safety and change.apply
    assert (change.unsafe_reason is not None) == case.unsafe
    assert not plan.unfixable or case.code not in {u.code for u in plan.unfixable}

    result = apply_plan(plan)
    assert case.code in result.codes
    case.verify(lora)
    after = run_checks([lora], opts)
    assert case.code not in codes(after) or case.code == "LD106"
    # The base and the stage-1 projector are never written.
    now = snapshot(tmp_path, dir_mtimes=False)
    for kept in ("vicuna-tiny-v1.5", "llava-v1.5-tiny-pretrain"):
        assert under(now, kept) == under(before, kept)

    _, again = plan_fixes(lora, opts, allow_unsafe=case.unsafe)
    assert again.is_empty and not again.to_apply, again

    undone = undo_latest(lora)
    assert set(undone.codes) >= {case.code}
    assert snapshot(tmp_path, dir_mtimes=False, with_state=False) == before


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dry_run_writes_nothing_and_shows_json_diffs(case: Case, tmp_path: Path) -> None:
    lora, opts = case.build(tmp_path)
    before = snapshot(tmp_path)
    res = runner.invoke(app, _cli_args(lora, opts, "--dry-run", "--unsafe"))
    assert res.exit_code == 1, res.output
    assert snapshot(tmp_path) == before
    assert f"{case.code} " in res.output
    _, plan = plan_fixes(lora, opts, allow_unsafe=True)
    for fc in plan.files:
        if fc.is_json:
            head = "--- /dev/null" if fc.sha256_before is None else f"--- a/{fc.rel}"
            assert f"{head}\n+++ b/{fc.rel}\n" in res.output
        else:
            assert f"{fc.rel}: " in res.output


@pytest.mark.parametrize("case", [c for c in CASES if c.unsafe], ids=lambda c: c.id)
def test_unsafe_fix_is_held_back_without_unsafe(case: Case, tmp_path: Path) -> None:
    lora, opts = case.build(tmp_path)
    _, plan = plan_fixes(lora, opts, allow_unsafe=False)
    held = [c for c in plan.held_back if c.code == case.code]
    assert len(held) == 1 and held[0].safety == FixSafety.unsafe and held[0].unsafe_reason
    assert all(case.code not in fc.codes for fc in plan.files)


def test_cli_applies_rechecks_and_prints_the_merge_command(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "LD106-name")
    lora, opts = case.build(tmp_path)
    res = runner.invoke(app, _cli_args(lora, opts, "--yes"))
    assert res.exit_code == 0, res.output
    link = tmp_path / "llava-v1.5-tiny-finetune-lora"
    out = tmp_path / "llava-v1.5-tiny-finetune-merged"
    assert (f"LD106: merge with: python scripts/merge_lora_weights.py --model-path {link} "
            f"--model-base {opts.base} --save-model-path {out}") in res.output
    assert "Applied LD106: wrote ../llava-v1.5-tiny-finetune-lora." in res.output
    assert "After the fix:" in res.output
    # The directory's own name is unchanged, so the warning remains; a second run says why.
    res2 = runner.invoke(app, _cli_args(lora, opts, "--yes"))
    assert res2.exit_code == 0
    assert "Already taken care of:" in res2.output and "Nothing was changed." in res2.output
    assert f"the symlink {link} -> llava-v1.5-tiny-finetune exists" in " ".join(res2.output.split())


def test_cli_refuses_without_yes_when_stdin_is_not_a_terminal(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "LD406")
    lora, opts = case.build(tmp_path)
    before = snapshot(tmp_path)
    res = runner.invoke(app, _cli_args(lora, opts))
    assert res.exit_code == 2
    assert "1. LD406 model-type-collision  [safe]" in res.output
    assert ("error: refusing to apply the plan above: stdin is not a terminal; pass --yes to "
            "apply it, or --dry-run to see the diff"
            in res.output)
    assert snapshot(tmp_path) == before


def test_cli_exit_code_is_1_while_errors_remain(tmp_path: Path) -> None:
    # LD104 on a checkpoint is unsafe: without --unsafe only LD101 is applied, LD104 remains.
    case = next(c for c in CASES if c.id == "LD104-parent")
    lora, opts = case.build(tmp_path)
    res = runner.invoke(app, _cli_args(lora, opts, "--yes"))
    assert res.exit_code == 1, res.output
    assert "Applied LD101: wrote config.json." in res.output
    assert "LD104 non-lora-trainables-missing" in res.output.split("After the fix:")[1]
    res = runner.invoke(app, _cli_args(lora, opts, "--yes", "--unsafe"))
    assert res.exit_code == 0, res.output


def test_select_and_ignore_limit_what_is_fixed(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "LD104-parent")
    lora, opts = case.build(tmp_path)
    _, plan = plan_fixes(lora, opts, allow_unsafe=True, ignore=["LD101"])
    assert [c.code for c in plan.changes] == ["LD104"]
    _, plan = plan_fixes(lora, opts, allow_unsafe=True, select=["LD1"], ignore=["LD104"])
    assert [c.code for c in plan.changes] == ["LD101"]


def test_fixes_compose_on_one_file(tmp_path: Path) -> None:
    """LD208 and LD406 both edit config.json: one write, both edits, each key alone changed."""
    from test_fix_support import lora_dir

    lora, base = lora_dir(tmp_path, quantization_config=True, model_type="llava")
    before = (lora / "config.json").read_text()
    _, plan = plan_fixes(lora, Options(base=base))
    assert [c.code for c in plan.changes] == ["LD208", "LD406"]
    assert [(fc.rel, fc.codes) for fc in plan.files] == [("config.json", ("LD208", "LD406"))]
    apply_plan(plan)
    after = (lora / "config.json").read_text()
    removed = [ln for ln in before.splitlines() if ln not in after.splitlines()]
    added = [ln for ln in after.splitlines() if ln not in before.splitlines()]
    assert added == ['  "model_type": "llava_llama",']
    assert removed[0] == '  "model_type": "llava",' and removed[1] == '  "quantization_config": {'
    assert all(not ln.startswith('  "') or ln.startswith('  "quantization_config"')
               for ln in removed[1:])


def test_fix_on_a_created_config_revisits_it(tmp_path: Path) -> None:
    """A config copied in by LD101 that carries model_type 'llava' is fixed in the same run."""
    from test_fix_support import edit_config
    from test_fix_support import lora_dir as build

    from llava_doctor.fixtures import add_checkpoint

    lora, base = build(tmp_path)
    edit_config(lora / "config.json", model_type="llava")
    ckpt = add_checkpoint(lora, 50)
    _, plan = plan_fixes(ckpt, Options(base=base), select=["LD101", "LD406"])
    assert [c.code for c in plan.changes] == ["LD101", "LD406"]
    apply_plan(plan)
    assert not {"LD101", "LD406"} & codes(run_checks([ckpt], Options(base=base)))
    _, again = plan_fixes(ckpt, Options(base=base), select=["LD101", "LD406"])
    assert again.is_empty


def test_state_dir_is_ignored_by_checks_and_discovery(tmp_path: Path) -> None:
    from llava_doctor.artifacts.discovery import classify, find_lora_dirs

    case = next(c for c in CASES if c.id == "LD201-defaults")
    lora, opts = case.build(tmp_path)
    apply_plan(plan_fixes(lora, opts)[1])
    backups = list((lora / ".llava-doctor" / "backups").iterdir())
    assert len(backups) == 1 and (backups[0] / "adapter_config.json").is_file()
    assert (backups[0] / "manifest.json").is_file()
    assert list(find_lora_dirs(tmp_path)) == [lora]
    # The LoRA dir is still classified from its own files, not from the backup copies.
    assert classify(lora).value == "lora-output"
    report = run_checks([lora], opts)
    assert not any(".llava-doctor" in (f.path or "") or ".llava-doctor" in f.message
                   for f in report.findings)
    assert os.path.isdir(lora / ".llava-doctor")


@pytest.mark.parametrize(("answer", "rc"), [("y", 0), ("n", 1)])
def test_asks_on_a_terminal(answer: str, rc: int, tmp_path: Path) -> None:
    import pty
    import subprocess
    import sys

    case = next(c for c in CASES if c.id == "LD406")
    lora, opts = case.build(tmp_path)
    before = (lora / "config.json").read_bytes()
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "llava_doctor",
                                 *_cli_args(lora, opts)], stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(master, f"{answer}\n".encode())
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == rc, out + err
    assert "Apply 1 fix(es)? [y/N]:" in out
    changed = (lora / "config.json").read_bytes() != before
    assert changed == (answer == "y")
    assert ("Nothing was changed." in out) == (answer == "n")
