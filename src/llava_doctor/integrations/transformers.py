"""Run llava-doctor on every checkpoint a `transformers.Trainer` saves.

    from llava_doctor.integrations.transformers import DoctorCallback
    trainer.add_callback(DoctorCallback(stop_on_error=True))

After each save (`on_save`, main process only) the checks run on `OUTPUT_DIR/checkpoint-N`
(headers only unless ``values=True``), one summary line is logged, the JSON report (the same as
`llava-doctor check --format json`) is written into the checkpoint as
`llava-doctor-report.json`, and with ``stop_on_error=True`` an error stops the training
(`control.should_training_stop`). Works with LLaVA's `LLaVATrainer` and with TRL's `SFTTrainer`
(a plain peft adapter dir): both save `checkpoint-N` through `Trainer._save_checkpoint`.

Importing this module does not import transformers; `DoctorCallback` does, on first access.
`CheckpointDoctor` holds the logic and needs no transformers (for other training loops).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llava_doctor.models import Finding, Report

__all__ = ["DoctorCallback", "CheckpointDoctor", "CheckpointResult",  # noqa: F822 (lazy)
           "CHECKPOINT_EXPECTED", "REPORT_NAME"]

REPORT_NAME = "llava-doctor-report.json"
# What every Trainer checkpoint of a healthy run shows: LLaVA's train.py writes config.json and
# non_lora_trainables.bin only after training (LD101, LD104), the folder is named checkpoint-N
# (LD106), and a stage-1 or full fine-tune checkpoint is no LoRA dir (LD107). Reported in the
# JSON as `check` reports them, but never a reason to stop and not counted in the summary.
CHECKPOINT_EXPECTED = ("LD101", "LD104", "LD106", "LD107")

logger = logging.getLogger("llava_doctor")


@dataclass(frozen=True)
class CheckpointResult:
    """What the checks found in one checkpoint."""

    step: int
    path: Path
    report: Report
    seconds: float
    blocking: tuple[Finding, ...]   # errors that are not expected in a checkpoint
    summary: str
    report_path: Path | None


class CheckpointDoctor:
    """Checks one checkpoint dir at a time and remembers the results (no transformers needed).

    ``base`` / ``projector``: as `llava-doctor check --base/--projector` (default: what check
    finds; the base found at the first save is reused for the next ones). ``values``: also read
    tensor values (NaN/Inf, untrained adapter, projector distance): slower, proportional to the
    adapter's size. ``expected``: codes reported but never blocking. ``select`` / ``ignore``:
    codes or prefixes, as check's. ``report_name``: None writes no report file. ``log``: where
    the summary line goes (default: the `llava_doctor` logger, WARNING when something is found,
    else INFO). ``merge_with``: whose merge the severities are for, as `check --merge-with`
    (default "llava-doctor": what only LLaVA's own merge trips over, such as the base's
    generation config, does not stop a training run; pass "llava" to gate on LLaVA's merge).
    """

    def __init__(self, base: str | Path | None = None, projector: str | Path | None = None, *,
                 values: bool = False, stop_on_error: bool = False,
                 expected: Collection[str] = CHECKPOINT_EXPECTED,
                 select: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
                 peft_version: str | None = None, report_name: str | None = REPORT_NAME,
                 log: Callable[[str], None] | None = None,
                 merge_with: str = "llava-doctor") -> None:
        from llava_doctor.models import Consumer

        self.merge_with = Consumer(merge_with)
        self.base = Path(base) if base is not None else None
        self.projector = Path(projector) if projector is not None else None
        self.values = values
        self.stop_on_error = stop_on_error
        self.expected = frozenset(c.upper() for c in expected)
        self.select = list(select) if select is not None else None
        self.ignore = list(ignore) if ignore is not None else None
        self.peft_version = peft_version
        self.report_name = report_name
        self.log = log
        self.results: list[CheckpointResult] = []

    def check_checkpoint(self, path: str | Path, step: int = -1) -> CheckpointResult:
        """Run the checks on one checkpoint dir, write its report, log the summary line."""
        from llava_doctor.artifacts.installed import package_status
        from llava_doctor.checks.context import Options
        from llava_doctor.doctor import run_checks
        from llava_doctor.models import Severity
        from llava_doctor.report.json_ import render_json
        from llava_doctor.report.output import write_atomic

        t0 = time.perf_counter()
        path = Path(path)
        if self.peft_version is None:
            self.peft_version = package_status("peft").version
        opts = Options(base=self.base, projector=self.projector, peft_version=self.peft_version,
                       fast=not self.values, consumer=self.merge_with)
        report = run_checks([path], opts, select=self.select, ignore=self.ignore)
        self._remember_inputs(report)
        blocking = tuple(f for f in report.findings
                         if f.severity == Severity.error and f.code not in self.expected)
        report_path = None
        if self.report_name:
            report_path = path / self.report_name
            write_atomic(report_path, render_json(report))
        seconds = time.perf_counter() - t0
        summary = self._summary(path, report, blocking, seconds, report_path)
        result = CheckpointResult(step=step, path=path, report=report, seconds=seconds,
                                  blocking=blocking, summary=summary, report_path=report_path)
        self.results.append(result)
        noisy = any(f.code not in self.expected and f.severity != Severity.info
                    for f in report.findings)
        self._emit(summary, logging.WARNING if noisy else logging.INFO)
        return result

    def should_stop(self, result: CheckpointResult) -> bool:
        return self.stop_on_error and bool(result.blocking)

    def _remember_inputs(self, report: Report) -> None:
        # Resolving a hub-id base in the HF cache costs a scan of the cache: do it once.
        for target in report.targets:
            for inp in target.inputs:
                if inp.role == "base" and self.base is None and inp.path is not None:
                    self.base = Path(inp.path)

    def _summary(self, path: Path, report: Report, blocking: tuple[Finding, ...], seconds: float,
                 report_path: Path | None) -> str:
        from llava_doctor.models import Severity

        shown = [f for f in report.findings if f.code not in self.expected]
        errors = [f for f in shown if f.severity == Severity.error]
        warnings = [f for f in shown if f.severity == Severity.warning]

        def listing(fs: list[Finding]) -> str:
            codes = sorted({f.code for f in fs})
            return f" ({', '.join(codes)})" if codes else ""

        line = (f"llava-doctor: {path.name}: {len(errors)} error(s){listing(errors)}, "
                f"{len(warnings)} warning(s){listing(warnings)} in {seconds:.2f} s")
        expected = sorted({f.code for f in report.findings if f.code in self.expected})
        if expected:
            line += f"; expected in a Trainer checkpoint: {', '.join(expected)}"
        if report_path is not None:
            line += f"; report: {report_path}"
        if self.stop_on_error and blocking:
            line += "; stopping the training (stop_on_error)"
        return line

    def _emit(self, line: str, level: int) -> None:
        if self.log is not None:
            self.log(line)
        else:
            logger.log(level, line)


def _checkpoint_dir(args: Any, state: Any) -> Path:
    # Trainer._save_checkpoint writes f"{PREFIX_CHECKPOINT_DIR}-{global_step}" in output_dir.
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def _build_callback() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # transformers is the training's dependency, not llava-doctor's
        raise ImportError("DoctorCallback is a transformers.TrainerCallback: install "
                          "transformers in the training environment") from e

    class DoctorCallback(TrainerCallback):  # type: ignore[misc]
        """A `transformers.TrainerCallback` running llava-doctor on each saved checkpoint.

        Takes `CheckpointDoctor`'s arguments (``base``, ``projector``, ``values``,
        ``stop_on_error``, ``expected``, ``select``, ``ignore``, ``peft_version``,
        ``report_name``, ``log``, ``merge_with``); the results are in ``callback.results``. A
        failure of the check itself is logged and never interrupts the training.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.doctor = CheckpointDoctor(*args, **kwargs)

        @property
        def results(self) -> list[CheckpointResult]:
            return self.doctor.results

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if not state.is_world_process_zero:
                return control
            ckpt = _checkpoint_dir(args, state)
            if not ckpt.is_dir():
                self.doctor._emit(f"llava-doctor: no {ckpt} after the save: nothing checked",
                                  logging.WARNING)
                return control
            try:
                result = self.doctor.check_checkpoint(ckpt, state.global_step)
            except Exception as e:  # the training matters more than its check
                self.doctor._emit(f"llava-doctor: could not check {ckpt}: "
                                  f"{type(e).__name__}: {e}", logging.WARNING)
                return control
            if self.doctor.should_stop(result):
                control.should_training_stop = True
            return control

    DoctorCallback.__module__ = __name__
    DoctorCallback.__qualname__ = "DoctorCallback"
    return DoctorCallback


_cache: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "DoctorCallback":
        if name not in _cache:
            _cache[name] = _build_callback()
        return _cache[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
