"""The `fix` command (thin typer layer over `llava_doctor.fixes`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llava_doctor.cli import (
    BaseOpt,
    IgnoreOpt,
    MergeWithOpt,
    PeftOpt,
    ProjectorOpt,
    SelectOpt,
    TransformersOpt,
    _fail,
    _installed_peft,
    _transformers_target,
)
from llava_doctor.errors import DoctorError, UsageError


def _progress(msg: str) -> None:
    print(f"llava-doctor: {msg}", file=sys.stderr, flush=True)


def fix(
    lora_dir: Annotated[Path, typer.Argument(
        metavar="LORA_DIR", help="The LoRA output dir or checkpoint-N dir.")],
    base: BaseOpt = None,
    projector: ProjectorOpt = None,
    peft_version: PeftOpt = None,
    transformers_version: TransformersOpt = None,
    merge_with: MergeWithOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and a diff of every "
                                          "JSON change; write nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    unsafe: Annotated[bool, typer.Option("--unsafe", help="Also apply unsafe fixes (they change "
                                         "what the model computes, or guess).")] = False,
    select: SelectOpt = None,
    ignore: IgnoreOpt = None,
    undo: Annotated[bool, typer.Option("--undo", help="Restore the latest backup of LORA_DIR "
                                       "exactly.")] = False,
) -> None:
    """Repair what `check` finds: plan, confirm, back up, apply atomically, re-check.

    Exit 0 when no error finding remains, 1 otherwise, 2 on usage errors (including a refusal
    to apply without --yes when stdin is not a terminal). With --dry-run: 0 when nothing would
    change and no error is found, else 1. Errors are those of the merge that will run
    (--merge-with, default: LLaVA's own for original-LLaVA runs), as with `check`.
    """
    from llava_doctor.checks.context import Options
    from llava_doctor.doctor import run_checks
    from llava_doctor.fixes import (
        apply_plan,
        needs_recovery,
        plan_fixes,
        recover,
        render_applied,
        render_plan,
        render_undo,
        undo_latest,
    )
    from llava_doctor.report.text import render_text

    try:
        if undo:
            if dry_run:
                raise UsageError("--undo and --dry-run cannot be combined",
                                 hint="run `llava-doctor fix --undo LORA_DIR`")
            undone = undo_latest(lora_dir, observer=_progress)
            sys.stdout.write(render_undo(undone))
            raise typer.Exit(0)
        if not lora_dir.is_dir():
            raise UsageError("is not a directory: nothing to fix", path=lora_dir,
                             hint="pass the LoRA output directory")
        if dry_run:
            for left in needs_recovery(lora_dir):
                _progress(f"note: {left} (a real run cleans it up first)")
        else:
            rec = recover(lora_dir, observer=_progress)
            for d in rec.rolled_back:
                _progress(f"rolled back the interrupted fix {d}")
        opts = Options(base=base, projector=projector,
                       peft_version=peft_version or _installed_peft(),
                       transformers_version=_transformers_target(transformers_version),
                       consumer=merge_with)
        report, plan = plan_fixes(lora_dir, opts, select=select, ignore=ignore,
                                  allow_unsafe=unsafe)
        sys.stdout.write(render_plan(plan, diff=dry_run))
        if dry_run:
            raise typer.Exit(1 if (plan.files or report.exit_code() == 1) else 0)
        if plan.is_empty:
            sys.stdout.write("Nothing was changed.\n")
            raise typer.Exit(report.exit_code())
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError("refusing to apply the plan above: stdin is not a terminal",
                                 hint="pass --yes to apply it, or --dry-run to see the diff")
            if not typer.confirm(f"Apply {len(plan.to_apply)} fix(es)?", default=False):
                sys.stdout.write("Nothing was changed.\n")
                raise typer.Exit(1)
        result = apply_plan(plan, observer=_progress)
        sys.stdout.write(render_applied(result))
        for c in plan.to_apply:
            for note in c.notes:
                sys.stdout.write(f"{c.code}: {note}\n")
        after = run_checks([lora_dir], opts, select=select, ignore=ignore)
        # The report's first line says whose merge its severities are for (--merge-with).
        sys.stdout.write("\nAfter the fix:\n")
        sys.stdout.write(render_text(after))
        raise typer.Exit(after.exit_code())
    except DoctorError as e:
        raise _fail(e) from None


def register(app: typer.Typer) -> None:
    """Add the `fix` command to the app."""
    app.command("fix")(fix)
