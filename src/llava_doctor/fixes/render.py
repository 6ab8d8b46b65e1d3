"""Plain-text views of a plan, an applied fix and an undo: pure functions, no I/O."""

from __future__ import annotations

import textwrap

from llava_doctor.fixes.apply import ApplyResult
from llava_doctor.fixes.plan import FileOp, FixPlan
from llava_doctor.fixes.undo import UndoResult

_WIDTH = 100


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [indent]


def _op(op: FileOp) -> str:
    return {FileOp.create: "new file", FileOp.replace: "replaced",
            FileOp.symlink: "new symlink"}[op]


def render_plan(plan: FixPlan, *, diff: bool = False) -> str:
    """The plan: each fix (code, safety, what changes, files), what is held back or unfixable;
    with `diff`, a unified diff of every JSON file and a summary of every other file."""
    lines: list[str] = []
    apply = plan.to_apply
    held = plan.held_back
    lines.append(f"Fix plan for {plan.lora_dir}: {len(apply)} fix(es) to apply"
                 + (f", {len(held)} held back (unsafe)" if held else "")
                 + (f", {len(plan.unfixable)} not fixable" if plan.unfixable else ""))
    rels = {fc.rel: fc for fc in plan.files}
    for n, c in enumerate(apply, 1):
        lines.append(f"  {n}. {c.code} {c.name}  [{c.safety.value}]")
        lines += _wrap(c.title, "       ")
        if c.unsafe_reason:
            lines += _wrap(f"unsafe because: {c.unsafe_reason}", "       ")
        touched = [f"{f} ({_op(rels[f].op)})" for f in c.files if f in rels]
        if touched:
            lines.append(f"       writes: {', '.join(touched)}")
        for note in c.notes:
            lines += _wrap(note, "       ")
    if held:
        lines.append("  Held back, unsafe (run again with --unsafe to apply):")
        for c in held:
            lines += _wrap(f"- {c.code} {c.name}: {c.title}", "    ")
            if c.unsafe_reason:
                lines += _wrap(f"unsafe because: {c.unsafe_reason}", "      ")
    if plan.satisfied:
        lines.append("  Already taken care of:")
        for s in plan.satisfied:
            lines += _wrap(f"- {s.code} {s.name}: {s.reason}", "    ")
            for note in s.notes:
                lines += _wrap(note, "      ")
    if plan.unfixable:
        lines.append("  Not fixable by llava-doctor:")
        for u in plan.unfixable:
            lines += _wrap(f"- {u.code} {u.name}: {u.reason}", "    ")
    if not apply:
        lines.append("  Nothing to change.")
    if diff and plan.files:
        lines.append("")
        for fc in plan.files:
            if fc.is_json and fc.diff:
                lines.append(fc.diff.rstrip("\n"))
            else:
                lines.append(f"{_op(fc.op)} {fc.rel}: {fc.summary}")
    return "\n".join(lines) + "\n"


def render_applied(result: ApplyResult) -> str:
    """What was written and how to undo it."""
    return (f"Applied {', '.join(result.codes)}: wrote {', '.join(result.written)}.\n"
            f"Backup: {result.backup_dir} (undo with `llava-doctor fix --undo "
            f"{result.lora_dir}`)\n")


def render_undo(result: UndoResult) -> str:
    what = ", ".join(result.restored) if result.restored else "nothing (already as before)"
    return (f"Undid the fix of {result.backup_dir} ({', '.join(result.codes)}): restored or "
            f"removed {what}.\n")
