"""Thin typer layer: parse, call one library function, render, pick the exit code."""

from __future__ import annotations

import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from llava_doctor import __version__
from llava_doctor.errors import DoctorError, UsageError
from llava_doctor.models import Consumer, Severity
from llava_doctor.report import RENDERERS

BaseOpt = Annotated[Path | None, typer.Option("--base", help="The base model the LoRA was "
                                                 "trained on (default: adapter_config.json's "
                                                 "base_model_name_or_path if local or cached).")]
ProjectorOpt = Annotated[Path | None, typer.Option("--projector", help="Stage-1 "
                                                      "mm_projector.bin (default: a sibling "
                                                      "*-pretrain/mm_projector.bin).")]
PeftOpt = Annotated[str | None, typer.Option("--peft-version", help="The peft version that "
                                                "will load the adapter (default: installed peft).")]
TransformersOpt = Annotated[str | None, typer.Option(
    "--transformers-version", metavar="V", help="The transformers version that will load the "
    "adapter or the merged model (llava-hf runs; default: installed transformers).")]
MergeWithOpt = Annotated[Consumer | None, typer.Option(
    "--merge-with", case_sensitive=False,
    help="Whose merge the severities are for: llava (LLaVA's merge_lora_weights.py with the "
         "transformers it pins; the default for original-LLaVA runs), llava-doctor "
         "(`llava-doctor merge`) or peft (peft's merge_and_unload, with --peft-version).")]
SelectOpt = Annotated[list[str] | None, typer.Option("--select", help="Only these codes or "
                                                        "prefixes (repeatable).")]
IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="Skip these codes or "
                                                        "prefixes (repeatable).")]


class Command(typer.core.TyperCommand):
    """Arguments as click writes them: a required argument is `LORA_DIR`, not `{lora_dir}`
    (typer >= 0.2x writes the lower-case name and wraps required arguments in braces, which
    reads like a placeholder left unfilled)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            if isinstance(p, typer.core.TyperArgument) and p.metavar is None and p.name:
                p.metavar = p.name.upper()

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:  # type: ignore[override]
        pieces = super().collect_usage_pieces(ctx)
        return [re.sub(r"^\{([^{}]+)\}", r"\1", p) for p in pieces]


class _App(typer.Typer):
    """Every command registered on the app (here or in `commands/`) gets `Command`'s usage."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


app = _App(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
           help="Diagnose, repair and merge LLaVA LoRA runs without executing a pickle.")

# Options declared once, reused by every command.
def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _fail(err: DoctorError) -> typer.Exit:
    _stderr(f"llava-doctor: error: {err.one_line()}")
    return typer.Exit(err.exit_code)


def _color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _check_progress(fmt: str) -> Any:
    """A progress line on stderr for runs longer than a second: on a terminal, never for json."""
    import contextlib

    if fmt == "json" or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from llava_doctor.commands.progress import CheckProgress

    return CheckProgress()


def _installed_peft() -> str | None:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return None


def _installed_transformers() -> str | None:
    """The installed transformers' version, from its metadata (transformers is never imported)."""
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:
        return None


def _transformers_target(given: str | None) -> str | None:
    """--transformers-version, validated, else the installed transformers (None: neither)."""
    if given is None:
        return _installed_transformers()
    from llava_doctor.artifacts.hf_layout import parse_version

    try:
        parse_version(given)
    except ValueError:
        raise UsageError(f"--transformers-version '{given}' is not a version number",
                         hint="write it like 4.46.3 or 5.0.0") from None
    return given


def version_callback(value: bool) -> None:
    if value:
        print(f"llava-doctor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=version_callback,
                                                is_eager=True, help="Show the version.")] = False
          ) -> None:
    pass


# The --format choices are the renderer registry's keys (check-jsonschema's reporter dict).
Format = Enum("Format", {name: name for name in RENDERERS}, type=str)  # type: ignore[misc]
FormatOpt = Annotated[Format, typer.Option("--format", help="Report format.")]
OutputOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", metavar="FILE",
    help="Write the report to FILE (created only when the run completes) instead of stdout.")]
