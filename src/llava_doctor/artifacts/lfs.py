"""Git LFS pointer files: a ~130-byte text file standing where the weights should be."""

from __future__ import annotations

from pathlib import Path

LFS_PREFIX = b"version https://git-lfs.github.com/spec/v1"


def is_lfs_pointer(path: Path | str) -> bool:
    """True when the file starts with the Git LFS pointer spec line."""
    try:
        with Path(path).open("rb") as f:
            return f.read(len(LFS_PREFIX)) == LFS_PREFIX
    except OSError:
        return False


def lfs_pointer_size(path: Path | str) -> int | None:
    """The size the pointer promises (``size N`` line), if readable."""
    try:
        text = Path(path).read_bytes()[:1024].decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("size "):
            try:
                return int(line[5:].strip())
            except ValueError:
                return None
    return None
