"""Test-only helpers shared across test modules (no tests here)."""

from __future__ import annotations

from pathlib import Path

import pytest


def unprivileged_prefix(root: Path) -> list[str]:
    """A command prefix that runs a child as an unprivileged user when the tests run as root
    (root ignores permission bits). Makes `root`, the interpreter and the package reachable for
    that user (read and traverse bits only), and skips the test where that cannot be done."""
    import os
    import shutil
    import subprocess
    import sys

    import llava_doctor

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits would not bind")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    package = Path(llava_doctor.__file__).resolve().parent
    for start in (root, package, Path(sys.prefix).resolve()):
        for p in [start, *start.parents]:
            p.chmod(p.stat().st_mode | 0o005)
    probe = subprocess.run([*prefix, sys.executable, "-c", "import llava_doctor"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot import llava_doctor here: "
                    f"{probe.stderr.strip()[-200:]}")
    return prefix