RootOpt = Annotated[Path | None, typer.Option(
    "--root", metavar="DIR",
    help="Paths in sarif, github, junit and markdown reports are relative to DIR (default: the "
         "working directory).")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", metavar="FILE",
    help="Read this .llava-doctor.toml or pyproject.toml instead of searching upward from the "
         "working directory.")]
IsolatedOpt = Annotated[bool, typer.Option("--isolated", help="Ignore configuration files.")]


def _codes(values: list[str] | None, flag: str) -> list[str] | None:
    """Repeatable and comma-separated (`--select LD1,LD2`), each validated against the registry."""
    from llava_doctor.config import validate_code

    if not values:
        return None
    return [validate_code(c, flag) for v in values for c in v.split(",") if c.strip()]


@app.command()
def check(
    paths: Annotated[list[Path] | None, typer.Argument(
        metavar="DIR", help="LoRA output dirs or checkpoint-N dirs (globs are expanded; a file "
                            "stands for its directory).")] = None,
    recursive: Annotated[list[Path] | None, typer.Option(
        "--recursive", "-r", metavar="ROOT",
        help="Check every LoRA output and checkpoint-N under ROOT (repeatable).")] = None,
    base: BaseOpt = None,
    projector: ProjectorOpt = None,
    peft_version: PeftOpt = None,
    transformers_version: TransformersOpt = None,
    merge_with: MergeWithOpt = None,
    fmt: FormatOpt = Format.text,  # type: ignore[attr-defined]  # members come from RENDERERS
    output: OutputOpt = None,
    root: RootOpt = None,
    fail_on: Annotated[Severity | None, typer.Option(
        "--fail-on", case_sensitive=False, help="Exit 1 when a finding is at or above this "
                                                "severity (default: error).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Same as --fail-on warning.")] = False,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even with findings "
                                            "(usage errors still exit 2).")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=0, metavar="N",
                                      help="Check N targets in parallel (0: one per CPU).")] = 1,
    fast: Annotated[bool, typer.Option("--fast", help="Headers only: read no tensor values.")
                    ] = False,
    scan_base: Annotated[bool, typer.Option("--scan-base", help="Also read base tensor values.")
                         ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Planned merge output dir "
                                                "(enables the disk-space preflight).")] = None,
    select: SelectOpt = None,
    ignore: IgnoreOpt = None,
    config: ConfigOpt = None,
    isolated: IsolatedOpt = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="List skipped checks.")
                       ] = False,
    to: Annotated[str | None, typer.Option("--to", help="llava-hf: also check that the run "
                                           "or checkpoint maps onto llava-hf (LD8xx).")
                  ] = None,
    vision_tower: Annotated[Path | None, typer.Option(
        "--vision-tower", metavar="CLIP_DIR", help="With --to llava-hf: the CLIP checkpoint "
                                                   "(default: mm_vision_tower).")] = None,
    env: Annotated[bool, typer.Option("--env", help="Also report the environment (as "
                                      "`llava-doctor env`); its findings count for the exit "
                                      "code.")] = False,
) -> None:
    """Diagnose LoRA runs before the merge. Exit 0 clean, 1 findings, 2 usage error."""
    from llava_doctor.checks.context import Options
    from llava_doctor.config import Config, discover, load_config
    from llava_doctor.doctor import collect_targets, run_checks
    from llava_doctor.report.locate import json_key_lines
    from llava_doctor.report.output import check_output_path, write_atomic

    try:
        if strict and fail_on not in (None, Severity.warning):
            raise UsageError(f"--strict means --fail-on warning, but --fail-on {fail_on.value} "
                             "was given", hint="give one of them")
        if to not in (None, "llava", "llava-hf"):
            raise UsageError(f"unknown --to '{to}'", hint="choose llava or llava-hf")
        threshold = Severity.warning if strict else (fail_on or Severity.error)
        cfg = Config() if isolated else (load_config(config) if config else discover())
        if verbose and cfg.path is not None:
            _stderr(f"llava-doctor: using configuration {cfg.path}")
        sel, ign = cfg.selection(_codes(select, "--select"), _codes(ignore, "--ignore"))
        targets = collect_targets(paths or [], recursive or [])
        if output is not None:
            check_output_path(output)
        if root is not None and not root.is_dir():
            raise UsageError("--root is not a directory", path=root,
                             hint="pass the repository root the report paths are relative to")
        opts = Options(base=base or cfg.base, projector=projector or cfg.projector,
                       peft_version=peft_version or cfg.peft_version or _installed_peft(),
                       transformers_version=_transformers_target(transformers_version),
                       fast=fast, scan_base=scan_base, out=out,
                       to=to if to == "llava-hf" else None, vision_tower=vision_tower,
                       consumer=merge_with or cfg.merge_with)
        progress = (lambda p: _stderr(f"llava-doctor: checking {p}")) if verbose else None
        with _check_progress(fmt.value) as observer:
            report = run_checks(targets, opts, select=sel, ignore=ign,
                                jobs=jobs or (os.cpu_count() or 1), on_target=progress,
                                observer=observer)
        report = cfg.apply(report)
        if env:
            from llava_doctor.envinfo import EnvOptions, env_consumer, gather

            report = report.model_copy(update={"env": gather(targets, EnvOptions(
                peft_version=peft_version or cfg.peft_version, base=opts.base,
                run_target_checks=False, select=tuple(sel) if sel is not None else None,
                ignore=tuple(ign or ()), consumer=env_consumer(report)))})
        shown = report
        if report.env is not None and fmt.value not in ("text", "json"):
            from llava_doctor.envinfo import fold_into_targets

            shown = fold_into_targets(report)  # these formats know only targets
        text = RENDERERS[fmt.value](shown, root=root, fail_on=threshold,
                                    lines=json_key_lines(shown),
                                    color=output is None and fmt == "text" and _color(),
                                    verbose=verbose)
        if output is not None:
            write_atomic(output, text)
            c = report.counts
            _stderr(f"llava-doctor: wrote the {fmt.value} report to {output} ({c['error']} "
                    f"error(s), {c['warning']} warning(s), {c['info']} info in "
                    f"{len(report.targets)} target(s))")
        else:
            sys.stdout.write(text)
    except DoctorError as e:
        raise _fail(e) from None
    raise typer.Exit(0 if exit_zero else report.exit_code(threshold))


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A weight file or a directory.")],
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
    code: Annotated[str | None, typer.Argument(metavar="CODE",
                                               help="A finding code, e.g. LD101.")] = None,
    all_codes: Annotated[bool, typer.Option("--all", help="List every code.")] = False,
) -> None:
    """Print a check's documentation (What it does / Why is this bad / Example / Fix)."""
    from llava_doctor.checks.base import all_checks

    checks = all_checks()
    if all_codes or code is None:
        who = "/".join(c.value for c in Consumer)
        print(f"{'code':<6} {'name':<34} {'severity (' + who + ')':<38} {'fix':<11} summary")
        for spec in checks.values():
            print(f"{spec.code:<6} {spec.name:<34} {spec.severities_text('/'):<38} "
                  f"fix:{spec.fix.value:<7} {spec.summary}")
        raise typer.Exit(0)
    found = checks.get(code.upper())
    if found is None:
        raise _fail(UsageError(f"unknown code '{code}'",
                               hint="`llava-doctor explain --all` lists the codes"))
    # The doc ends with its generated `## Severity` section (one line per consumer).
    print(f"# {found.code} {found.name} ({found.severities_text('/')}, fix: {found.fix.value})\n")
    print(found.doc)
    raise typer.Exit(0)


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option("--dir", help="Build the demo here instead "
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


def console() -> None:
    """The `llava-doctor` script and `python -m llava_doctor`: `main`, then, once torch has
    been imported (merge, convert), an exit that skips the interpreter's teardown.

    Tearing down torch's modules takes 0.3-0.8 s after the work is done (measured on 2 cores:
    `python -c "import torch"` 1.6-2.2 s, the same ending in `os._exit` 1.3-1.5 s), a sixth of
    a 1 GB merge. Everything the command writes is closed and fsynced by then (output files
    are written with `with` blocks and installed atomically); the standard streams are flushed
    here. `main` itself, which tests and embedding programs call, exits normally.
    """
    try:
        main()
        code: int = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): printed, status 1, as the interpreter does
            _stderr(str(e.code))
            code = 1
    if "torch" not in sys.modules:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing left to tell
            pass
    os._exit(code)


def _is_usage_error(e: Exception) -> bool:
    # typer vendors click; match the ClickException family by name rather than by import path.
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "show")
