"""The `merge` command (thin typer layer over `llava_doctor.merge.merge`).

Parses options, draws the progress bar (rich, on stderr, only here: the library reports
progress through an observer), prints the summary on stdout and picks the exit code.
"""

# No `from __future__ import annotations`: typer reads the option aliases imported inside
# `register` from the evaluated signature.
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from llava_doctor.merge import MergeEvent, MergeResult


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _ProgressBar:
    """Observer that renders `MergeEvent`s as a rich progress bar on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.fields[tensors]}"), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.task: Any = None

    def __enter__(self) -> "_ProgressBar":
        self.progress.start()
        self.task = self.progress.add_task("running the checks", total=None, tensors="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, ev: "MergeEvent") -> None:
        labels = {"checks": "running the checks", "plan": "planning from headers",
                  "write": "merging", "finalize": "writing configs", "verify": "verifying",
                  "done": "done"}
        kw: dict[str, Any] = {"description": labels.get(ev.phase, ev.phase)}
        if ev.phase == "write":
            kw.update(total=ev.bytes_total or None, completed=ev.bytes_done,
                      tensors=f"{ev.done}/{ev.total} tensors")
        self.progress.update(self.task, **kw)


# Options shared with `convert` (llava-hf output).
VisionTowerOpt = Annotated[Optional[Path], typer.Option(
    "--vision-tower", metavar="CLIP_DIR",
    help="llava-hf output: the CLIP checkpoint the vision tower comes from (default: "
         "config.json's mm_vision_tower as a local dir, else in the local Hugging Face "
         "cache).")]
ConvTemplateOpt = Annotated[Optional[str], typer.Option(
    "--conv-template", metavar="T",
    help="llava-hf output: LLaVA conversation template for the chat template (vicuna_v1, "
         "mistral_instruct, chatml_direct; default from the language model family).")]


def render_summary(r: "MergeResult", lora_dir: Path, verb: str = "merged") -> str:
    """The final summary printed on stdout."""
    lines = [f"{verb} {lora_dir} -> {r.out}"]
    lines.append(f"  tensors    {r.tensors} written in {r.shards} shard(s), {_human(r.total_size)} "
                 f"{r.dtype}; {r.tensors_merged} received a LoRA delta "
                 f"({r.lora_modules} LoRA modules applied)")
    if r.replaced:
        lines.append(f"  replaced   {r.replaced} base tensor(s) by non-LoRA trainables or "
                     "modules_to_save")
    lines.append(f"  projector  {r.projector_source}")
    if r.verified is not None:
        lines.append(f"  verified   header and sha256 of {r.verified.files} shard(s) as re-read "
                     f"from disk; {len(r.verified.sampled)} sampled tensors recomputed from "
                     "the inputs")
    else:
        lines.append("  verified   no (--no-verify)")
    lines.append(f"  device     {r.device}    time {r.seconds:.2f} s    peak memory "
                 f"{_human(r.peak_rss_bytes)} (RSS)")
    if r.notes:
        lines.append("notes:")
        lines += [f"  - {n}" for n in r.notes]
    # The checks ran with this merge as the consumer: what it takes care of (the generation
    # config, QLoRA's config, names, model_type) is info and not among r.warnings.
    shown = list(r.warnings)
    if shown:
        lines.append("from the checks:")
        lines += [f"  - {f.code} {f.name}: {f.message}" for f in shown]
    return "\n".join(lines) + "\n"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the library removes its partial dir on the way out


def run_writer(job: Callable[[Any], Any], out: Path, quiet: bool) -> Any:
    """Run a library call that writes OUT (merge, convert) the way the CLI does: a progress bar
    on a terminal, a file-size limit surfacing as EFBIG (a clear "disk full" error) instead of
    killing us, SIGTERM unwinding like Ctrl-C so the partial directory is removed (exit 130),
    expected failures as one line. Signal handlers are restored afterwards for callers that run
    the command in-process (tests). `job(observer)` gets the bar, or None."""
    from llava_doctor.cli import _color, _fail
    from llava_doctor.errors import DoctorError
    from llava_doctor.merge import PreflightRefused
    from llava_doctor.report import RENDERERS

    saved = {sig: signal.signal(sig, handler) for sig, handler in (
        (getattr(signal, "SIGXFSZ", None), signal.SIG_IGN),
        (signal.SIGTERM, _raise_interrupt)) if sig is not None}
    bar = _ProgressBar() if not quiet and sys.stderr.isatty() else None
    try:
        if bar is not None:
            with bar:
                return job(bar)
        return job(None)
    except PreflightRefused as e:
        sys.stdout.write(RENDERERS["text"](e.report, color=_color()))
        raise _fail(e) from None
    except DoctorError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the library has removed its work directory on the way out.
        print(f"llava-doctor: aborted; nothing was written to {out}", file=sys.stderr)
        raise typer.Exit(130) from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def register(app: typer.Typer) -> None:
    """Add `merge` to the app."""
    from llava_doctor.cli import BaseOpt, ProjectorOpt

    @app.command("merge")
    def merge_cmd(
        lora_dir: Annotated[Path, typer.Argument(metavar="LORA_DIR",
                                                 help="The LoRA output directory.")],
        out: Annotated[Path, typer.Option("--out", help="Directory to create for the merged "
                                          "model (must not exist unless --overwrite).")],
        base: BaseOpt = None,
        projector: ProjectorOpt = None,
        device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N "
                                            "(auto: CUDA when torch sees a GPU).")] = "auto",
        dtype: Annotated[str, typer.Option("--dtype", help="float16 | bfloat16 | float32 | auto "
                                           "(auto keeps the base's dtypes).")] = "float16",
        max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output "
                                                    "shard, e.g. 5GB, 500MB, 2GiB.")] = "5GB",
        force: Annotated[bool, typer.Option("--force", help="Merge even when the checks find "
                                            "errors.")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out "
                                                "(only once the new one is complete).")] = False,
        verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Re-read and check "
                                             "the output before installing it.")] = True,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
        to: Annotated[str, typer.Option("--to", help="llava (LLaVA's own layout) | llava-hf "
                                        "(transformers' Llava/LlavaNext, vLLM, SGLang).")
                      ] = "llava",
        vision_tower: VisionTowerOpt = None,
        conv_template: ConvTemplateOpt = None,
    ) -> None:
        """Merge a LLaVA LoRA into its base: streaming, exact (peft's maths), verified.

        Exit 0 merged, 1 refused or failed (nothing written to --out), 2 usage error.
        """
        from llava_doctor.merge import merge

        result = run_writer(lambda observer: merge(
            lora_dir, base, out, projector=projector, device=device, dtype=dtype,
            max_shard_size=max_shard_size, force=force, overwrite=overwrite, verify=verify,
            observer=observer, to=to, vision_tower=vision_tower, conv_template=conv_template),
            out, quiet)
        sys.stdout.write(render_summary(result, lora_dir))
        raise typer.Exit(0)
