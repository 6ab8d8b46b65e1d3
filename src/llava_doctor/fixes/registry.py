"""One planner per finding code, and `build_plan`, which runs them in code order.

A planner never trusts a finding's message: it re-derives what to change from the target's
files (through the `Workspace`, so it sees what earlier fixes in the same plan will write), and
answers with a `Proposal` (what to write, how safe), `CannotFix` (why not: a value, not an
exception), `AlreadyDone` (the repair is in place) or `NothingToDo` (its problem is not there).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llava_doctor.checks.base import CheckSpec, all_checks
from llava_doctor.checks.context import Context
from llava_doctor.fixes.plan import FixPlan, PlannedChange, Satisfied, Unfixable
from llava_doctor.fixes.workspace import Workspace
from llava_doctor.models import Finding, FixSafety, Severity


@dataclass(frozen=True)
class Proposal:
    """A repair the planner can make; `edit` records it in the workspace if it is accepted."""

    title: str
    safety: FixSafety
    edit: Callable[[Workspace], None]
    files: tuple[str, ...]
    unsafe_reason: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CannotFix:
    reason: str


@dataclass(frozen=True)
class AlreadyDone:
    reason: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class NothingToDo:
    reason: str


Outcome = Proposal | CannotFix | AlreadyDone | NothingToDo


@dataclass
class PlanInput:
    """What a planner gets: the target, the plan so far, and the findings of its code."""

    ctx: Context
    ws: Workspace
    findings: tuple[Finding, ...] = ()
    allow_unsafe: bool = False

    @property
    def evidence(self) -> dict:
        """The first finding's evidence (a hint only; planners re-derive from the files)."""
        return dict(self.findings[0].evidence) if self.findings else {}


PlannerFn = Callable[[PlanInput], Outcome]


@dataclass(frozen=True)
class Planner:
    code: str
    fn: PlannerFn
    # Files whose planned change re-runs this planner even without a finding of its code
    # (e.g. LD406 looks again at a config.json that LD101 is about to create).
    watches: tuple[str, ...] = field(default=())


PLANNERS: dict[str, Planner] = {}

# Planning order. Code order, except that renaming non-LoRA keys (LD305) must come before the
# fixes that look at which projector keys land (LD302 injects one when none does, LD301 types
# it), so that each sees the file as it will be.
ORDER = ("LD101", "LD104", "LD106", "LD201", "LD208", "LD305", "LD302", "LD301", "LD307",
         "LD403", "LD406", "LD701", "LD704")


def _rank(code: str) -> tuple[int, str]:
    return (ORDER.index(code), code) if code in ORDER else (len(ORDER), code)


def planner(code: str, *, watches: Sequence[str] = ()) -> Callable[[PlannerFn], PlannerFn]:
    """Register the fixer of one finding code."""

    def deco(fn: PlannerFn) -> PlannerFn:
        if code in PLANNERS:
            raise ValueError(f"duplicate planner for {code}")
        PLANNERS[code] = Planner(code=code, fn=fn, watches=tuple(watches))
        return fn

    return deco


def all_planners() -> dict[str, Planner]:
    """Every registered planner, by code (importing the fixer modules registers them)."""
    import llava_doctor.fixes.catalog  # noqa: F401  (side effect: registration)

    return dict(sorted(PLANNERS.items()))


def _no_fix_reason(spec: CheckSpec | None) -> str:
    if spec is None:
        return "no automatic fix exists for this code"
    text = spec.section("Fix")
    return " ".join(text.split()) or "no automatic fix exists for this code"


def _code_selected(code: str, select: Iterable[str] | None, ignore: Iterable[str] | None) -> bool:
    sel = [s.upper() for s in select] if select else None
    if sel is not None and not any(code.startswith(s) for s in sel):
        return False
    return not any(code.startswith(i.upper()) for i in (ignore or ()))


def build_plan(ctx: Context, findings: Sequence[Finding], *, allow_unsafe: bool = False,
               select: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
               protected: Sequence[Path] = ()) -> FixPlan:
    """Plan the repairs of one target's findings. Reads files; writes nothing."""
    planners = all_planners()
    checks = all_checks()
    ws = Workspace(ctx)
    by_code: dict[str, list[Finding]] = {}
    for f in findings:
        by_code.setdefault(f.code, []).append(f)
    pending = set(by_code)
    done: set[str] = set()
    changes: list[PlannedChange] = []
    unfixable: list[Unfixable] = []
    satisfied: list[Satisfied] = []

    while pending:
        code = min(pending, key=_rank)
        pending.discard(code)
        done.add(code)
        found = tuple(by_code.get(code, ()))
        spec = checks.get(code)
        name = spec.name if spec else (found[0].name if found else code)
        path = found[0].path if found else None
        p = planners.get(code)
        if p is None:
            if found and any(f.severity != Severity.info for f in found):
                unfixable.append(Unfixable(code=code, name=name, path=path,
                                           reason=_no_fix_reason(spec)))
            continue
        before = ws.changed()
        ws.code = code
        try:
            outcome = p.fn(PlanInput(ctx=ctx, ws=ws, findings=found, allow_unsafe=allow_unsafe))
        except Exception as e:  # a bug in a fixer: report it like a crashed check, plan the rest
            tb = traceback.extract_tb(e.__traceback__)[-1]
            outcome = CannotFix(f"the {code} fixer crashed ({type(e).__name__}: {e} at "
                                f"{Path(tb.filename).name}:{tb.lineno}); please report it")
        if isinstance(outcome, Proposal):
            apply = outcome.safety == FixSafety.safe or allow_unsafe
            if apply:
                outcome.edit(ws)
            changes.append(PlannedChange(
                code=code, name=name, safety=outcome.safety, title=outcome.title,
                files=outcome.files, unsafe_reason=outcome.unsafe_reason,
                notes=outcome.notes, apply=apply))
            # A check can report several problems under one code, some of which it marks as
            # having no fix (e.g. LD403): those stay, and the plan says so.
            for f in found:
                if f.fix == FixSafety.none and len(found) > 1:
                    unfixable.append(Unfixable(code=code, name=name, path=f.path,
                                               reason=f"not covered by this fix: {f.message}"))
        elif isinstance(outcome, CannotFix):
            if found:
                unfixable.append(Unfixable(code=code, name=name, path=path,
                                           reason=outcome.reason))
        elif isinstance(outcome, AlreadyDone):
            if found:
                satisfied.append(Satisfied(code=code, name=name, reason=outcome.reason,
                                           notes=outcome.notes))
        elif found:  # NothingToDo although the check flagged it: say so, never claim a fix
            unfixable.append(Unfixable(code=code, name=name, path=path,
                                       reason=f"the fixer found nothing to change: "
                                              f"{outcome.reason}"))
        ws.code = ""
        touched = ws.changed() - before
        if touched:
            for other in planners.values():
                if (_rank(other.code) > _rank(code) and other.code not in done
                        and _code_selected(other.code, select, ignore)
                        and any(w in touched for w in other.watches)):
                    pending.add(other.code)

    files = ws.finalize()
    _guard_protected(files, protected)
    return FixPlan(lora_dir=str(ctx.path), changes=tuple(changes), unfixable=tuple(unfixable),
                   satisfied=tuple(satisfied), files=tuple(files),
                   protected=tuple(str(p) for p in protected))


def _guard_protected(files: Sequence, protected: Sequence[Path]) -> None:
    from llava_doctor.fixes.apply import check_not_protected

    for fc in files:
        check_not_protected(Path(fc.path), protected)
