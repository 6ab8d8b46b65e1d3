"""The library entry point for `check`: targets in, one frozen `Report` out."""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llava_doctor.artifacts.discovery import LORA_KINDS, DirKind, Family
from llava_doctor.checks.base import TARGET, CheckSpec, Hit, Skip, all_checks, check_fn
from llava_doctor.checks.context import CheckEvent, Context, Observer, Options, default_consumer
from llava_doctor.errors import DoctorError
from llava_doctor.models import (
    CheckOutcome,
    CheckStatus,
    Consumer,
    Finding,
    FixSafety,
    Report,
    ResolvedInput,
    Severity,
    TargetResult,
)

INTERNAL = "LD000"
# The file-integrity checks report read errors that any other check may have run into (value
# checks included), so they run after everything else.
REPORTS_READ_ERRORS = frozenset({"LD501", "LD502", "LD504"})


def selected_checks(select: Iterable[str] | None = None,
                    ignore: Iterable[str] | None = None) -> list[CheckSpec]:
    """The checks to run: `select` (codes or prefixes like LD2) minus `ignore`."""
    checks = all_checks()
    sel = [s.upper() for s in select] if select else None
    ign = [s.upper() for s in ignore] if ignore else []
    out = []
    for code, spec in checks.items():
        if code == INTERNAL or spec.scope != TARGET:
            continue
        if sel is not None and not any(code.startswith(s) for s in sel):
            continue
        if any(code.startswith(i) for i in ign):
            continue
        out.append(spec)
    return out


def _finding(spec: CheckSpec, hit: Hit, target: Path, consumer: Consumer) -> Finding:
    severity = hit.severity_for(consumer) or spec.severity_for(consumer)
    return Finding(code=spec.code, name=spec.name, severity=severity,
                   message=hit.message, path=str(hit.path) if hit.path is not None else str(target),
                   target=str(target), evidence=hit.evidence, fix=hit.fix or spec.fix)


def check_target(path: Path, options: Options, checks: Sequence[CheckSpec],
                 observer: Observer | None = None,
                 ) -> tuple[TargetResult, list[Finding], Context]:
    """Run `checks` on one target. A crashing check becomes an LD000 finding; the rest run.

    ``observer`` receives a `CheckEvent` as each check starts and as values are read.
    Severities are for `options.consumer`, else for the target's default consumer.
    """
    ctx = Context(path=path, options=options, observer=observer)
    if observer is not None:
        observer(CheckEvent(path, "target"))
    kind = ctx.kind
    family = ctx.family if kind in LORA_KINDS else None
    if options.consumer is None:
        ctx.options = dataclasses.replace(options, consumer=default_consumer(family))
    consumer = ctx.consumer
    outcomes: dict[str, CheckOutcome] = {}
    findings: dict[str, list[Finding]] = {}
    ordered = sorted(checks, key=lambda s: (s.code in REPORTS_READ_ERRORS, s.code))
    for spec in ordered:
        if kind in (DirKind.missing, DirKind.not_a_dir):
            outcomes[spec.code] = CheckOutcome(code=spec.code, name=spec.name,
                                               status=CheckStatus.skipped,
                                               reason=f"{path} is {kind.value}")
            continue
        if spec.needs_lora and kind not in LORA_KINDS:
            outcomes[spec.code] = CheckOutcome(
                code=spec.code, name=spec.name, status=CheckStatus.skipped,
                reason=f"not a LoRA output directory (classified as {kind.value})")
            continue
        if family is not None and family not in spec.families:
            outcomes[spec.code] = CheckOutcome(
                code=spec.code, name=spec.name, status=CheckStatus.skipped,
                reason=f"does not apply to {family.value} runs")
            continue
        if observer is not None:
            observer(CheckEvent(path, "check", code=spec.code))
        try:
            hits = list(check_fn(spec, family or Family.llava)(ctx))
        except Skip as s:
            outcomes[spec.code] = CheckOutcome(code=spec.code, name=spec.name,
                                               status=CheckStatus.skipped, reason=s.reason)
            continue
        except DoctorError as e:
            # An expected failure met while reading values (a file whose header passed but whose
            # data does not load): a finding about the file (LD501/502/504 run last and report
            # it), not a crash of the check.
            ctx.file_errors.setdefault(Path(e.path) if e.path else path, e)
            outcomes[spec.code] = CheckOutcome(
                code=spec.code, name=spec.name, status=CheckStatus.skipped,
                reason=f"{Path(e.path).name if e.path else path} could not be read (see LD5xx)")
            continue
        except Exception as e:  # a bug in a check: report it, keep going
            tb = traceback.extract_tb(e.__traceback__)[-1]
            internal = all_checks()[INTERNAL]
            findings.setdefault(spec.code, []).append(Finding(
                code=INTERNAL, name=internal.name, severity=Severity.error,
                message=(f"check {spec.code} ({spec.name}) crashed on {path}: "
                         f"{type(e).__name__}: {e}; the other checks still ran. Please report "
                         "this with the output of `llava-doctor inspect` for the files involved"),
                path=str(path), target=str(path),
                evidence={"check": spec.code, "exception": type(e).__name__,
                          "where": f"{Path(tb.filename).name}:{tb.lineno}"},
                fix=FixSafety.none))
            outcomes[spec.code] = CheckOutcome(code=spec.code, name=spec.name,
                                               status=CheckStatus.crashed,
                                               reason=f"{type(e).__name__}: {e}")
            continue
        findings[spec.code] = [_finding(spec, h, path, consumer) for h in hits]
        outcomes[spec.code] = CheckOutcome(
            code=spec.code, name=spec.name,
            status=CheckStatus.failed if hits else CheckStatus.passed)
    inputs = []
    if kind in LORA_KINDS:
        for role, res in (("base", ctx.base_resolved), ("projector", ctx.projector_resolved)):
            inputs.append(ResolvedInput(role=role, source=res.source,
                                        path=str(res.path) if res.path is not None else None))
    result = TargetResult(path=str(path), kind=kind.value,
                          family=family.value if family is not None else None,
                          consumer=consumer, inputs=inputs,
                          checks=[outcomes[c] for c in sorted(outcomes)])
    flat = [f for code in sorted(findings) for f in findings[code]]
    return result, flat, ctx


