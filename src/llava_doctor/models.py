"""Frozen result models: what a check run produces and what renderers consume."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from llava_doctor import __version__

# Bumped on any breaking change to the JSON report (a test pins the JSON Schema).
SCHEMA_VERSION = "1.3"


class Severity(str, Enum):
    error = "error"
    warning = "warning"
    info = "info"

    @property
    def rank(self) -> int:
        return {"error": 3, "warning": 2, "info": 1}[self.value]


class Consumer(str, Enum):
    """Whose merge the severities are for: a finding is an error when that merge fails or
    silently writes a wrong model, a warning when it works but something is likely wrong, info
    when it is harmless to it."""

    llava = "llava"                 # haotian-liu/LLaVA's builder + merge_lora_weights.py
    llava_doctor = "llava-doctor"   # `llava-doctor merge`
    peft = "peft"                   # peft's PeftModel + merge_and_unload on transformers' class

    @property
    def label(self) -> str:
        """What the renderers print after "severities for:"."""
        return {
            "llava": "LLaVA's merge_lora_weights.py (transformers 4.37.2)",
            "llava-doctor": "llava-doctor merge",
            "peft": "peft's merge_and_unload (PeftModel on the transformers model class)",
        }[self.value]


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
    family: str | None = Field(default=None, description="llava (haotian-liu/LLaVA) | llava-hf "
                               "(transformers' Llava*ForConditionalGeneration), from the files; "
                               "None when the target is not a LoRA run")
    consumer: Consumer = Field(default=Consumer.llava,
                               description="The merge this target's severities are for")
    inputs: list[ResolvedInput] = Field(default_factory=list)
    checks: list[CheckOutcome] = Field(default_factory=list)


class PackageStatus(_Frozen):
    """One installed distribution, read from its metadata (nothing is imported)."""

    name: str
    version: str | None = Field(description="None when it is not installed")
    location: str | None = Field(default=None, description="Where its files are")
    source: str = Field(default="metadata", description="metadata | --peft-version | "
                                                        "--transformers-version | import path")
    installed: str | None = Field(default=None, description="The installed version, when "
                                  "--peft-version / --transformers-version stands for it")


class TorchBuild(_Frozen):
    """torch's version and build, from its metadata and `torch/version.py` read as text."""

    version: str | None
    cuda: str | None = None
    hip: str | None = None
    build: str = Field(description="cpu | cuda X.Y | rocm X.Y | unknown | not installed")


class Gpu(_Frozen):
    index: int
    name: str
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None


class GpuQuery(_Frozen):
    """The visible GPUs, or why they are unknown."""

    method: str = Field(description="nvidia-smi | torch | none")
    gpus: list[Gpu] | None = Field(default=None, description="None when the query did not run "
                                                             "or failed")
    error: str | None = None


class LlavaImport(_Frozen):
    """Whether `from llava.model import LlavaLlamaForCausalLM` works, tried in a subprocess."""

    location: str | None = Field(description="The llava package directory; None when absent")
    ok: bool | None = Field(default=None, description="None when not tried or timed out")
    error: str | None = None
    real_error: str | None = Field(default=None, description="The exception that llava/model/"
                                   "__init__.py swallowed, from importing the module directly")
    seconds: float | None = None


class DiskSpace(_Frozen):
    path: str
    free_bytes: int
    total_bytes: int


class RunVersions(_Frozen):
    """What one RUN's artifacts were written with."""

    path: str
    kind: str
    transformers_version: str | None = Field(description="config.json's transformers_version")
    peft_version: str | None = Field(description="adapter_config.json's peft_version")
    key_layout: str | None = Field(description="The adapter's key layout, from its header")
    quantization: str | None = Field(default=None, description="A bitsandbytes "
                                     "quantization_config in the run's or the base's config")


def count_by_severity(findings: Iterable[Finding]) -> dict[str, int]:
    """Findings per severity, every severity present (0 when none): the reports' `counts`."""
    out = {s.value: 0 for s in Severity}
    for f in findings:
        out[f.severity.value] += 1
    return out


class EnvReport(_Frozen):
    """`llava-doctor env`: the environment a merge would run in, and what the runs need."""

    schema_version: str = SCHEMA_VERSION
    tool: str = "llava-doctor"
    tool_version: str = __version__
    python: str
    python_executable: str
    platform: str
    packages: list[PackageStatus] = Field(default_factory=list)
    torch: TorchBuild
    gpus: GpuQuery
    llava: LlavaImport
    ram_total_bytes: int | None = None
    ram_available_bytes: int | None = None
    disks: list[DiskSpace] = Field(default_factory=list)
    runs: list[RunVersions] = Field(default_factory=list)
    consumer: Consumer = Field(default=Consumer.llava, description="Whose merge the "
                               "environment findings' severities are for (`--merge-with`)")
    checks: list[CheckOutcome] = Field(default_factory=list, description="What each environment "
                                       "check (LD9xx) did")
    findings: list[Finding] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def counts(self) -> dict[str, int]:
        return count_by_severity(self.findings)

    def package(self, name: str) -> PackageStatus | None:
        return next((p for p in self.packages if p.name == name), None)

    def exit_code(self, fail_on: Severity = Severity.error) -> int:
        """0 when no finding is at or above ``fail_on``, else 1 (as `check`)."""
        return 1 if any(f.severity.rank >= fail_on.rank for f in self.findings) else 0


class Report(_Frozen):
    schema_version: str = SCHEMA_VERSION
    tool: str = "llava-doctor"
    tool_version: str = __version__
    consumer: Consumer | None = Field(
        default=Consumer.llava,
        description="The merge the severities are for (`check --merge-with`, else each target's "
                    "default: llava for original-LLaVA runs); null when targets with different "
                    "defaults were checked together, and then each target says its own")
    targets: list[TargetResult] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    env: EnvReport | None = Field(default=None, description="The environment section "
                                  "(`check --env`); its findings count for the exit code")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def counts(self) -> dict[str, int]:
        return count_by_severity(self.findings)

    def consumer_label(self) -> str:
        """"severities for: ..." text, the same in every renderer."""
        if self.consumer is not None:
            return self.consumer.label
        return "each target's own consumer (" + ", ".join(
            sorted({t.consumer.value for t in self.targets})) + ")"

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=None)

    def exit_code(self, fail_on: Severity = Severity.error) -> int:
        """0 when no finding (the environment's included) is at or above ``fail_on``, else 1."""
        if self.env is not None and self.env.exit_code(fail_on):
            return 1
        return 1 if any(f.severity.rank >= fail_on.rank for f in self.findings) else 0
