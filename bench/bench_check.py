"""`check`/`inspect` time against model size, and the default (value-reading) check as a
whole process against `cat` of the same files.

Builds (once, under --dir) a tiny artifact set and 7B- and 13B-shaped sets whose weights have real
headers and sparse (hole) data, plus two 7B-shaped LoRA runs with real random bf16 values (r=128,
~640 MB adapter, and r=512, 4x that), then prints, in one run, side by side:

  * `inspect` and `check --fast` wall time per set, and the ratio to the tiny set (headers only:
    the ratio should stay near 1 whatever the model size);
  * `llava-doctor check RUN --base B --projector P` (the default: value checks), the same with
    `--fast`, and `cat` of the adapter, non_lora_trainables.bin and projector, each as a whole
    process: median wall time and peak RSS (from wait4), and the peak-RSS ratio of the two runs.

Usage: python bench/bench_check.py [--dir bench/out/check] [--repeat 5] [--no-13b] [--no-large]
       [--values-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures.builder import (
    LLAMA_7B,
    LLAMA_13B,
    TINY,
    build_base,
    build_lora,
    build_pretrain,
)
from llava_doctor.inspect_ import inspect_path

VALUE_CHECKS = ["LD204", "LD205", "LD303", "LD503"]


def build_set(root: Path, dims, sparse: bool) -> dict[str, Path]:
    marker = root / ".complete"
    paths = {"base": root / "vicuna-base", "pretrain": root / "llava-bench-pretrain",
             "lora": root / "llava-bench-lora"}
    if marker.exists():
        return paths
    build_base(paths["base"], dims, shards=3 if sparse else 2, sparse=sparse)
    build_pretrain(paths["pretrain"], dims, base=paths["base"])
    build_lora(paths["lora"], dims, base=paths["base"], r=128 if sparse else 8,
               alpha=256 if sparse else 16, projector_from=paths["pretrain"], sparse=sparse)
    marker.touch()
    return paths


def timeit(fn, repeat: int) -> float:
    fn()  # warm the page cache and imports: we measure the steady state, same for every set
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_value_run(root: Path, r: int, pretrain: Path) -> Path:
    """A 7B-shaped LoRA at rank ``r`` with real random (non-zero) bf16 values on disk."""
    lora = root / "llava-bench-values-lora"
    if not (root / ".complete").exists():
        print(f"building {lora} (r={r}) ...", file=sys.stderr)
        build_lora(lora, LLAMA_7B, base="lmsys/vicuna-7b-v1.5", r=r, alpha=2 * r,
                   projector_from=pretrain)
        (root / ".complete").touch()
    return lora


TIME = "/usr/bin/time"  # GNU time: the rusage of the command itself (see run_process)


def run_process(cmd: list[str], repeat: int) -> tuple[float, float, int]:
    """Median wall time, median CPU time (user + system) and largest peak RSS (bytes) of
    ``cmd`` as a whole process. CPU time moves much less than wall time on a busy machine.

    The command runs under GNU time: Linux carries a process's peak RSS across exec, so a
    child forked straight from this (large) Python process would report our own peak.
    """
    walls, cpus, peaks = [], [], []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        proc = subprocess.run([TIME, "-f", "%U %S %M", *cmd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode not in (0, 1):
            raise SystemExit(f"{cmd} exited {proc.returncode}: {proc.stderr[-500:]}")
        user, system, kib = proc.stderr.strip().splitlines()[-1].split()
        if i:  # the first run warms the page cache
            walls.append(wall)
            cpus.append(float(user) + float(system))
            peaks.append(int(kib) * 1024)
    return statistics.median(walls), statistics.median(cpus), max(peaks)


def headers_section(built: dict[str, dict[str, Path]], repeat: int) -> None:
    print("\n== headers only: time does not grow with model size ==")
    print(f"{'set':<6} {'base size':>10} {'tensors':>8} {'inspect base':>13} {'ratio':>6} "
          f"{'check --fast':>13} {'ratio':>6} {'CLI process':>12} {'ratio':>6}")
    ref: dict[str, float] = {}
    for name, paths in built.items():
        size = sum(p.stat().st_size for p in paths["base"].glob("*.safetensors"))
        t_inspect = timeit(lambda p=paths: inspect_path(p["base"]), repeat)
        opts = Options(base=paths["base"], projector=paths["pretrain"] / "mm_projector.bin",
                       fast=True)
        t_check = timeit(lambda p=paths, o=opts: run_checks([p["lora"]], o), repeat)
        cmd = [sys.executable, "-m", "llava_doctor", "check", "--fast", str(paths["lora"]),
               "--base", str(paths["base"]), "--projector",
               str(paths["pretrain"] / "mm_projector.bin")]
        t_cli = timeit(lambda c=cmd: subprocess.run(c, capture_output=True), repeat)
        ntensors = inspect_path(paths["base"]).tensor_count
        ref.setdefault("inspect", t_inspect)
        ref.setdefault("check", t_check)
        ref.setdefault("cli", t_cli)
        print(f"{name:<6} {size / 1e9:>8.2f}GB {ntensors:>8} {t_inspect * 1e3:>11.1f}ms "
              f"{t_inspect / ref['inspect']:>5.2f}x {t_check * 1e3:>11.1f}ms "
              f"{t_check / ref['check']:>5.2f}x {t_cli:>11.2f}s {t_cli / ref['cli']:>5.2f}x")
    print("(in-process times grow with the number of tensors, not bytes; the CLI column is the "
          "whole command, interpreter start-up included)")



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("bench/out/check"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-13b", action="store_true")
    ap.add_argument("--no-large", action="store_true", help="skip the 4x (r=512, ~2.5 GB) adapter")
    ap.add_argument("--values-only", action="store_true", help="only the default-check section")
    args = ap.parse_args()

    sets = {"tiny": (TINY, False), "7B": (LLAMA_7B, True)}
    if not args.no_13b:
        sets["13B"] = (LLAMA_13B, True)
    print(f"building artifact sets under {args.dir} (cached between runs) ...", file=sys.stderr)
    built = {name: build_set(args.dir / name, dims, sparse) for name, (dims, sparse) in sets.items()}

    if not args.values_only:
        headers_section(built, args.repeat)

    value_runs = {"7B r=128": 128} if args.no_large else {"7B r=128": 128, "7B r=512": 512}
    print("\n== the default check (value checks) as whole processes, next to `cat` of the same "
          "files ==")
    print("(warm page cache; wall and CPU (user+sys): medians of the runs; peak RSS: largest of "
          f"the runs; load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'run':<10} {'files':>8} {'command':<44} {'wall':>7} {'CPU':>7} {'peak RSS':>9}")
    peaks: dict[str, int] = {}
    for label, r in value_runs.items():
        lora = build_value_run(args.dir / f"7B-values-r{r}", r, built["7B"]["pretrain"])
        pre = built["7B"]["pretrain"] / "mm_projector.bin"
        files = [lora / "adapter_model.safetensors", lora / "non_lora_trainables.bin", pre]
        nbytes = sum(p.stat().st_size for p in files)
        check = [sys.executable, "-m", "llava_doctor", "check", str(lora), "--base",
                 str(built["7B"]["base"]), "--projector", str(pre), "--format", "json"]
        jobs = {
            "llava-doctor check RUN --base B --projector P": check,
            "llava-doctor check ... --fast": [*check, "--fast"],
            "cat adapter non_lora projector > /dev/null": ["cat", *map(str, files)],
            "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
        }
        rep = json.loads(subprocess.run(check, capture_output=True, text=True).stdout)
        ran = sorted(o["code"] for t in rep["targets"] for o in t["checks"]
                     if o["code"] in VALUE_CHECKS and o["status"] in ("passed", "failed"))
        for name, cmd in jobs.items():
            wall, cpu, rss = run_process(cmd, args.repeat)
            if name.endswith("--projector P"):
                peaks[label] = rss
            print(f"{label:<10} {nbytes / 1e6:>6.0f}MB {name:<44} {wall:>6.2f}s {cpu:>6.2f}s "
                  f"{rss / 1e6:>7.0f}MB")
        print(f"{'':<10} value checks that read values: {', '.join(ran)}")
    if len(peaks) == 2:
        small, large = peaks.values()
        print(f"peak RSS of the default check, 4x adapter / 1x adapter: {large / small:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
