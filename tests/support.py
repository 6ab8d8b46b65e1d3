"""Test-only helpers shared across test modules (no tests here)."""

from __future__ import annotations

from pathlib import Path

import pytest


def unprivileged_prefix(root: Path) -> list[str]:
    """A command prefix that runs a child as an unprivileged user when the tests run as root
    (root ignores permission bits), after making `root`'s parents reachable for that user.
    Skips the test where that cannot be done."""
    import os
    import shutil

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits would not bind")
    for p in [root, *root.parents]:
        p.chmod(p.stat().st_mode | 0o005)
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
