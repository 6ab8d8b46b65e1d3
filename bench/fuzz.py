"""A longer fuzz run than the test suite's: mutate real artifacts and run every check on each.

Reports inputs tried, crashes (an exception out of the run, or an LD000 internal-error finding),
the slowest input and peak RSS. Crashing inputs are saved under --out for reproduction.

Mutation targets: the adapter's safetensors header region and data, the torch zip of
non_lora_trainables.bin (raw bytes, and its data.pkl pickle re-zipped so the opcode walker sees a
mutated pickle inside a well-formed zip), config.json and adapter_config.json.

Usage: python bench/fuzz.py [--seconds 60] [--seed 0] [--out bench/out/fuzz]
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures import build_all


def mutate_bytes(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    op = rng.choice(["flip", "flip", "truncate", "insert", "delete", "overwrite-int", "random"])
    if not b or op == "random":
        return bytes(rng.randbytes(rng.randint(0, 2048)))
    if op == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        b = b[:rng.randrange(len(b))]
    elif op == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    elif op == "delete":
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 64)]
    else:  # plant a huge little-endian integer (lengths, sizes, offsets)
        i = rng.randrange(len(b))
        b[i:i + 8] = rng.choice([2**63, 2**32 - 1, 10**9, 99_999_999]).to_bytes(8, "little")
    return bytes(b)


def mutate_pickle_in_zip(rng: random.Random, blob: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = mutate_bytes(rng, data)
            dst.writestr(info.filename, data)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/fuzz"))
    args = ap.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="llava-doctor-fuzz-"))
    try:
        paths = build_all(work / "fx")
        victim = work / "llava-v1.5-fuzz-lora"
        shutil.copytree(paths["lora"], victim)
        base = paths["base-vicuna"]
        originals = {n: (victim / n).read_bytes() for n in
                     ("adapter_model.safetensors", "non_lora_trainables.bin", "config.json",
                      "adapter_config.json")}
        targets = [("adapter_model.safetensors", mutate_bytes),
                   ("non_lora_trainables.bin", mutate_bytes),
                   ("non_lora_trainables.bin", mutate_pickle_in_zip),
                   ("config.json", mutate_bytes), ("adapter_config.json", mutate_bytes)]
        tried = crashes = 0
        slowest = (0.0, "")
        per_kind: dict[str, int] = {}
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            fname, fn = rng.choice(targets)
            kind = f"{fname}:{fn.__name__}"
            blob = fn(rng, originals[fname])
            (victim / fname).write_bytes(blob)
            t0 = time.perf_counter()
            try:
                rep = run_checks([victim], Options(base=base))
                bad = [f for f in rep.findings if f.code == "LD000"]
                err = bad[0].message if bad else None
            except Exception as e:  # the property under test: this never happens
                err = f"{type(e).__name__}: {e}"
            took = time.perf_counter() - t0
            tried += 1
            per_kind[kind] = per_kind.get(kind, 0) + 1
            if took > slowest[0]:
                slowest = (took, kind)
            if err:
                crashes += 1
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"crash-{crashes:03d}-{fname}").write_bytes(blob)
                print(f"CRASH on {kind}: {err}", file=sys.stderr)
            (victim / fname).write_bytes(originals[fname])
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"fuzz inputs tried: {tried}")
        print(f"crashes: {crashes}")
        print(f"slowest input: {slowest[0] * 1e3:.0f} ms ({slowest[1]})")
        print(f"peak RSS: {rss_mb:.0f} MB")
        print("by target: " + ", ".join(f"{k}={v}" for k, v in sorted(per_kind.items())))
        return 1 if crashes else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
