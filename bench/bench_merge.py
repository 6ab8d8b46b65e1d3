"""`llava-doctor merge` against peft's pipeline and against the floors no merge can beat.

Builds once (under --dir) a llama-shaped fp16 base of about 1 GB with real random weights
(hidden 2048, intermediate 5504, 8 layers, vocab 32000, 3 safetensors shards), a stage-1
projector and a LLaVA LoRA run on it with an adapter on every linear layer (r=128, alpha=256,
bf16, like finetune_lora.sh), then runs, side by side and R times each (median reported):

  ours        llava_doctor.merge.merge(...) with its defaults: checks, streaming merge, fsync,
              verification (headers, sha256 re-read, sampled recomputation), atomic install
  ours (CLI)  `python -m llava_doctor merge ...` as a user runs it, interpreter start included
  peft        LlamaForCausalLM.from_pretrained -> PeftModel.from_pretrained ->
              merge_and_unload -> save_pretrained (safetensors)
  cp -r       copy of the base directory: the I/O floor (read and write every byte once)
  B @ A       the bare float32 products of every LoRA module: the compute floor

Every job runs in its own process; its peak RSS is that process's ru_maxrss (os.wait4). For the
Python jobs the time is the work only (imports done before the clock starts), so the numbers
compare merges, not interpreter start-up; the CLI row shows the whole command. Page cache is
warm (inputs are read once first) and `sync` runs between jobs so one job's write-back does not
land on the next.

Usage: python bench/bench_merge.py [--dir bench/out/merge] [--repeat 3] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------ inputs
def build(root: Path, layers: int) -> dict[str, Path]:
    from llava_doctor.fixtures.builder import Dims, build_base, build_lora, build_pretrain

    paths = {"base": root / "vicuna-bench", "pretrain": root / "llava-bench-pretrain",
             "lora": root / "llava-bench-lora"}
    marker = root / f".complete-{layers}"
    if marker.exists():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    dims = Dims(hidden=2048, intermediate=5504, layers=layers, heads=16, kv_heads=16,
                vocab=32000, mm_hidden=1024)
    print(f"building a {layers}-layer base, projector and r=128 adapter under {root} ...",
          file=sys.stderr)
    build_base(paths["base"], dims, shards=3)
    build_pretrain(paths["pretrain"], dims, base=paths["base"])
    build_lora(paths["lora"], dims, base=paths["base"], r=128, alpha=256,
               projector_from=paths["pretrain"], peft_version="0.10.0")
    marker.touch()
    return paths


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def warm(paths: list[Path]) -> None:
    for root in paths:
        for f in root.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    while fh.read(16 << 20):
                        pass


# ------------------------------------------------------------------------------- child jobs
def child(job: str, args: list[str]) -> None:
    """Run one job in this (fresh) process and print {"seconds": ...} as the last line."""
    import torch  # noqa: F401  (imported before the clock starts, like everything below)

    if job == "build":
        root, layers = Path(args[0]), int(args[1])
        print(json.dumps({k: str(v) for k, v in build(root, layers).items()}))
    elif job == "info":
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(json.dumps({"torch": torch.__version__, "gpu": gpu}))
    elif job == "spot":
        n, worst = spot_check(Path(args[0]), Path(args[1]))
        print(json.dumps({"tensors": n, "max_diff": worst}))
    elif job == "ours":
        from llava_doctor.merge import merge

        lora, base, out = map(Path, args)
        t0 = time.perf_counter()
        r = merge(lora, base, out)
        print(json.dumps({"seconds": time.perf_counter() - t0, "device": r.device}))
    elif job == "peft":
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        lora, base, out = args
        t0 = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float16)
        model = PeftModel.from_pretrained(model, lora).merge_and_unload()
        model.save_pretrained(out)
        print(json.dumps({"seconds": time.perf_counter() - t0}))
    elif job == "matmul":
        from safetensors.torch import load_file

        (adapter,) = args
        sd = load_file(adapter)
        pairs = [(sd[k].float(), sd[k.replace("lora_A", "lora_B")].float())
                 for k in sd if ".lora_A." in k]
        t0 = time.perf_counter()
        for a, b in pairs:
            b @ a
        print(json.dumps({"seconds": time.perf_counter() - t0, "modules": len(pairs)}))
    else:
        raise SystemExit(f"unknown job {job}")


def measure(cmd: list[str]) -> tuple[float, int, dict]:
    """Run ``cmd``; returns (wall seconds, peak RSS bytes, parsed last JSON line or {})."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this child's own rusage; read the pipes in between so it cannot block.
    out_chunks = []
    err_chunks = []
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    sel.register(proc.stderr, selectors.EVENT_READ)  # type: ignore[arg-type]
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            data = key.fileobj.read1(1 << 16)  # type: ignore[union-attr]
            if not data:
                sel.unregister(key.fileobj)
                open_streams -= 1
            elif key.fileobj is proc.stdout:
                out_chunks.append(data)
            else:
                err_chunks.append(data)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = b"".join(err_chunks).decode(errors="replace")
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    lines = b"".join(out_chunks).decode().strip().splitlines()
    info = {}
    if lines and lines[-1].startswith("{"):
        info = json.loads(lines[-1])
    return wall, usage.ru_maxrss * 1024, info


