"""`check`, `inspect` and `explain` never write: every byte and mtime is unchanged, and they run
on a read-only copy (as an unprivileged user when the tests run as root, since root ignores
permission bits)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support import unprivileged_prefix

COMMANDS = [
    ["check", "{lora}", "--base", "{base}"],
    ["check", "{lora}", "--base", "{base}", "--format", "json", "--strict"],
    ["check", "{bad}", "--base", "{base}"],
    ["inspect", "{lora}"],
    ["inspect", "{base}", "--format", "json"],
    ["inspect", "{bad}/non_lora_trainables.bin"],
    ["explain", "LD101"],
]


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(p.relative_to(root))] = (data, st.st_mtime_ns, st.st_mode)
    return out


def _fill(cmd: list[str], paths: dict[str, Path]) -> list[str]:
    return [c.format(**{k: str(v) for k, v in paths.items()}) for c in cmd]


@pytest.fixture()
def tree(scenarios: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "ro"
    paths = {"lora": root / "llava-v1.5-tiny-lora", "base": root / "vicuna-tiny-v1.5",
             "bad": root / "bad" / "llava-v1.5-tiny-lora"}
    shutil.copytree(scenarios["lora"], paths["lora"])
    shutil.copytree(scenarios["base-vicuna"], paths["base"])
    shutil.copytree(scenarios["LD502-malicious-pickle"], paths["bad"])
    paths["root"] = root
    return paths


def test_commands_change_nothing(tree: dict[str, Path]) -> None:
    before = snapshot(tree["root"])
    for cmd in COMMANDS:
        subprocess.run([sys.executable, "-m", "llava_doctor", *_fill(cmd, tree)],
                       capture_output=True, text=True, cwd=tree["root"])
    assert snapshot(tree["root"]) == before


def test_commands_work_on_a_read_only_copy(tree: dict[str, Path]) -> None:
    prefix = unprivileged_prefix(tree["root"])
    subprocess.run(["chmod", "-R", "a-w,a+rX", str(tree["root"])], check=True)
    before = snapshot(tree["root"])
    try:
        expected = {"check": None, "inspect": None, "explain": 0}
        for cmd in COMMANDS:
            env = {**os.environ, "HOME": str(tree["root"]), "PYTHONDONTWRITEBYTECODE": "1"}
            proc = subprocess.run([*prefix, sys.executable, "-m", "llava_doctor",
                                   *_fill(cmd, tree)], capture_output=True, text=True,
                                  cwd=tree["root"], env=env)
            assert proc.returncode in (0, 1), (cmd, proc.stderr)
            assert "Traceback" not in proc.stderr and "Permission denied" not in proc.stderr
            if expected[cmd[0]] is not None:
                assert proc.returncode == expected[cmd[0]]
        assert snapshot(tree["root"]) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(tree["root"])], check=True)
