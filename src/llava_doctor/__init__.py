"""llava-doctor: diagnose, repair and merge LLaVA LoRA runs without executing a pickle.

The Python API returns the same frozen models the JSON output serialises::

    import llava_doctor

    report = llava_doctor.check("checkpoints/llava-v1.5-7b-lora", base="vicuna-7b-v1.5")
    report.exit_code()                 # 0 clean, 1 errors (as the CLI)
    for f in report.findings:          # llava_doctor.models.Finding
        print(f.code, f.severity.value, f.message)
    report.model_dump_json()           # == `llava-doctor check --format json`

    env = llava_doctor.env(["checkpoints/llava-v1.5-7b-lora"])     # `llava-doctor env`
    result = llava_doctor.merge("checkpoints/llava-v1.5-7b-lora", base="vicuna-7b-v1.5",
                                out="llava-v1.5-7b-merged")        # `llava-doctor merge`

Importing the package is cheap: the work (and pydantic, torch) is imported on first use, and
transformers never is (`llava_doctor.integrations.transformers` imports it when used).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llava_doctor.models import EnvReport, Report

__version__ = "0.1.0"

__all__ = ["__version__", "check", "env", "merge"]

PathLike = str | Path


def check(path: PathLike | Sequence[PathLike], base: PathLike | None = None,
          projector: PathLike | None = None, *, peft_version: str | None = None,
          transformers_version: str | None = None, merge_with: str | None = None,
          fast: bool = False, scan_base: bool = False, out: PathLike | None = None,
          select: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
          env: bool = False, to: str | None = None, vision_tower: PathLike | None = None,
          jobs: int = 1) -> Report:
    """Check LoRA output dirs or checkpoint-N dirs; `llava-doctor check` as a function.

    ``path``: one directory or a list (globs expanded, a file stands for its directory).
    ``base`` / ``projector``: as ``--base`` / ``--projector`` (default: found as the CLI finds
    them). ``peft_version`` / ``transformers_version``: the stack that will run the merge
    (default: the installed ones, from metadata). ``merge_with``: whose merge the severities are
    for, ``"llava"``, ``"llava-doctor"`` or ``"peft"`` (default: LLaVA's own merge for
    original-LLaVA runs, peft's for llava-hf runs), as ``--merge-with``.
    ``fast``: headers only. ``out``: the planned merge output (disk-space
    preflight). ``select`` / ``ignore``: codes or prefixes. ``env``: add the environment section
    (``Report.env``). ``to="llava-hf"`` / ``vision_tower``: as ``--to`` / ``--vision-tower``
    (what a conversion to llava-hf needs, LD8xx). Configuration files are not read. Raises
    ``llava_doctor.errors.UsageError`` when a path does not exist; everything found in the files
    is a finding, not an exception.
    """
    from llava_doctor.artifacts.installed import package_status
    from llava_doctor.checks.context import Options
    from llava_doctor.doctor import collect_targets, run_checks
    from llava_doctor.models import Consumer

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    targets = collect_targets(paths)
    opts = Options(base=Path(base) if base is not None else None,
                   projector=Path(projector) if projector is not None else None,
                   peft_version=peft_version or package_status("peft").version,
                   transformers_version=(transformers_version
                                         or package_status("transformers").version),
                   consumer=Consumer(merge_with) if merge_with is not None else None, fast=fast,
                   scan_base=scan_base, out=Path(out) if out is not None else None,
                   to=to if to == "llava-hf" else None,
                   vision_tower=Path(vision_tower) if vision_tower is not None else None)
    report = run_checks(targets, opts, select=select, ignore=ignore, jobs=jobs)
    if env:
        from llava_doctor.envinfo import EnvOptions, env_consumer, gather

        report = report.model_copy(update={"env": gather(targets, EnvOptions(
            peft_version=peft_version, base=opts.base, run_target_checks=False,
            consumer=env_consumer(report)))})
    return report


def env(runs: PathLike | Sequence[PathLike] = (), *, peft_version: str | None = None,
        transformers_version: str | None = None, base: PathLike | None = None,
        gpu: str = "auto", timeout: float = 60.0, python: str | None = None,
        merge_with: str | None = None) -> EnvReport:
    """`llava-doctor env` as a function: what is installed, and what each RUN was written with.

    ``gpu``: ``auto`` | ``nvidia-smi`` | ``torch`` | ``none``; ``timeout``: seconds each child
    probe (llava import, GPU query) may take; ``python``: inspect that interpreter's
    environment (e.g. the training env's) instead of this one; ``merge_with``: whose merge the
    severities are for, as ``--merge-with`` (default: LLaVA's own).
    """
    from llava_doctor.doctor import collect_targets
    from llava_doctor.envinfo import EnvOptions, gather
    from llava_doctor.models import Consumer

    paths = [runs] if isinstance(runs, (str, Path)) else list(runs)
    return gather(collect_targets(paths) if paths else [], EnvOptions(
        peft_version=peft_version, transformers_version=transformers_version,
        base=Path(base) if base is not None else None, gpu=gpu, timeout=timeout, python=python,
        consumer=Consumer(merge_with) if merge_with is not None else None))


def __getattr__(name: str) -> Any:
    # `llava_doctor.merge(...)`: the `merge` subpackage is itself callable (it calls
    # `llava_doctor.merge.merge`). A plain function named `merge` here would be replaced by the
    # subpackage the moment anything imports `llava_doctor.merge.<module>`.
    if name == "merge":
        import importlib

        return importlib.import_module("llava_doctor.merge")
    raise AttributeError(f"module 'llava_doctor' has no attribute {name!r}")
