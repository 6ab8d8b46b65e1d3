"""Writing a rendered report to `--output`: all or nothing, never a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llava_doctor.errors import UsageError


def check_output_path(path: Path) -> None:
    """Fail early (before any check runs) when `path` cannot become the report file."""
    if path.is_dir():
        raise UsageError("--output is a directory", path=path, hint="name a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError("--output's folder does not exist", path=path,
                         hint=f"create {parent} first")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, fsync it, then `os.replace` it into place."""
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file 0600; a report is an ordinary file (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
