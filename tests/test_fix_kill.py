"""Kill `llava-doctor fix --yes` at every write and at random moments: each original file is
either untouched or completely replaced with its backup on disk, and the next run recovers
(rolls back the interrupted run, removes stale temp files) and then fixes cleanly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fix_support import copytree, lora_dir, snapshot
from typer.testing import CliRunner

from llava_doctor.cli import app
from llava_doctor.fixes.apply import ABORT_ENV, ABORT_EXIT, DELAY_ENV, TMP_PREFIX, list_backups

NAME = "llava-v1.5-tiny-finetune"            # lacks "lora": LD106 creates a sibling symlink
LINK = "llava-v1.5-tiny-finetune-lora"
FILES = ("adapter_config.json", "config.json", "non_lora_trainables.bin")  # all three replaced
PEFT = "0.8.0"  # the adapter was written by peft 0.10: LD201 drops use_dora/layer_replication


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kill-template")
    lora_dir(root, NAME, non_lora_style="ddp", model_type="llava", quantization_config=True,
             peft_version="0.10.0")
    return root


@pytest.fixture(scope="module")
def fixed(template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bytes of each file after a clean run (the plan is deterministic)."""
    root = copytree(template, tmp_path_factory.mktemp("kill-reference") / "t")
    res = CliRunner().invoke(app, _args(root))
    assert res.exit_code == 0, res.output
    out = {n: (root / NAME / n).read_bytes() for n in FILES}
    assert all(out[n] != (template / NAME / n).read_bytes() for n in FILES)
    return out


def _args(root: Path) -> list[str]:
    return ["fix", str(root / NAME), "--base", str(root / "vicuna-tiny-v1.5"), "--peft-version",
            PEFT, "--yes", "--unsafe"]


def _cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "llava_doctor", *_args(root)]


def _assert_consistent(root: Path, template: Path, fixed: dict[str, bytes], why: str) -> None:
    lora = root / NAME
    backups = [d for d, _ in list_backups(lora)]
    for name in FILES:
        now = (lora / name).read_bytes()
        orig = (template / NAME / name).read_bytes()
        if now == orig:
            continue
        assert now == fixed[name], f"{why}: {name} is neither the original nor the fixed file"
        assert any((d / name).is_file() and (d / name).read_bytes() == orig for d in backups), \
            f"{why}: {name} was replaced but no backup holds the original"
    link = root / LINK
    assert not os.path.lexists(link) or os.readlink(link) == NAME, why
    # Nothing else appeared in the LoRA dir or beside it, except our own temp files.
    extra = {p.name for p in lora.iterdir()} - {p.name for p in (template / NAME).iterdir()}
    assert all(n == ".llava-doctor" or n.startswith(TMP_PREFIX) for n in extra), (why, extra)


def _assert_next_run_recovers(root: Path, template: Path, fixed: dict[str, bytes],
                              why: str) -> None:
    res = CliRunner().invoke(app, _args(root))
    assert res.exit_code == 0, f"{why}: {res.output}"
    lora = root / NAME
    for name in FILES:
        assert (lora / name).read_bytes() == fixed[name], why
    assert os.readlink(root / LINK) == NAME
    stale = [p for d in (lora, root) for p in d.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert stale == [], why
    states = [m["state"] for _, m in list_backups(lora)]
    assert states[-1] == "complete" and set(states[:-1]) <= {"rolled-back"}, (why, states)
    # ... and undo brings back the originals, byte for byte.
    res = CliRunner().invoke(app, ["fix", "--undo", str(lora)])
    assert res.exit_code == 0, res.output
    assert snapshot(root, dir_mtimes=False, with_state=False) == \
        snapshot(template, dir_mtimes=False, with_state=False), why


def _assert_undo_restores(root: Path, template: Path, why: str) -> None:
    """`fix --undo` right after a kill restores the originals (or finds nothing was changed)."""
    res = CliRunner().invoke(app, ["fix", "--undo", str(root / NAME)])
    assert res.exit_code == 0 or "has no fix to undo" in res.output, f"{why}: {res.output}"
    assert snapshot(root, dir_mtimes=False, with_state=False) == \
        snapshot(template, dir_mtimes=False, with_state=False), why


def test_abort_after_every_write(template: Path, fixed: dict[str, bytes], tmp_path: Path) -> None:
    """The test switch os._exit()s right after the N-th durable write, for every N."""
    finished = False
    seen: set[str] = set()  # manifest states the kills left behind
    replaced = 0
    for n in range(1, 30):
        root = copytree(template, tmp_path / f"n{n}")
        env = {**os.environ, ABORT_ENV: str(n)}
        proc = subprocess.run(_cmd(root), env=env, capture_output=True, text=True, timeout=120)
        why = f"abort after write {n}"
        if proc.returncode == 0:
            finished = True  # n is past the last write: the run completed
            assert n > 5, "fewer writes than backups + manifests + files: the switch is broken"
            break
        assert proc.returncode == ABORT_EXIT, f"{why}: rc {proc.returncode}\n{proc.stderr}"
        _assert_consistent(root, template, fixed, why)
        seen.update(m["state"] if m else "no-manifest" for _, m in list_backups(root / NAME))
        replaced += sum((root / NAME / f).read_bytes() == fixed[f] for f in FILES)
        if n % 2:
            _assert_next_run_recovers(root, template, fixed, why)
        else:
            _assert_undo_restores(root, template, why)
    assert finished
    # The kills hit before any change, in the middle of applying, and just before completion.
    assert {"preparing", "applying", "complete"} <= seen, seen
    assert replaced > 0


def test_sigkill_at_random_moments(template: Path, fixed: dict[str, bytes],
                                   tmp_path: Path) -> None:
    """A parent SIGKILLs the process at random delays; writes are slowed down (test switch) so
    that most kills land while the plan is being applied."""
    seed = int(os.environ.get("LLAVA_DOCTOR_KILL_SEED", "20240512"))
    rng = random.Random(seed)
    for i in range(4):
        root = copytree(template, tmp_path / f"k{i}")
        env = {**os.environ, DELAY_ENV: "0.04"}
        proc = subprocess.Popen(_cmd(root), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        if i % 3 == 0:  # anywhere in the run, imports and checks included
            time.sleep(rng.uniform(0.0, 4.0))
        else:           # once it announces its first backup or write
            for line in proc.stderr:
                if "backing up" in line or "writing" in line:
                    break
            time.sleep(rng.uniform(0.0, 0.45))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        why = f"SIGKILL #{i} (seed {seed}, rc {proc.returncode})"
        _assert_consistent(root, template, fixed, why)
        _assert_next_run_recovers(root, template, fixed, why)
