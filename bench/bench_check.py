"""`check`/`inspect` time against model size, and value-check throughput against a plain read.

Builds (once, under --dir) a tiny artifact set and 7B- and 13B-shaped sets whose weights have real
headers and sparse (hole) data, then prints, in one run, side by side:

  * `inspect` and `check --fast` wall time per set, and the ratio to the tiny set (headers only:
    the ratio should stay near 1 whatever the model size);
  * value checks (`check` without `--fast`, the checks that read tensors) on a 7B r=128 adapter of
    real random bf16 data (~640 MB) next to a plain sequential read of the same files.

Usage: python bench/bench_check.py [--dir bench/out/check] [--repeat 5] [--no-13b]
"""

from __future__ import annotations

import argparse
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


def sequential_read(paths: list[Path], chunk: int = 16 << 20) -> int:
    n = 0
    for p in paths:
        with p.open("rb") as f:
            while b := f.read(chunk):
                n += len(b)
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("bench/out/check"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-13b", action="store_true")
    args = ap.parse_args()

    sets = {"tiny": (TINY, False), "7B": (LLAMA_7B, True)}
    if not args.no_13b:
        sets["13B"] = (LLAMA_13B, True)
    print(f"building artifact sets under {args.dir} (cached between runs) ...", file=sys.stderr)
    built = {name: build_set(args.dir / name, dims, sparse) for name, (dims, sparse) in sets.items()}

    print("\n== headers only: time does not grow with model size ==")
    print(f"{'set':<6} {'base size':>10} {'tensors':>8} {'inspect base':>13} {'ratio':>6} "
          f"{'check --fast':>13} {'ratio':>6} {'CLI process':>12} {'ratio':>6}")
    ref: dict[str, float] = {}
    for name, paths in built.items():
        size = sum(p.stat().st_size for p in paths["base"].glob("*.safetensors"))
        t_inspect = timeit(lambda p=paths: inspect_path(p["base"]), args.repeat)
        opts = Options(base=paths["base"], projector=paths["pretrain"] / "mm_projector.bin",
                       fast=True)
        t_check = timeit(lambda p=paths, o=opts: run_checks([p["lora"]], o), args.repeat)
        cmd = [sys.executable, "-m", "llava_doctor", "check", "--fast", str(paths["lora"]),
               "--base", str(paths["base"]), "--projector",
               str(paths["pretrain"] / "mm_projector.bin")]
        t_cli = timeit(lambda c=cmd: subprocess.run(c, capture_output=True), args.repeat)
        ntensors = inspect_path(paths["base"]).tensor_count
        ref.setdefault("inspect", t_inspect)
        ref.setdefault("check", t_check)
        ref.setdefault("cli", t_cli)
        print(f"{name:<6} {size / 1e9:>8.2f}GB {ntensors:>8} {t_inspect * 1e3:>11.1f}ms "
              f"{t_inspect / ref['inspect']:>5.2f}x {t_check * 1e3:>11.1f}ms "
              f"{t_check / ref['check']:>5.2f}x {t_cli:>11.2f}s {t_cli / ref['cli']:>5.2f}x")
    print("(in-process times grow with the number of tensors, not bytes; the CLI column is the "
          "whole command, interpreter start-up included)")

    print("\n== value checks on a 7B r=128 adapter of real data vs a plain sequential read ==")
    vroot = args.dir / "7B-values"
    lora = vroot / "llava-bench-values-lora"
    if not (vroot / ".complete").exists():
        build_lora(lora, LLAMA_7B, base="lmsys/vicuna-7b-v1.5", r=128, alpha=256,
                   projector_from=built["7B"]["pretrain"])
        (vroot / ".complete").touch()
    files = [lora / "adapter_model.safetensors", lora / "non_lora_trainables.bin",
             built["7B"]["pretrain"] / "mm_projector.bin"]
    nbytes = sum(p.stat().st_size for p in files)
    t_read = timeit(lambda: sequential_read(files), max(1, args.repeat // 2))
    opts = Options(projector=built["7B"]["pretrain"] / "mm_projector.bin")
    rep = run_checks([lora], opts, select=VALUE_CHECKS)
    ran = [o.code for o in rep.targets[0].checks if o.status.value in ("passed", "failed")]
    t_vals = timeit(lambda: run_checks([lora], opts, select=VALUE_CHECKS), max(1, args.repeat // 2))
    print(f"files: {nbytes / 1e6:.0f} MB ({', '.join(p.name for p in files)}); checks run: "
          f"{', '.join(ran)}")
    print(f"{'plain sequential read':<24} {t_read:>7.2f}s {nbytes / t_read / 1e6:>8.0f} MB/s  1.00x")
    print(f"{'value checks':<24} {t_vals:>7.2f}s {nbytes / t_vals / 1e6:>8.0f} MB/s "
          f"{t_vals / t_read:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