def run_checks(paths: Sequence[Path | str], options: Options | None = None, *,
               select: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
               jobs: int = 1,
               on_target: Callable[[Path], None] | None = None,
               observer: Observer | None = None) -> Report:
    """Check every target and return one report (targets in the order given).

    ``observer`` receives progress as `CheckEvent`s (from worker threads when ``jobs > 1``).
    """
    options = options or Options()
    checks = selected_checks(select, ignore)

    def one(p: Path | str) -> tuple[TargetResult, list[Finding]]:
        if on_target:
            on_target(Path(p))
        result, found, _ = check_target(Path(p), options, checks, observer)
        return result, found

    if jobs > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(one, paths))
    else:
        results = [one(p) for p in paths]
    targets = [r for r, _ in results]
    consumers = {t.consumer for t in targets}
    consumer = options.consumer or (consumers.pop() if len(consumers) == 1 else
                                    None if consumers else default_consumer())
    return Report(consumer=consumer, targets=targets,
                  findings=[f for _, fs in results for f in fs])


_GLOB_CHARS = frozenset("*?[")


def collect_targets(paths: Sequence[Path | str] = (), recursive: Sequence[Path | str] = ()
                    ) -> list[Path]:
    """The directories to check: `paths` as given, globs the shell left unexpanded, and every
    LoRA output or checkpoint under each `recursive` root (classified from its files).

    A file stands for the directory holding it (pre-commit passes changed files). Duplicates
    are dropped, first occurrence wins. Raises `UsageError` when a path does not exist, a glob
    or a root yields nothing, or there is nothing to check at all.
    """
    import glob

    from llava_doctor.artifacts.discovery import find_lora_dirs
    from llava_doctor.errors import UsageError

    found: list[Path] = []
    for raw in paths:
        text = str(raw)
        p = Path(text)
        if p.exists():
            found.append(p.parent if p.is_file() else p)
            continue
        if _GLOB_CHARS & set(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            dirs = [m for m in matches if m.is_dir()]
            if not dirs:
                raise UsageError(f"no directory matches the pattern '{text}'",
                                 hint="check the pattern, or quote it so the shell passes it on")
            found.extend(dirs)
            continue
        raise UsageError("does not exist: nothing to check", path=p,
                         hint="pass the LoRA output directory")
    for root in recursive:
        r = Path(root)
        if not r.is_dir():
            raise UsageError("--recursive needs a directory", path=r,
                             hint="pass the training output root (e.g. ./checkpoints)")
        under = list(find_lora_dirs(r))
        if not under:
            raise UsageError("no LoRA output directory or checkpoint-N found under it", path=r,
                             hint="point --recursive at the folder holding the training runs")
        found.extend(under)
    if not found:
        raise UsageError("nothing to check",
                         hint="pass LoRA output directories, or --recursive ROOT")
    out: list[Path] = []
    seen: set[Path] = set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
