"""The `convert` command (thin typer layer over `llava_doctor.merge.convert.convert`)."""

# No `from __future__ import annotations`: typer reads the option aliases from the signature.
import sys
from pathlib import Path
from typing import Annotated

import typer

from llava_doctor.commands.merge import (
    ConvTemplateOpt,
    VisionTowerOpt,
    render_summary,
    run_writer,
)


def register(app: typer.Typer) -> None:
    """Add `convert` to the app."""
    @app.command("convert")
    def convert_cmd(
        llava_dir: Annotated[Path, typer.Argument(help="An original-LLaVA checkpoint (merged or "
                                                  "fully fine-tuned, e.g. llava-v1.5-7b).")],
        out: Annotated[Path, typer.Option("--out", help="Directory to create for the llava-hf "
                                          "checkpoint (must not exist unless --overwrite).")],
        vision_tower: VisionTowerOpt = None,
        conv_template: ConvTemplateOpt = None,
        device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")
                          ] = "auto",
        dtype: Annotated[str, typer.Option("--dtype", help="float16 | bfloat16 | float32 | auto "
                                           "(auto keeps the input's dtypes).")] = "float16",
        max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output "
                                                    "shard, e.g. 5GB, 500MB, 2GiB.")] = "5GB",
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out "
                                                "(only once the new one is complete).")] = False,
        verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Re-read and check "
                                             "the output before installing it.")] = True,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    ) -> None:
        """Convert an original-LLaVA checkpoint into the llava-hf format (transformers, vLLM,
        SGLang): streaming, verified, refusing what cannot map.

        Exit 0 converted, 1 refused or failed (nothing written to --out), 2 usage error (e.g.
        no vision tower found).
        """
        from llava_doctor.merge.convert import convert

        result = run_writer(lambda observer: convert(
            llava_dir, out, observer=observer, vision_tower=vision_tower,
            conv_template=conv_template, device=device, dtype=dtype,
            max_shard_size=max_shard_size, overwrite=overwrite, verify=verify), out, quiet)
        sys.stdout.write(render_summary(result, llava_dir, verb="converted"))
        raise typer.Exit(0)