def settle() -> None:
    os.sync()
    time.sleep(1.0)


# ------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=HERE / "out" / "merge")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1:])
        return

    # This process stays small and never imports torch: a child's ru_maxrss starts from its
    # parent's RSS at fork, so a fat parent would inflate every measurement.
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    _, _, built = measure(me + ["build", str(a.dir), str(a.layers)])
    paths = {k: Path(v) for k, v in built.items()}
    lora, base = paths["lora"], paths["base"]
    adapter = lora / "adapter_model.safetensors"
    work = a.dir / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    warm([base, lora, paths["pretrain"]])
    outs = {"ours": work / "llava-bench-merged", "cli": work / "llava-bench-cli-merged",
            "peft": work / "peft-merged", "cp": work / "cp-base"}
    jobs = {
        "ours": lambda: me + ["ours", str(lora), str(base), str(outs["ours"])],
        "ours (CLI)": lambda: [sys.executable, "-m", "llava_doctor", "merge", str(lora), "--base",
                               str(base), "--out", str(outs["cli"]), "--quiet"],
        "peft": lambda: me + ["peft", str(lora), str(base), str(outs["peft"])],
        "cp -r": lambda: ["cp", "-r", str(base), str(outs["cp"])],
        "B @ A": lambda: me + ["matmul", str(adapter)],
    }
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in jobs}
    device = "cpu"
    for rep in range(a.repeat):
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        for name, cmd in jobs.items():
            settle()
            wall, rss, info = measure(cmd())
            seconds = info.get("seconds", wall)
            device = info.get("device", device)
            results[name].append((seconds, rss))
            print(f"  run {rep + 1}/{a.repeat} {name:<11} {seconds:7.2f} s  "
                  f"{rss / 1e6:8.0f} MB", file=sys.stderr)
            if name == "peft" and rep == 0:
                spot = measure(me + ["spot", str(outs["ours"]), str(outs["peft"])])[2]

    med = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    rss = {k: max(r for _, r in v) for k, v in results.items()}
    floor = max(med["cp -r"], med["B @ A"])
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    info = measure(me + ["info"])[2]
    gpu = info["gpu"]
    print(f"\nmerge benchmark: base {dir_bytes(base) / 1e9:.2f} GB fp16 ({a.layers} layers, "
          f"hidden 2048, intermediate 5504), adapter {adapter.stat().st_size / 1e6:.0f} MB "
          f"(r=128 on all 7 linear layers), median of {a.repeat}")
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.0f} GB RAM, "
          f"GPU: {gpu}; merge device: {device}; torch {info['torch']}")
    print(f"\n{'job':<12} {'time s':>8} {'x floor':>8} {'peak RSS':>10}")
    for k in jobs:
        print(f"{k:<12} {med[k]:8.2f} {med[k] / floor:8.2f} {rss[k] / 1e6:7.0f} MB")
    print(f"\nlarger floor: {'cp -r' if med['cp -r'] >= med['B @ A'] else 'B @ A'} "
          f"({floor:.2f} s)")
    checks = [
        ("ours <= 1.5x the larger floor", med["ours"] / floor, med["ours"] <= 1.5 * floor,
         f"{med['ours'] / floor:.2f}x"),
        ("ours >= 2x faster than peft", med["peft"] / med["ours"], med["peft"] >= 2 * med["ours"],
         f"{med['peft'] / med['ours']:.2f}x faster"),
        ("ours peak RSS <= 1/4 of peft's", rss["ours"] / rss["peft"],
         rss["ours"] * 4 <= rss["peft"], f"{rss['ours'] / rss['peft']:.2f} of peft's"),
    ]
    for label, _, ok, shown in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}: {shown}")
    print(f"spot check, ours vs peft's output on {spot['tensors']} LoRA-merged tensors: max "
          f"|difference| {spot['max_diff']:.3g} (peft adds in float16, we round once)")


def spot_check(ours: Path, peft_out: Path) -> tuple[int, float]:
    """Largest difference between our output and peft's on a few LoRA-merged tensors."""
    from safetensors import safe_open

    index = json.loads((ours / "model.safetensors.index.json").read_text())["weight_map"]
    pindex_path = peft_out / "model.safetensors.index.json"
    pmap = (json.loads(pindex_path.read_text())["weight_map"] if pindex_path.is_file()
            else None)
    names = [n for n in index if n.endswith(("q_proj.weight", "down_proj.weight"))][:4]
    worst = 0.0
    for n in names:
        with safe_open(str(ours / index[n]), framework="pt") as f:
            a = f.get_tensor(n).float()
        pfile = peft_out / (pmap[n] if pmap else "model.safetensors")
        with safe_open(str(pfile), framework="pt") as f:
            b = f.get_tensor(n).float()
        worst = max(worst, float((a - b).abs().max()))
    return len(names), worst


if __name__ == "__main__":
    main()
