"""Helpers shared by the per-code check tests (no tests here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.models import Finding, Report


def found(path: Path, code: str, **opts: Any) -> list[Finding]:
    """The findings of one code on one target; no check may crash (LD000) meanwhile."""
    rep = run_checks([path], Options(**opts), select=[code])
    assert not [f for f in rep.findings if f.code == "LD000"], rep.findings
    return [f for f in rep.findings if f.code == code]


def one(path: Path, code: str, **opts: Any) -> Finding:
    """Exactly one finding of `code`."""
    fs = found(path, code, **opts)
    assert len(fs) == 1, fs
    return fs[0]


def layout_report(scenarios: dict[str, Path], targets: tuple[str, ...]) -> Report:
    """The LD1 (layout) findings on some scenario runs, against the vicuna base and the stage-1
    projector: what the report renderers' tests render (the layout findings do not depend on
    the value checks other modules add)."""
    opts = Options(base=scenarios["base-vicuna"],
                   projector=scenarios["pretrain"] / "mm_projector.bin")
    return run_checks([scenarios[t] for t in targets], opts, select=["LD1"])


def edit_json(path: Path, **changes: Any) -> None:
    """Set keys of a JSON file; a value of None removes the key."""
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data, indent=2))
