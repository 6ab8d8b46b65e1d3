"""The check registry: one entry per stable code, each with its doc and its function."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar, Union

from llava_doctor.artifacts.discovery import Family
from llava_doctor.models import Consumer, FixSafety, Severity

if TYPE_CHECKING:
    from llava_doctor.checks.context import Context

DOC_SECTIONS = ("## What it does", "## Why is this bad?", "## Example", "## Fix")

#: A severity for every consumer, or one per consumer (`{Consumer.llava: Severity.error, ...}`;
#: string keys such as "llava-doctor" work too).
Severities = Union[Severity, Mapping[Consumer, Severity], Mapping[str, Severity]]


def by_consumer(*, llava: Severity, llava_doctor: Severity, peft: Severity
                ) -> dict[Consumer, Severity]:
    """One severity per consumer, spelled with keyword arguments (registry entries, hits)."""
    return {Consumer.llava: llava, Consumer.llava_doctor: llava_doctor, Consumer.peft: peft}


def per_consumer(severity: Severities, *, complete: bool = True) -> dict[Consumer, Severity]:
    """`severity` spelled out per consumer. A registry entry must name every consumer
    (`complete`); a `Hit` may name only those it overrides."""
    if isinstance(severity, Severity):
        return {c: severity for c in Consumer}
    out = {Consumer(k): Severity(v) for k, v in severity.items()}
    missing = [c.value for c in Consumer if c not in out]
    if complete and missing:
        raise ValueError(f"severity per consumer lacks {', '.join(missing)}")
    return out


@dataclass(frozen=True)
class Hit:
    """What a check function yields: the runner turns it into a `Finding`."""

    message: str
    path: Any = None
    evidence: dict[str, Any] = field(default_factory=dict)
    # Overrides the check's severity: one for every consumer, or a mapping for some of them
    # (e.g. LD201 is an error for the peft that refuses the file, info for llava-doctor).
    severity: Severities | None = None
    fix: FixSafety | None = None      # overrides the check's default (e.g. not fixable here)

    def severity_for(self, consumer: Consumer) -> Severity | None:
        """This hit's own severity for `consumer`, or None to use the check's."""
        if self.severity is None:
            return None
        return per_consumer(self.severity, complete=False).get(consumer)


class Skip(Exception):
    """Raised by a check that cannot run on this target; the reason is reported."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


CheckFn = Callable[["Context"], Iterable[Hit]]
# Environment checks (LD9xx) take an `envinfo.EnvContext` instead of a target's Context.
AnyCheckFn = TypeVar("AnyCheckFn", bound=Callable[..., Iterable[Hit]])
TARGET, ENVIRONMENT = "target", "environment"


ORIGINAL = frozenset({Family.llava})
HF = frozenset({Family.llava_hf})
BOTH = ORIGINAL | HF


@dataclass(frozen=True)
class CheckSpec:
    code: str
    name: str
    severity: Severity
    fix: FixSafety
    doc: str
    fn: Callable[..., Iterable[Hit]]
    summary: str
    # Checks for files inside a LoRA dir run on every target kind; others only on LoRA kinds.
    needs_lora: bool = True
    # "target": run on each checked directory; "environment": run once on the installed
    # packages and machine by `llava-doctor env` / `check --env`, never per target.
    scope: str = TARGET
    # The run families the check applies to; the runner skips it on the others.
    families: frozenset[Family] = ORIGINAL
    # The severity for each consumer; `severity` is the one for the default consumer (llava).
    severities: Mapping[Consumer, Severity] = field(default_factory=dict)

    def severity_for(self, consumer: Consumer) -> Severity:
        """The check's severity when the findings are for `consumer`'s merge."""
        return self.severities.get(consumer, self.severity)

    def severities_text(self, sep: str = " / ") -> str:
        """"error / info / error": the severity for each consumer, in `Consumer` order."""
        return sep.join(self.severity_for(c).value for c in Consumer)

    def section(self, heading: str) -> str:
        """The text under one `## heading` of the doc."""
        m = re.search(rf"^## {re.escape(heading)}\s*\n(.*?)(?=^## |\Z)", self.doc, re.S | re.M)
        return m.group(1).strip() if m else ""


