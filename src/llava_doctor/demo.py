"""`llava-doctor demo`: build tiny artifacts with the shipped builder and show the tool at work."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TextIO

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.report.text import render_text


def run_demo(workdir: Path | None, out: TextIO, color: bool = False) -> int:
    """Build the fixture set, check a healthy and a broken run; return 0 when all went as shown."""
    from llava_doctor.fixtures import build_all

    tmp = None
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="llava-doctor-demo-"))
        root = tmp
    else:
        root = workdir
        root.mkdir(parents=True, exist_ok=True)
    try:
        paths = build_all(root)
        base = paths["base-vicuna"]
        steps = [
            ("A healthy LoRA run (vicuna base, stage-1 projector beside it)",
             paths["lora"]),
            ("A Trainer checkpoint-N: no config.json, no non_lora_trainables.bin",
             paths["checkpoint-50"]),
            ("Only non_lora_trainables.bin was copied", paths["LD102-only-non-lora"]),
            ("A non_lora_trainables.bin whose pickle calls os.system (never executed)",
             paths["LD502-malicious-pickle"]),
        ]
        ok = True
        for title, target in steps:
            out.write(f"\n$ llava-doctor check {target.relative_to(root)} --base "
                      f"{base.relative_to(root)}\n# {title}\n")
            report = run_checks([target], Options(base=base))
            out.write(render_text(report, color=color))
            healthy = target == paths["lora"]
            ok &= (report.exit_code() == 0) if healthy else (report.exit_code() == 1)
        out.write(f"\nDemo artifacts in {root}" + (" (temporary, removed)" if tmp else "") + "\n")
        return 0 if ok else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
