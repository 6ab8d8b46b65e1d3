"""`llava-doctor fix`: planned, reversible repairs (plan, then one call applies it).

Public API:

- `plan_fixes(lora_dir, options, ...) -> (Report, FixPlan)`: run the checks, plan the repairs;
  reads only.
- `apply_plan(plan, observer=...) -> ApplyResult`: backups, atomic writes, manifest.
- `undo_latest(lora_dir) -> UndoResult`: restore the latest backup exactly.
- `recover(lora_dir) -> RecoveryResult`: roll back a run that was killed mid-way.
- `render_plan(plan, diff=...) -> str`: the human view of a plan (pure).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from llava_doctor.checks.context import Options
from llava_doctor.fixes.apply import (
    ApplyResult,
    RecoveryResult,
    apply_plan,
    needs_recovery,
    recover,
)
from llava_doctor.fixes.plan import FileChange, FileOp, FixPlan, PlannedChange, Satisfied, Unfixable
from llava_doctor.fixes.render import render_applied, render_plan, render_undo
from llava_doctor.fixes.undo import UndoResult, undo_latest
from llava_doctor.models import Report

__all__ = ["plan_fixes", "apply_plan", "undo_latest", "recover", "needs_recovery", "render_plan",
           "render_applied", "render_undo", "FixPlan", "PlannedChange", "FileChange", "FileOp",
           "Unfixable", "Satisfied", "ApplyResult", "UndoResult", "RecoveryResult"]


def plan_fixes(lora_dir: Path | str, options: Options | None = None, *,
               select: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
               allow_unsafe: bool = False) -> tuple[Report, FixPlan]:
    """Check one LoRA dir and plan the repairs of what was found. Writes nothing."""
    from llava_doctor.doctor import check_target, selected_checks
    from llava_doctor.fixes.registry import build_plan

    path = Path(lora_dir)
    options = options or Options()
    select = list(select) if select else None
    ignore = list(ignore) if ignore else None
    result, findings, ctx = check_target(path, options, selected_checks(select, ignore))
    report = Report(targets=[result], findings=findings)
    protected = [p for p in (ctx.base_path, ctx.projector_resolved.path) if p is not None]
    plan = build_plan(ctx, findings, allow_unsafe=allow_unsafe, select=select, ignore=ignore,
                      protected=protected)
    return report, plan
