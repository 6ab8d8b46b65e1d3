"""The library entry point for `env`: what is installed, what the runs were written with, and
the LD9xx findings (plus the target checks that depend on versions, run on each RUN).

Nothing that could fail or take seconds is imported here: versions come from package metadata,
torch's build from `torch/version.py` read as text, the llava import and the GPU query from
child processes with a timeout (`artifacts.probes`).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llava_doctor.artifacts import installed, probes
from llava_doctor.checks.base import ENVIRONMENT, all_checks
from llava_doctor.checks.context import Context, Options
from llava_doctor.errors import UsageError
from llava_doctor.models import (
    CheckOutcome,
    CheckStatus,
    Consumer,
    DiskSpace,
    EnvReport,
    Finding,
    FixSafety,
    GpuQuery,
    LlavaImport,
    PackageStatus,
    Report,
    RunVersions,
    Severity,
    TargetResult,
    TorchBuild,
)

ENV_TARGET = "environment"
# Target checks whose verdict depends on the installed versions or the machine, run on each RUN
# by `env` with the environment's versions: peft fields (LD201), QLoRA config (LD208), RAM for
# LLaVA's whole-model merge (LD602), the llava-hf key layout against transformers (LD701).
RUN_CODES = ("LD201", "LD208", "LD602", "LD701")
GPU_METHODS = ("auto", "nvidia-smi", "torch", "none")

# Adapter key prefixes of the three layouts (cheap detection; the llava-hf key-layout module
# is the authority where it exists).
def adapter_key_layout(keys: Iterable[str]) -> str | None:
    """The layout an adapter's keys were saved in: `llava-hf>=4.52` (transformers >= 4.52
    runtime names, `base_model.model.model.language_model.*`), `llava-hf<4.52`
    (`base_model.model.language_model.model.*`), `llama` (original LLaVA or a plain LLM,
    `base_model.model.model.layers.*`), `unknown`; None without keys. The llava-hf layouts come
    from `artifacts.hf_layout` (the one table of them)."""
    from llava_doctor.artifacts import hf_layout

    keys = list(keys)
    if not keys:
        return None
    lay = hf_layout.detect_adapter_layout(keys)
    if lay is not None:
        return "llava-hf<4.52" if lay == hf_layout.Layout.canonical else "llava-hf>=4.52"
    if any(k.startswith(hf_layout.PEFT_PREFIX + "model.layers.") for k in keys):
        return "llama"
    return "unknown"


@dataclass(frozen=True)
class EnvOptions:
    """What `env` was told. `path` is the import path to inspect (default `sys.path`)."""

    peft_version: str | None = None
    transformers_version: str | None = None
    base: Path | None = None
    gpu: str = "auto"
    timeout: float = 60.0
    path: tuple[str, ...] | None = None
    run_target_checks: bool = True   # False under `check --env` (check runs them itself)
    select: tuple[str, ...] | None = None   # codes or prefixes, as check's --select / --ignore
    ignore: tuple[str, ...] = ()
    python: str | None = None   # inspect this interpreter's environment instead of this one's
    consumer: Consumer | None = None  # whose merge the severities are for (None: LLaVA's)


@dataclass
class EnvContext:
    """What the LD9xx checks look at."""

    facts: EnvReport
    options: EnvOptions = field(default_factory=EnvOptions)
    path: list[str] | None = None   # the import path inspected (None: sys.path)

    def version(self, name: str) -> str | None:
        """The version that counts for `name`: the override, else the installed one."""
        if name == "peft" and self.options.peft_version:
            return self.options.peft_version
        if name == "transformers" and self.options.transformers_version:
            return self.options.transformers_version
        pkg = self.facts.package(name)
        if pkg is not None:
            return pkg.version
        return installed.package_status(name, self.path).version

    def package_location(self, name: str) -> str | None:
        pkg = self.facts.package(name)
        return pkg.location if pkg is not None else None

    @property
    def cuda_visible_devices(self) -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")


def _packages(opts: EnvOptions, path: Sequence[str]) -> list[PackageStatus]:
    out = []
    for name in installed.PACKAGES:
        pkg = installed.package_status(name, path)
        override = {"peft": opts.peft_version,
                    "transformers": opts.transformers_version}.get(name)
        if override:
            pkg = pkg.model_copy(update={"version": override, "installed": pkg.version,
                                         "source": f"--{name}-version"})
        elif name == "llava" and pkg.version is None:
            where = installed.module_location("llava", path)
            if where is not None:  # a LLaVA checkout on the path, without metadata
                pkg = PackageStatus(name=name, version=None, location=where, source="import path")
        out.append(pkg)
    return out


def _quantization(ctx: Context) -> str | None:
    """A bitsandbytes quantization_config in the run's config.json or the base's."""
    for cfg in (ctx.config, ctx.base_config):
        q = cfg.raw().get("quantization_config") if cfg is not None else None
        if not isinstance(q, dict):
            continue
        method = q.get("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            continue
        bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else ""
        return f"bitsandbytes {bits}".strip()
    return None


def run_versions(path: Path, options: Options) -> RunVersions:
    """What one RUN's artifacts were written with (configs and adapter header only)."""
    ctx = Context(path=path, options=options)
    cfg = ctx.config.raw() if ctx.config is not None else {}
    acfg = ctx.adapter_config_raw or {}
    adapter = ctx.adapter
    tv, pv = cfg.get("transformers_version"), acfg.get("peft_version")
    return RunVersions(path=str(path), kind=ctx.kind.value,
                       transformers_version=str(tv) if tv is not None else None,
                       peft_version=str(pv) if pv is not None else None,
                       key_layout=adapter_key_layout(adapter.tensors) if adapter else None,
                       quantization=_quantization(ctx))


