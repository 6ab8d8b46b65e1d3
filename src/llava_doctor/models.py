"""Frozen result models: what a check run produces and what renderers consume."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from llava_doctor import __version__

# Bumped on any breaking change to the JSON report (a test pins the JSON Schema).
SCHEMA_VERSION = "1.1"


class Severity(str, Enum):
    error = "error"
    warning = "warning"
    info = "info"

    @property
    def rank(self) -> int:
        return {"error": 3, "warning": 2, "info": 1}[self.value]


class FixSafety(str, Enum):
    """How a finding can be repaired by `llava-doctor fix` (ruff's applicability ladder)."""

    safe = "safe"
    unsafe = "unsafe"
    none = "none"


class CheckStatus(str, Enum):
    passed = "passed"
    failed = "failed"
    skipped = "skipped"
    crashed = "crashed"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Finding(_Frozen):
    """One problem found in one target."""

    code: str = Field(description="Stable finding code, e.g. LD101")
    name: str = Field(description="Kebab-case name of the check")
    severity: Severity
    message: str = Field(
        description="One paragraph naming the file, expected vs actual, the remedy")
    path: str | None = Field(default=None, description="The file or directory the finding is about")
    target: str = Field(description="The checked directory this finding belongs to")
    evidence: dict[str, Any] = Field(default_factory=dict)
    fix: FixSafety = FixSafety.none


class CheckOutcome(_Frozen):
    """What one check did on one target (JUnit renders one testcase per outcome)."""

    code: str
    name: str
    status: CheckStatus
    reason: str | None = None


class ResolvedInput(_Frozen):
    """A model or file the checks used that the user may not have named (the base, the stage-1
    projector): where it was found, so the report says which file was used."""

    role: str = Field(description="base | projector")
    path: str | None = Field(description="None when nothing was found")
    source: str = Field(description="--base, --projector, adapter_config.json, hf-cache, "
                                    "sibling *-pretrain, ambiguous, none")


class TargetResult(_Frozen):
    path: str
    kind: str = Field(description="Directory classification from its files")
    inputs: list[ResolvedInput] = Field(default_factory=list)
    checks: list[CheckOutcome] = Field(default_factory=list)


class Report(_Frozen):
    schema_version: str = SCHEMA_VERSION
    tool: str = "llava-doctor"
    tool_version: str = __version__
    targets: list[TargetResult] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Severity}
        for f in self.findings:
            out[f.severity.value] += 1
        return out

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=None)

    def exit_code(self, fail_on: Severity = Severity.error) -> int:
        """0 when no finding is at or above ``fail_on``, else 1."""
        return 1 if any(f.severity.rank >= fail_on.rank for f in self.findings) else 0
