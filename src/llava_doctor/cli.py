"""Thin typer layer: parse, call one library function, render, pick the exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llava_doctor import __version__
from llava_doctor.errors import DoctorError, UsageError
from llava_doctor.models import Severity

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Diagnose, repair and merge LLaVA LoRA runs without executing a pickle.")

# Options declared once, reused by every command.
BaseOpt = Annotated[Optional[Path], typer.Option("--base", help="The base model the LoRA was "
                                                 "trained on (default: adapter_config.json's "
                                                 "base_model_name_or_path if local or cached).")]
ProjectorOpt = Annotated[Optional[Path], typer.Option("--projector", help="Stage-1 "
                                                      "mm_projector.bin (default: a sibling "
                                                      "*-pretrain/mm_projector.bin).")]
PeftOpt = Annotated[Optional[str], typer.Option("--peft-version", help="The peft version that "
                                                "will load the adapter (default: installed peft).")]
SelectOpt = Annotated[Optional[list[str]], typer.Option("--select", help="Only these codes or "
                                                        "prefixes (repeatable).")]
IgnoreOpt = Annotated[Optional[list[str]], typer.Option("--ignore", help="Skip these codes or "
                                                        "prefixes (repeatable).")]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _fail(err: DoctorError) -> typer.Exit:
    _stderr(f"llava-doctor: error: {err.one_line()}")
    return typer.Exit(err.exit_code)


def _color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _installed_peft() -> str | None:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return None


def version_callback(value: bool) -> None:
    if value:
        print(f"llava-doctor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=version_callback,
                                                is_eager=True, help="Show the version.")] = False
          ) -> None:
    pass


@app.command()
def check(
    paths: Annotated[list[Path], typer.Argument(help="LoRA output dirs or checkpoint-N dirs.")],
    base: BaseOpt = None,
    projector: ProjectorOpt = None,
    peft_version: PeftOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="text | json")] = "text",
    strict: Annotated[bool, typer.Option("--strict", help="Warnings fail the run too.")] = False,
    fast: Annotated[bool, typer.Option("--fast", help="Headers only: read no tensor values.")
                    ] = False,
    scan_base: Annotated[bool, typer.Option("--scan-base", help="Also read base tensor values.")
                         ] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Planned merge output dir "
                                                "(enables the disk-space preflight).")] = None,
    select: SelectOpt = None,
    ignore: IgnoreOpt = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="List skipped checks.")
                       ] = False,
) -> None:
    """Diagnose a LoRA run before the merge. Exit 0 clean, 1 findings, 2 usage error."""
    from llava_doctor.checks.context import Options
    from llava_doctor.doctor import run_checks
    from llava_doctor.report import RENDERERS

    if fmt not in RENDERERS:
        raise _fail(UsageError(f"unknown --format '{fmt}'",
                               hint=f"choose one of: {', '.join(RENDERERS)}"))
    for p in paths:
        if not p.exists():
            raise _fail(UsageError("does not exist: nothing to check", path=p,
                                   hint="pass the LoRA output directory"))
    opts = Options(base=base, projector=projector,
                   peft_version=peft_version or _installed_peft(), fast=fast,
                   scan_base=scan_base, out=out)
    try:
        report = run_checks(paths, opts, select=select, ignore=ignore)
    except DoctorError as e:
        raise _fail(e) from None
    sys.stdout.write(RENDERERS[fmt](report, color=_color(), verbose=verbose))
    raise typer.Exit(report.exit_code(Severity.warning if strict else Severity.error))


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A weight file or a directory.")],
    fmt: Annotated[str, typer.Option("--format", help="text | json")] = "text",
    all_rows: Annotated[bool, typer.Option("--all", help="List every tensor.")] = False,
) -> None:
    """List tensors (name, dtype, shape, bytes), totals, file format and dir classification."""
    from llava_doctor.inspect_ import inspect_path, render_inspect_text

    try:
        rep = inspect_path(path)
    except DoctorError as e:
        raise _fail(e) from None
    if fmt == "json":
        sys.stdout.write(rep.model_dump_json(indent=2) + "\n")
    elif fmt == "text":
        sys.stdout.write(render_inspect_text(rep, max_rows=10**9 if all_rows else 50))
    else:
        raise _fail(UsageError(f"unknown --format '{fmt}'", hint="choose text or json"))
    raise typer.Exit(1 if any(f.error for f in rep.files) else 0)


@app.command()
def explain(
    code: Annotated[Optional[str], typer.Argument(help="A finding code, e.g. LD101.")] = None,
    all_codes: Annotated[bool, typer.Option("--all", help="List every code.")] = False,
) -> None:
    """Print a check's documentation (What it does / Why is this bad / Example / Fix)."""
    from llava_doctor.checks.base import all_checks

    checks = all_checks()
    if all_codes or code is None:
        for spec in checks.values():
            print(f"{spec.code}  {spec.name:<34} {spec.severity.value:<8} fix:{spec.fix.value:<7}"
                  f" {spec.summary}")
        raise typer.Exit(0)
    spec = checks.get(code.upper())
    if spec is None:
        raise _fail(UsageError(f"unknown code '{code}'",
                               hint="`llava-doctor explain --all` lists the codes"))
    print(f"# {spec.code} {spec.name} ({spec.severity.value}, fix: {spec.fix.value})\n")
    print(spec.doc)
    raise typer.Exit(0)


@app.command()
def demo(
    workdir: Annotated[Optional[Path], typer.Option("--dir", help="Build the demo here instead "
                                                    "of a temporary directory (kept).")] = None,
) -> None:
    """Build tiny LLaVA LoRA artifacts and run check on a healthy and a broken run."""
    from llava_doctor.demo import run_demo

    try:
        code = run_demo(workdir, out=sys.stdout, color=_color())
    except DoctorError as e:
        raise _fail(e) from None
    raise typer.Exit(code)


def _register_commands() -> None:
    import importlib

    from llava_doctor.commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(f"llava_doctor.commands.{name}").register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures are one line; tracebacks only with a debug var."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        rc = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _stderr("llava-doctor: aborted")
        sys.exit(130)
    except DoctorError as e:
        _stderr(f"llava-doctor: error: {e.one_line()}")
        sys.exit(e.exit_code)
    except Exception as e:  # usage errors from the parser, and real bugs
        if _is_usage_error(e):
            e.show()  # type: ignore[attr-defined]
            sys.exit(2)
        if os.environ.get("LLAVA_DOCTOR_DEBUG"):
            raise
        _stderr(f"llava-doctor: internal error: {type(e).__name__}: {e} "
                "(set LLAVA_DOCTOR_DEBUG=1 for a traceback, and please report it)")
        sys.exit(3)
    sys.exit(rc if isinstance(rc, int) else 0)


def _is_usage_error(e: Exception) -> bool:
    # typer vendors click; match the ClickException family by name rather than by import path.
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "show")