def _disks(runs: Sequence[Path]) -> list[DiskSpace]:
    out, seen = [], set()
    for p in [Path.cwd(), *runs]:
        where = p.absolute()
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            dev = where.stat().st_dev
            usage = shutil.disk_usage(where)
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        out.append(DiskSpace(path=str(where), free_bytes=usage.free, total_bytes=usage.total))
    return out


def target_options(opts: EnvOptions, installed_peft: str | None,
                   installed_transformers: str | None) -> Options:
    """The `check` options that stand for this environment (headers only)."""
    kw: dict[str, Any] = {"base": opts.base, "fast": True,
                          "peft_version": opts.peft_version or installed_peft,
                          "consumer": opts.consumer}
    # Options.transformers_version is added with the llava-hf family (LD701); pass it on when
    # this version of Options has it.
    if "transformers_version" in {f.name for f in fields(Options)}:
        kw["transformers_version"] = opts.transformers_version or installed_transformers
    return Options(**kw)


def _wanted(code: str, opts: EnvOptions) -> bool:
    sel = [s.upper() for s in opts.select] if opts.select is not None else None
    if sel is not None and not any(code.startswith(s) for s in sel):
        return False
    return not any(code.startswith(i.upper()) for i in opts.ignore)


def run_env_checks(ctx: EnvContext) -> tuple[list[Finding], list[CheckOutcome]]:
    """Every registered environment check on `ctx`; a crash is an LD000 finding, as in check."""
    from llava_doctor.checks.base import Skip

    checks = all_checks()
    out: list[Finding] = []
    outcomes: list[CheckOutcome] = []
    for code, spec in checks.items():
        if spec.scope != ENVIRONMENT or not _wanted(code, ctx.options):
            continue
        try:
            hits = list(spec.fn(ctx))
        except Skip as s:
            outcomes.append(CheckOutcome(code=code, name=spec.name, status=CheckStatus.skipped,
                                         reason=s.reason))
            continue
        except Exception as e:  # a bug in a check: report it, keep going
            tb = traceback.extract_tb(e.__traceback__)[-1]
            internal = checks["LD000"]
            out.append(Finding(
                code=internal.code, name=internal.name, severity=Severity.error,
                message=f"check {code} ({spec.name}) crashed on the environment: "
                        f"{type(e).__name__}: {e}; the other checks still ran. Please report "
                        "this with the output of `llava-doctor env --format json`",
                path=None, target=ENV_TARGET,
                evidence={"check": code, "exception": type(e).__name__,
                          "where": f"{Path(tb.filename).name}:{tb.lineno}"},
                fix=FixSafety.none))
            outcomes.append(CheckOutcome(code=code, name=spec.name, status=CheckStatus.crashed,
                                         reason=f"{type(e).__name__}: {e}"))
            continue
        outcomes.append(CheckOutcome(code=code, name=spec.name,
                                     status=CheckStatus.failed if hits else CheckStatus.passed))
        for h in hits:
            target = str(h.evidence.get("run", ENV_TARGET))
            sev = h.severity_for(ctx.facts.consumer) or spec.severity_for(ctx.facts.consumer)
            out.append(Finding(code=code, name=spec.name, severity=sev,
                               message=h.message,
                               path=str(h.path) if h.path is not None else None,
                               target=target, evidence=h.evidence, fix=h.fix or spec.fix))
    return out, outcomes


