"""`fix` on a read-only LoRA dir and on a disk that fills up: one clear line, exit 1, every
original byte intact (issue 7: disk full and permissions)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from support import unprivileged_prefix

from llava_doctor.fixtures import TINY, build_base, build_lora

NAME = "llava-v1.5-tiny-lora"


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    # a valid generation config: vicuna's (LD404) has no fix and would keep the exit code at 1
    base = build_base(tmp_path / "vicuna-tiny-v1.5", TINY, generation_config="valid")
    # LD208 + LD406 (config.json) and LD305 (non_lora keys rewritten into a new .bin)
    build_lora(tmp_path / NAME, TINY, base=base, model_type="llava", quantization_config=True,
               non_lora_style="ddp")
    return tmp_path


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and ".llava-doctor" not in p.parts}


def fix(cwd: Path, prefix: list[str] = (), preexec=None) -> subprocess.CompletedProcess:  # type: ignore[assignment]
    return subprocess.run([*prefix, sys.executable, "-m", "llava_doctor", "fix", NAME,
                           "--base", "vicuna-tiny-v1.5", "--yes"], cwd=cwd, capture_output=True,
                          text=True, preexec_fn=preexec, env={**os.environ, "HOME": str(cwd)})


def test_read_only_lora_dir(run: Path) -> None:
    prefix = unprivileged_prefix(run)
    before = files(run / NAME)
    subprocess.run(["chmod", "-R", "a-w,a+rX", str(run)], check=True)
    try:
        r = fix(run, prefix)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(run)], check=True)
    assert r.returncode == 1, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "cannot write in this directory" in err[0] and "nothing was changed" in err[0]
    assert files(run / NAME) == before


@pytest.mark.parametrize("limit", [2_000, 9_000])
def test_disk_full_while_applying(run: Path, limit: int) -> None:
    """RLIMIT_FSIZE makes every write past `limit` bytes fail with EFBIG, as a full disk would."""
    before = files(run / NAME)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = fix(run, preexec=small_files)
    assert r.returncode == 1, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and "writing" not in ln
           and "backing up" not in ln]
    assert "Traceback" not in r.stderr
    assert any(("File too large" in ln) for ln in err), r.stderr
    assert files(run / NAME) == before  # originals intact, or restored from the backup
    # and no temp files are left behind
    assert not [p for p in (run / NAME).iterdir() if p.name.startswith(".llava-doctor-tmp")]
    # the next unrestricted run fixes it
    assert fix(run).returncode == 0


def test_write_failure_after_a_file_was_replaced_rolls_back(run: Path, monkeypatch) -> None:
    """The second replacement fails (ENOSPC): the first is put back from the backup at once."""
    import errno

    from llava_doctor.checks.context import Options
    from llava_doctor.errors import FixError
    from llava_doctor.fixes import apply as ap
    from llava_doctor.fixes import plan_fixes

    before = files(run / NAME)
    _, plan = plan_fixes(run / NAME, Options(base=run / "vicuna-tiny-v1.5"))
    assert len(plan.files) >= 2
    real = ap.atomic_write
    calls = {"n": 0}

    def flaky(final: Path, data: bytes, **kw):
        if final.parent == run / NAME:  # a file of the LoRA dir, not a backup or manifest
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(final))
        return real(final, data, **kw)

    monkeypatch.setattr(ap, "atomic_write", flaky)
    with pytest.raises(FixError) as ei:
        ap.apply_plan(plan)
    assert "No space left on device" in str(ei.value)
    assert "restored from the backup" in str(ei.value)
    assert files(run / NAME) == before
