"""The `env` command (thin typer layer over `llava_doctor.envinfo.gather`)."""

# No `from __future__ import annotations`: typer reads the option aliases imported inside
# `register` from the evaluated signature.
import sys
from pathlib import Path
from typing import Annotated

import typer

TransformersOpt = Annotated[str | None, typer.Option(
    "--transformers-version", help="The transformers version that will load the runs "
                                   "(default: installed transformers).")]
GpuOpt = Annotated[str, typer.Option(
    "--gpu", help="How to list GPUs: auto (nvidia-smi if on PATH, else torch in a child process "
                  "for a CUDA/ROCm build), nvidia-smi, torch, none.")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=1, help="Seconds each probe (llava import, GPU query) may take.")]


def register(app: typer.Typer) -> None:
    """Add `llava-doctor env` to the app."""
    from llava_doctor.cli import (
        BaseOpt,
        IgnoreOpt,
        MergeWithOpt,
        PeftOpt,
        SelectOpt,
        _codes,
        _color,
        _fail,
    )

    @app.command("env")
    def env(
        runs: Annotated[list[Path] | None, typer.Argument(
            metavar="RUN", help="LoRA output dirs or checkpoint-N dirs to compare with "
                                     "this environment.")] = None,
        fmt: Annotated[str, typer.Option("--format", help="text | json")] = "text",
        peft_version: PeftOpt = None,
        transformers_version: TransformersOpt = None,
        base: BaseOpt = None,
        merge_with: MergeWithOpt = None,
        gpu: GpuOpt = "auto",
        timeout: TimeoutOpt = 60.0,
        select: SelectOpt = None,
        ignore: IgnoreOpt = None,
        python: Annotated[str | None, typer.Option(
            "--python", metavar="PY", help="Inspect the environment of this Python interpreter "
                                           "(e.g. the training env's) instead of llava-doctor's "
                                           "own.")] = None,
        strict: Annotated[bool, typer.Option("--strict", help="Warnings fail too.")] = False,
        exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even with findings "
                                                "(usage errors still exit 2).")] = False,
    ) -> None:
        """What a merge would run with here: python, torch (build, GPUs), transformers, peft,
        safetensors, accelerate, bitsandbytes, llava (and whether it imports), RAM, disk; and
        for each RUN what it was written with. Exit 0 clean, 1 findings, 2 usage error."""
        from llava_doctor.doctor import collect_targets
        from llava_doctor.envinfo import GPU_METHODS, EnvOptions, gather
        from llava_doctor.errors import DoctorError, UsageError
        from llava_doctor.models import Severity
        from llava_doctor.report.env_text import render_env_text

        try:
            if fmt not in ("text", "json"):
                raise UsageError(f"unknown --format '{fmt}'", hint="choose text or json")
            if gpu not in GPU_METHODS:
                raise UsageError(f"unknown --gpu '{gpu}'",
                                 hint=f"choose one of: {', '.join(GPU_METHODS)}")
            sel, ign = _codes(select, "--select"), _codes(ignore, "--ignore")
            targets = collect_targets(runs) if runs else []
            report = gather(targets, EnvOptions(
                peft_version=peft_version, transformers_version=transformers_version,
                base=base, gpu=gpu, timeout=timeout, select=tuple(sel) if sel else None,
                ignore=tuple(ign or ()), python=python, consumer=merge_with))
        except DoctorError as e:
            raise _fail(e) from None
        if fmt == "json":
            sys.stdout.write(report.model_dump_json(indent=2) + "\n")
        else:
            sys.stdout.write(render_env_text(report, color=_color()))
        if exit_zero:
            raise typer.Exit(0)
        raise typer.Exit(report.exit_code(Severity.warning if strict else Severity.error))