def env_consumer(report: Report) -> Consumer:
    """Whose merge `check --env` judges the environment for: the report's (`--merge-with`, else
    the default all its targets share: peft for llava-hf runs), else LLaVA's own (targets with
    different defaults checked together)."""
    return report.consumer or Consumer.llava


def fold_into_targets(report: Report) -> Report:
    """`report` with its environment section as one more target, "environment" (its findings
    and check outcomes), for the formats that know only targets (SARIF, JUnit, GitHub,
    markdown)."""
    env = report.env
    if env is None:
        return report
    target = TargetResult(path=ENV_TARGET, kind=ENV_TARGET, checks=env.checks)
    moved = [f if f.target == ENV_TARGET else f.model_copy(update={"target": ENV_TARGET})
             for f in env.findings]
    return report.model_copy(update={"targets": [*report.targets, target],
                                     "findings": [*report.findings, *moved]})


def gather(runs: Sequence[Path | str] = (), options: EnvOptions | None = None) -> EnvReport:
    """Inspect the environment (and what each RUN was written with); one frozen report.

    Takes about as long as the llava import and GPU probes (child processes, each bounded by
    ``options.timeout``); milliseconds when llava is absent and torch is a CPU build.
    """
    opts = options or EnvOptions()
    version, exe = platform.python_version(), sys.executable
    path = list(opts.path if opts.path is not None else sys.path)
    if opts.python is not None:
        try:
            child_path, version, exe = probes.interpreter_info(opts.python, opts.timeout)
        except probes.ProbeFailed as e:
            raise UsageError(f"cannot run --python {opts.python}: {e}",
                             hint="pass the python executable of the environment to inspect, "
                                  "e.g. /opt/conda/envs/llava/bin/python") from None
        if opts.path is None:
            path = child_path
    run_paths = [Path(r) for r in runs]
    packages = _packages(opts, path)
    torch: TorchBuild = installed.torch_build(path)
    gpus: GpuQuery = probes.query_gpus(opts.gpu, torch.build, path, opts.timeout, opts.python)
    llava_pkg = next(p for p in packages if p.name == "llava")
    llava_loc = installed.module_location("llava", path)
    llava: LlavaImport = probes.probe_llava(llava_loc or llava_pkg.location, path, opts.timeout,
                                            opts.python)
    from llava_doctor.checks.preflight import memory_info

    total, avail = memory_info()
    versions = {p.name: p.version for p in packages}
    topts = target_options(opts, versions.get("peft"), versions.get("transformers"))
    facts = EnvReport(
        python=version, python_executable=exe,
        platform=platform.platform(), packages=packages, torch=torch, gpus=gpus, llava=llava,
        ram_total_bytes=total, ram_available_bytes=avail, disks=_disks(run_paths),
        runs=[run_versions(p, topts) for p in run_paths],
        consumer=opts.consumer or Consumer.llava)
    findings, outcomes = run_env_checks(EnvContext(facts=facts, options=opts, path=path))
    if opts.run_target_checks and run_paths:
        from llava_doctor.doctor import run_checks

        codes = [c for c in RUN_CODES if _wanted(c, opts)]
        if codes:
            findings += run_checks(run_paths, topts, select=codes).findings
    return facts.model_copy(update={"findings": findings, "checks": outcomes})