REGISTRY: dict[str, CheckSpec] = {}
_CODE = re.compile(r"^LD\d{3}$")
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def check(code: str, name: str, severity: Severities, *, fix: FixSafety = FixSafety.none,
          needs_lora: bool = True, scope: str = TARGET,
          families: Iterable[Family] = ORIGINAL) -> Callable[[AnyCheckFn], AnyCheckFn]:
    """Register a check. Its docstring is the doc (ruff's template).

    ``families``: the run families (original LLaVA, llava-hf) it applies to; the runner skips
    it on a run of another family, so a check never asks which family it is looking at.

    `severity` is one `Severity` (the same for every consumer) or one per `Consumer`: error
    when that consumer's merge fails or silently writes a wrong model, warning when it works
    but something is likely wrong, info when it is harmless to it.
    """
    severities = per_consumer(severity)

    def deco(fn: AnyCheckFn) -> AnyCheckFn:
        if not _CODE.match(code) or not _NAME.match(name):
            raise ValueError(f"bad check code/name {code} {name}")
        if code in REGISTRY:
            raise ValueError(f"duplicate check code {code}")
        doc = _dedent(fn.__doc__ or "")
        summary = doc.strip().splitlines()[0] if doc.strip() else name
        doc = doc.rstrip() + "\n\n" + severity_section(severities)
        REGISTRY[code] = CheckSpec(code=code, name=name, severity=severities[Consumer.llava],
                                   fix=fix, doc=doc, fn=fn, summary=summary,
                                   needs_lora=needs_lora, scope=scope,
                                   families=frozenset(families), severities=severities)
        return fn

    return deco


# (code, family) -> the function that runs the check on runs of that family, when the
# question is the same but the files that answer it differ (e.g. LD403 reads LLaVA's
# config.json on one family and the base's embeddings plus the adapter dir's tokenizer on the
# other).
VARIANTS: dict[tuple[str, Family], CheckFn] = {}


def variant(code: str, family: Family) -> Callable[[CheckFn], CheckFn]:
    """Register the implementation of an existing check for runs of ``family`` (same code, name,
    doc and severity); the check then applies to that family too."""

    def deco(fn: CheckFn) -> CheckFn:
        spec = REGISTRY.get(code)
        if spec is None:
            raise ValueError(f"variant of unknown check {code}")
        if (code, family) in VARIANTS:
            raise ValueError(f"duplicate variant {code} for {family.value}")
        VARIANTS[(code, family)] = fn
        REGISTRY[code] = replace(spec, families=spec.families | {family})
        return fn

    return deco


def check_fn(spec: CheckSpec, family: Family) -> Callable[..., Iterable[Hit]]:
    """The function that runs ``spec`` on a run of ``family``."""
    return VARIANTS.get((spec.code, family), spec.fn)


def severity_section(severities: Mapping[Consumer, Severity]) -> str:
    """The doc's generated `## Severity` section: the severity for each consumer."""
    rows = [f"- {c.value}: {severities[c].value} ({c.label})" for c in Consumer]
    return ("## Severity\nBy whose merge will run (`check --merge-with`; a finding says so "
            "when its own case differs):\n" + "\n".join(rows))


def _dedent(doc: str) -> str:
    import inspect

    return inspect.cleandoc(doc)


def all_checks() -> dict[str, CheckSpec]:
    """Every registered check, sorted by code (importing the check modules registers them)."""
    import llava_doctor.checks.catalog  # noqa: F401  (side effect: registration)

    return dict(sorted(REGISTRY.items()))


def get_check(code: str) -> CheckSpec | None:
    return all_checks().get(code.upper())


def codes_table_markdown() -> str:
    """The README's table of check codes, generated from the registry (a test keeps it in sync)."""
    who = " / ".join(c.value for c in Consumer)
    rows = [f"| code | name | severity for {who} | fix | runs | what it catches |",
            "|---|---|---|---|---|---|"]
    for spec in all_checks().values():
        summary = spec.summary.replace("|", "\\|")
        runs = ", ".join(f.value for f in Family if f in spec.families) \
            if spec.scope == TARGET else "env"
        rows.append(f"| {spec.code} | `{spec.name}` | {spec.severities_text()} | "
                    f"{spec.fix.value} | {runs} | {summary} |")
    return "\n".join(rows) + "\n"
