"""A longer fuzz run than the test suite's: mutate real artifacts and run every check on each.

Reports inputs tried, crashes (an exception out of the run, or an LD000 internal-error finding),
the slowest input and peak RSS. Crashing inputs are saved under --out for reproduction.

Mutation targets: the adapter's safetensors header region and data, the torch zip of
non_lora_trainables.bin (raw bytes, and its data.pkl pickle re-zipped so the opcode walker sees a
mutated pickle inside a well-formed zip), config.json and adapter_config.json (raw bytes; extreme
numbers - huge, negative, zero, float where int, NaN, 1e308 - in every numeric field the checks
read, and projector depths; tests/hostile_numbers.py), and hostile regexes in adapter_config.json
(tests/hostile_patterns.py; drawn for a few percent of the inputs, each costs a time budget).

Every input must give findings, never an exception or an LD000, within 2 s (a regex input within
the pattern budget plus 2 s). Slowest inputs are reported by kind.

Usage: python bench/fuzz.py [--seconds 60] [--seed 0] [--out bench/out/fuzz]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import hostile_numbers as hn  # noqa: E402
import hostile_patterns as hp  # noqa: E402

from llava_doctor.artifacts.bounded_re import PATTERN_BUDGET_S  # noqa: E402
from llava_doctor.checks.context import Options  # noqa: E402
from llava_doctor.doctor import run_checks  # noqa: E402
from llava_doctor.fixtures import build_all  # noqa: E402

BUDGET_S = 2.0
REGEX_BUDGET_S = PATTERN_BUDGET_S * 2 + BUDGET_S  # at most two patterns over budget per input
REGEX_SHARE = 0.03  # of the inputs: each hostile regex costs a whole budget


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


def mutate_numbers(fname: str) -> Callable[[random.Random, bytes], bytes]:
    """One to three numeric fields of ``fname`` (or its projector depth) set to extremes."""
    def fn(rng: random.Random, blob: bytes) -> bytes:
        text = blob.decode()
        if fname in hn.NUMERIC_STRINGS and rng.random() < 0.2:
            field, template = rng.choice(hn.NUMERIC_STRINGS[fname])
            return hn.with_depth(text, field, template, rng.choice(hn.DEPTHS)).encode()
        fields = rng.sample(hn.NUMERIC_FIELDS[fname], rng.randint(1, 3))
        return hn.with_numbers(text, {f: rng.choice(hn.EXTREMES) for f in fields}).encode()
    fn.__name__ = "extreme_numbers"
    return fn


def mutate_pattern(rng: random.Random, blob: bytes) -> bytes:
    """A hostile or invalid regex of the corpus in adapter_config.json."""
    cfg = json.loads(blob)
    rng.choice(hp.PATTERNS).edit(cfg)
    return json.dumps(cfg).encode()


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
                   ("config.json", mutate_bytes), ("adapter_config.json", mutate_bytes),
                   ("config.json", mutate_numbers("config.json")),
                   ("adapter_config.json", mutate_numbers("adapter_config.json"))]
        tried = crashes = too_slow = 0
        slowest = (0.0, "")
        slowest_by: dict[str, float] = {}
        per_kind: dict[str, int] = {}
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            if rng.random() < REGEX_SHARE:
                fname, fn = "adapter_config.json", mutate_pattern
            else:
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
            slowest_by[kind] = max(slowest_by.get(kind, 0.0), took)
            if took > slowest[0] and fn is not mutate_pattern:
                slowest = (took, kind)
            if err:
                crashes += 1
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"crash-{crashes:03d}-{fname}").write_bytes(blob)
                print(f"CRASH on {kind}: {err}", file=sys.stderr)
            elif took > (REGEX_BUDGET_S if fn is mutate_pattern else BUDGET_S):
                too_slow += 1
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"slow-{too_slow:03d}-{fname}").write_bytes(blob)
                print(f"SLOW on {kind}: {took:.2f} s", file=sys.stderr)
            (victim / fname).write_bytes(originals[fname])
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"fuzz inputs tried: {tried}")
        print(f"crashes: {crashes}")
        print(f"over the time limit: {too_slow}")
        print(f"slowest input: {slowest[0] * 1e3:.0f} ms ({slowest[1]})")
        regex_kind = "adapter_config.json:mutate_pattern"
        if regex_kind in slowest_by:
            print(f"slowest regex input: {slowest_by[regex_kind] * 1e3:.0f} ms "
                  f"(budget {PATTERN_BUDGET_S:g} s per pattern)")
        print("slowest by target: " + ", ".join(f"{k}={v * 1e3:.0f} ms"
                                                for k, v in sorted(slowest_by.items())))
        print(f"peak RSS: {rss_mb:.0f} MB")
        print("by target: " + ", ".join(f"{k}={v}" for k, v in sorted(per_kind.items())))
        return 1 if crashes or too_slow else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
