"""`llava-doctor demo`: build tiny artifacts with the shipped builder and show the tool at work.

Each step runs the real command line in a child process, in the demo folder, and shows it as a
user would type it: check a healthy run and broken ones, fix a Trainer checkpoint, merge.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

# (what the step shows, the arguments after `llava-doctor`, the exit code it must give)
Step = tuple[str, list[str], int]


def _steps(p: dict[str, Path], root: Path) -> list[Step]:
    def rel(name: str) -> str:
        return str(p[name].relative_to(root))

    base = rel("base-vicuna")
    projector = str(Path(rel("pretrain")) / "mm_projector.bin")
    return [
        ("A healthy LoRA run on its vicuna base: LLaVA's own merge would still write no weights "
         "(vicuna's generation config, LD404)",
         ["check", rel("lora"), "--base", base, "--projector", projector], 1),
        ("...which llava-doctor merge handles: the severities for that merge",
         ["check", rel("lora"), "--base", base, "--projector", projector,
          "--merge-with", "llava-doctor"], 0),
        ("A Trainer checkpoint-N: no config.json, no non_lora_trainables.bin",
         ["check", rel("checkpoint-50"), "--base", base, "--merge-with", "llava-doctor"], 1),
        ("fix applies the safe repair (config.json from the run's final dir); the unsafe one "
         "waits for --unsafe",
         ["fix", rel("checkpoint-50"), "--base", base, "--yes", "--merge-with", "llava-doctor"],
         1),
        ("...and with --unsafe the checkpoint gets the final step's projector, backed up and "
         "re-checked",
         ["fix", rel("checkpoint-50"), "--base", base, "--yes", "--unsafe",
          "--merge-with", "llava-doctor"], 0),
        ("Only non_lora_trainables.bin was copied: there is no LoRA",
         ["check", rel("LD102-only-non-lora")], 1),
        ("A non_lora_trainables.bin whose pickle calls os.system: flagged, never executed",
         ["check", rel("LD502-malicious-pickle")], 1),
        ("The streaming merge of the healthy run, verified before it is installed",
         ["merge", rel("lora"), "--base", base, "--out", "merged/llava-v1.5-tiny-merged",
          "--quiet"], 0),
    ]


def run_demo(workdir: Path | None, out: TextIO, color: bool = False) -> int:
    """Build the fixture set and run the steps; 0 when every step gave its expected exit code."""
    from llava_doctor.fixtures import build_all

    tmp = Path(tempfile.mkdtemp(prefix="llava-doctor-demo-")) if workdir is None else None
    root = (tmp or workdir).resolve()  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    if not color:
        env["NO_COLOR"] = "1"
    try:
        paths = build_all(root)
        ok = True
        for title, argv, expected in _steps(paths, root):
            out.write(f"\n# {title}\n$ llava-doctor {' '.join(argv)}\n")
            out.flush()
            proc = subprocess.run([sys.executable, "-m", "llava_doctor", *argv], cwd=root,
                                  env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True)
            out.write(proc.stdout)
            if proc.stderr.strip():
                out.write(proc.stderr if proc.stderr.endswith("\n") else proc.stderr + "\n")
            out.write(f"(exit {proc.returncode})\n")
            if proc.returncode != expected:
                out.write(f"demo: expected exit {expected} here\n")
                ok = False
        out.write(f"\nDemo artifacts in {root}" + (" (temporary, removed)" if tmp else "") + "\n")
        return 0 if ok else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
