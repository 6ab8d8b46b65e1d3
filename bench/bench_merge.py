"""The whole `llava-doctor merge` command against the floors no merge can beat, and against peft.

Builds once (under --dir) a llama-shaped fp16 base of about 1 GB with real random weights
(hidden 2048, intermediate 5504, 8 layers, vocab 32000, 3 safetensors shards), a stage-1
projector and a LLaVA LoRA run on it with an adapter on every linear layer (r=128, alpha=256,
bf16, like finetune_lora.sh), then runs R rounds; each round runs every job once, each in a
fresh process, in an order that rotates from round to round (paired runs: a round's jobs share
the machine's load of that moment):

  ours   `python -m llava_doctor merge LORA --base BASE --out OUT --quiet`: the whole command
         (interpreter, imports, checks, plan, merge, fsync, verification, install)
  peft   a process that imports transformers+peft and runs from_pretrained -> PeftModel ->
         merge_and_unload -> save_pretrained (safetensors)
  cp -r  copy of the base directory: the I/O floor (read and write every byte once)
  B @ A  a process that imports torch, loads the adapter and computes every module's float32
         B @ A: the compute floor
  (--no-verify-job) the command with --no-verify: what the verification costs

Every job is timed the same way, as /usr/bin/time would: wall clock from spawn to exit, and the
peak RSS of that process (ru_maxrss from os.wait4, by a parent that never imports torch, since
a child's ru_maxrss starts from its parent's RSS at fork). Before each job: `sync` (so one job's
write-back does not land on the next), a second's pause, and the inputs read once more (so
they are in the page cache). Reported: medians over
the rounds, and the median of the per-round ratios (the paired figure, steadier on a shared
machine). A spot check compares every tensor of our output with peft's.

--profile prints where the command's time goes instead: wall time per phase of one whole
command (interpreter start, imports, checks, plan, merge loop, side files, verification),
median over --repeat runs.

--family llava-hf builds and measures a llava-hf run of the same scale instead (written by
transformers and peft: `LlavaForConditionalGeneration` + a peft adapter); other runs (a real
model): --lora DIR --base DIR skip the build. The peft job loads the base with the class its
config.json names.

Every Python job (ours included) ends with os._exit once its output is flushed, so no job is
timed for interpreter teardown (0.3-0.8 s once torch is loaded).

--shape 7b --device cuda is the GPU run (bench/gpu_merge.sh): a llama-7b-shaped model, every job
on the GPU (ours --device cuda, peft with device_map, the floor's B @ A), each output deleted
once measured.

Usage: python bench/bench_merge.py [--dir bench/out/merge] [--repeat 5] [--layers 8]
                                   [--family llava|llava-hf] [--shape bench|7b] [--device cpu]
                                   [--lora DIR --base DIR] [--profile] [--skip-peft]
                                   [--no-verify-job] [--before SRC]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------ inputs
# Text-model shapes: the 2-core bench model (--layers deep) and a 7B llama (--shape 7b, 13.5 GB
# in fp16: for a GPU machine's disk and memory, not this one's).
SHAPES = {"bench": {"hidden": 2048, "intermediate": 5504, "heads": 16, "shards": 3},
          "7b": {"hidden": 4096, "intermediate": 11008, "heads": 32, "shards": 3}}


def build(root: Path, layers: int, shape: str = "bench") -> dict[str, Path]:
    from llava_doctor.fixtures.builder import Dims, build_base, build_lora, build_pretrain

    paths = {"base": root / "vicuna-bench", "pretrain": root / "llava-bench-pretrain",
             "lora": root / "llava-bench-lora"}
    marker = root / f".complete-{shape}-{layers}"
    if marker.exists():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sh = SHAPES[shape]
    dims = Dims(hidden=sh["hidden"], intermediate=sh["intermediate"], layers=layers,
                heads=sh["heads"], kv_heads=sh["heads"], vocab=32000, mm_hidden=1024)
    print(f"building a {layers}-layer {shape} base, projector and r=128 adapter under {root} ...",
          file=sys.stderr)
    build_base(paths["base"], dims, shards=sh["shards"])
    build_pretrain(paths["pretrain"], dims, base=paths["base"])
    build_lora(paths["lora"], dims, base=paths["base"], r=128, alpha=256,
               projector_from=paths["pretrain"], peft_version="0.10.0")
    marker.touch()
    return paths


def build_hf(root: Path, layers: int, shape: str = "bench") -> dict[str, Path]:
    """A llava-hf run at the same scale, written by transformers and peft themselves: a
    `LlavaForConditionalGeneration` (the bench's Llama text model, a 4-layer CLIP-L-shaped
    tower at 336 px, the mlp2x_gelu projector) saved in fp16 by `save_pretrained`, and a peft
    adapter on every linear layer of the language model (r=128, alpha=256, saved in bf16, as
    TRL / LLaMA-Factory runs with a frozen tower and projector leave it)."""
    paths = {"base": root / "llava-hf-bench", "lora": root / "llava-hf-bench-lora"}
    marker = root / f".complete-{shape}-{layers}"
    if marker.exists():
        return paths
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"building a {layers}-layer llava-hf base and r=128 adapter under {root} ...",
          file=sys.stderr)
    torch.manual_seed(0)
    sh = SHAPES[shape]
    text = LlamaConfig(vocab_size=32064, hidden_size=sh["hidden"],
                       intermediate_size=sh["intermediate"], num_hidden_layers=layers,
                       num_attention_heads=sh["heads"], num_key_value_heads=sh["heads"],
                       pad_token_id=32001)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                                      image_token_index=32000))
    model = model.half()
    model.save_pretrained(paths["base"], max_shard_size="400MB")
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    pm = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05,
                                          target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: give it trained-looking values
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    pm = pm.to(torch.bfloat16)
    pm.save_pretrained(str(paths["lora"]))
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
    """Run one job in this (fresh) process; print a JSON line last."""
    if job in ("build", "build-hf"):
        root, layers, shape = Path(args[0]), int(args[1]), args[2]
        made = (build if job == "build" else build_hf)(root, layers, shape)
        print(json.dumps({k: str(v) for k, v in made.items()}))
    elif job == "info":
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(json.dumps({"torch": torch.__version__, "gpu": gpu}))
    elif job == "spot":
        print(json.dumps(spot_check(Path(args[0]), Path(args[1]), Path(args[2]))))
    elif job == "peft":
        import torch
        import transformers
        from peft import PeftModel

        lora, base, out, device = args
        arch = (json.loads((Path(base) / "config.json").read_text()).get("architectures")
                or ["AutoModelForCausalLM"])[0]
        cls = getattr(transformers, arch, transformers.AutoModelForCausalLM)
        # On a GPU, the model is loaded onto it and peft merges there, as users run it.
        on = {} if device == "cpu" else {"device_map": device}
        model = cls.from_pretrained(base, dtype=torch.float16, **on)
        model = PeftModel.from_pretrained(model, lora).merge_and_unload()
        model.save_pretrained(out)
    elif job == "matmul":
        import torch
        from safetensors.torch import load_file

        adapter, device = args
        sd = load_file(adapter, device=device)
        n = 0
        for k in sd:
            if ".lora_A." in k or ".lora_embedding_A" in k:
                b = sd[k.replace("lora_A", "lora_B").replace("lora_embedding_A",
                                                             "lora_embedding_B")]
                b.float() @ sd[k].float()
                n += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        print(json.dumps({"modules": n}))
    elif job == "phases":
        phases(*args)
    else:
        raise SystemExit(f"unknown job {job}")


def phases(lora: str, base: str, out: str) -> None:
    """The merge command's code path with a timestamp where each phase starts (seconds since
    this process started, from /proc, so interpreter start-up counts); prints the durations."""
    with open("/proc/self/stat") as f:
        started = float(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        offset = float(f.read().split()[0]) - started - time.monotonic()
    marks: list[tuple[str, float]] = [("interpreter start-up", 0.0)]

    def mark(name: str) -> None:
        marks.append((name, time.monotonic() + offset))

    mark("(bench harness imports, not counted)")
    import llava_doctor.cli  # noqa: F401  (what `python -m llava_doctor merge` imports)
    from llava_doctor.commands import merge as merge_cmd

    mark("import llava_doctor.cli (typer, pydantic models, renderers)")
    import llava_doctor.merge as lm

    mark("import llava_doctor.merge")
    from llava_doctor.merge import stream

    executor_run = stream.Executor.run

    def run(self: stream.Executor) -> dict[str, str]:
        mark("import torch (first thing the executor does)")
        return executor_run(self)

    stream.Executor.run = run  # type: ignore[method-assign]
    names = {"checks": "checks before the merge", "plan": "planning from headers",
             "write": "merge loop (read, compute, write, read back, hash, fsync)",
             "finalize": "side files (index, config, generation config, tokenizer)",
             "verify": "verification (headers, hashes, sampled recomputation) + install",
             "done": "summary"}
    seen: set[str] = set()

    def observe(ev: stream.MergeEvent) -> None:
        if ev.phase in names and ev.phase not in seen:
            seen.add(ev.phase)
            mark(names[ev.phase])

    mark("merge(): arguments, stale partial dirs, device")
    r = lm.merge(lora, base, out, observer=observe)
    merge_cmd.render_summary(r, Path(lora))
    mark("end")
    rows = [(name, t2 - t) for (name, t), (_, t2) in zip(marks, marks[1:], strict=False)]
    print(json.dumps({"phases": rows}))


def measure(cmd: list[str], src: Path | None = None) -> tuple[float, int, dict, float]:
    """Run ``cmd`` as /usr/bin/time would: (wall seconds from spawn to exit, peak RSS bytes of
    that process, its last stdout line parsed as JSON or {}, its user+system CPU seconds).
    ``src``: run llava_doctor from that source tree (PYTHONPATH) instead."""
    import selectors

    t0 = time.perf_counter()
    env = None
    if src is not None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(src), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # wait4 gives this child's own rusage; read the pipes in between so it cannot block.
    out_chunks = []
    err_chunks = []
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
    return wall, usage.ru_maxrss * 1024, info, usage.ru_utime + usage.ru_stime


def settle(inputs: list[Path]) -> None:
    """Before each job: earlier writes flushed, a second's pause, then every input read once
    more, so each job starts with its inputs in the page cache. The bench VM runs DAMON's
    `pageout` scheme (cold memory reclaimed, up to 128 MB/s): left idle, the base drifted out of
    the cache between jobs, and only the jobs that read it (ours, cp -r, peft; not B @ A) paid."""
    os.sync()
    time.sleep(1.0)
    warm(inputs)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    try:
        load = " load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        load = ""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return f"{os.cpu_count()} CPUs ({cpu}), {ram:.0f} GB RAM,{load}"


# ------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=HERE / "out" / "merge")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None,
                    help="text model depth (default: 8 for --shape bench, 32 for 7b)")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="bench",
                    help="bench: hidden 2048 (about 1 GB at 8 layers); 7b: a llama-7b-shaped "
                         "model (13.5 GB: a GPU machine's run)")
    ap.add_argument("--device", default="cpu",
                    help="where ours (--device), peft (device_map) and the B @ A floor compute: "
                         "cpu or cuda")
    ap.add_argument("--family", choices=("llava", "llava-hf"), default="llava",
                    help="build an original LLaVA run (default) or a llava-hf one")
    ap.add_argument("--lora", type=Path, help="an existing LoRA run (skips the build)")
    ap.add_argument("--base", type=Path, help="its base model (with --lora)")
    ap.add_argument("--profile", action="store_true", help="phase breakdown of the command")
    ap.add_argument("--skip-peft", action="store_true", help="leave out the peft job")
    ap.add_argument("--no-verify-job", action="store_true",
                    help="also run the command with --no-verify (no read-back, no sampled "
                         "recomputation; the sha256 stays): what verification costs")
    ap.add_argument("--before", type=Path, help="another llava_doctor source tree (a src/ "
                    "dir, e.g. from `git archive`) to run in the same rounds as 'before'")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.layers is None:
        a.layers = 32 if a.shape == "7b" else 8
    if a.child:
        child(a.child[0], a.child[1:])
        # Every job ends the way `llava-doctor` does: streams flushed, then no interpreter
        # teardown (0.3-0.8 s once torch is loaded), so no job is timed for its teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    if a.lora is not None:
        if a.base is None:
            raise SystemExit("--lora needs --base")
        lora, base = a.lora.resolve(), a.base.resolve()
        extra: list[Path] = []
    else:
        hf = a.family == "llava-hf"
        root = a.dir.with_name(a.dir.name + ("-hf" if hf else "")
                               + ("" if a.shape == "bench" else f"-{a.shape}"))
        built = measure(me + ["build-hf" if hf else "build", str(root), str(a.layers),
                              a.shape])[2]
        paths = {k: Path(v) for k, v in built.items()}
        lora, base = paths["lora"], paths["base"]
        extra = [p for k, p in paths.items() if k not in ("lora", "base")]
    adapter = lora / "adapter_model.safetensors"
    work = a.dir / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    warm([base, lora, *extra])
    if a.profile:
        profile(me, lora, base, work, a.repeat, a.before)
        return

    outs = {"ours": work / "llava-bench-merged", "peft": work / "peft-merged",
            "cp -r": work / "cp-base"}
    # `-m llava_doctor` runs the sources on PYTHONPATH or the installed package, as a user would.
    jobs = {
        "ours": [sys.executable, "-m", "llava_doctor", "merge", str(lora), "--base", str(base),
                 "--device", a.device, "--out", str(outs["ours"]), "--quiet"],
        "cp -r": ["cp", "-r", str(base), str(outs["cp -r"])],
        "B @ A": me + ["matmul", str(adapter), a.device],
        "peft": me + ["peft", str(lora), str(base), str(outs["peft"]), a.device],
    }
    srcs: dict[str, Path] = {}
    if a.before is not None:
        outs["before"] = work / "llava-bench-before"
        jobs["before"] = [*jobs["ours"][:-2], str(outs["before"]), "--quiet"]
        srcs["before"] = a.before.resolve()
    if a.no_verify_job:
        outs["ours --no-verify"] = work / "llava-bench-unverified"
        jobs["ours --no-verify"] = [*jobs["ours"][:-2], str(outs["ours --no-verify"]),
                                    "--quiet", "--no-verify"]
    if a.skip_peft:
        del jobs["peft"]
    names = list(jobs)
    results: dict[str, list[tuple[float, int, float]]] = {k: [] for k in jobs}
    spot: dict | None = None
    print(f"machine: {machine()}", file=sys.stderr)
    for rep in range(a.repeat):
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        order = list(names)
        random.Random(rep).shuffle(order)  # each round its own order and neighbours
        for name in order:
            settle([base, lora, *extra])
            wall, rss, _, cpu = measure(jobs[name], srcs.get(name))
            results[name].append((wall, rss, cpu))
            print(f"  round {rep + 1}/{a.repeat} {name:<6} {wall:7.2f} s  {cpu:7.2f} s CPU "
                  f"{rss / 1e6:8.0f} MB", file=sys.stderr)
            # Outputs go as soon as they are measured (a 7b run's are 13.5 GB each); ours and
            # peft's stay until the spot check has compared them, once.
            waiting = spot is None and "peft" in jobs
            if name in outs and not (waiting and name in ("ours", "peft")):
                shutil.rmtree(outs[name], ignore_errors=True)
            if waiting and outs["ours"].is_dir() and outs["peft"].is_dir():
                spot = measure(me + ["spot", str(outs["ours"]), str(outs["peft"]),
                                     str(base)])[2]
                for done in ("ours", "peft"):
                    shutil.rmtree(outs[done], ignore_errors=True)
    report(results, spot, base, adapter, a, measure(me + ["info"])[2])


def report(results: dict[str, list[tuple[float, int, float]]], spot: dict | None, base: Path,
           adapter: Path, a: argparse.Namespace, info: dict) -> None:
    med = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    rss = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r[2] for r in v) for k, v in results.items()}
    n = len(results["ours"])
    floors = [max(results["cp -r"][i][0], results["B @ A"][i][0]) for i in range(n)]
    floor = max(med["cp -r"], med["B @ A"])
    paired_floor = statistics.median(results["ours"][i][0] / floors[i] for i in range(n))
    sh = SHAPES[a.shape]
    what = (f"built: {a.family}, {a.layers} layers, hidden {sh['hidden']}, intermediate "
            f"{sh['intermediate']}" if a.lora is None else str(base))
    print(f"\nmerge benchmark: base {dir_bytes(base) / 1e9:.2f} GB ({what}), adapter "
          f"{adapter.stat().st_size / 1e6:.0f} MB; median of {n} rounds, whole processes")
    print(f"machine: {machine()}; GPU: {info.get('gpu')}; torch {info.get('torch')}; "
          f"device: {a.device}")
    print("\n| job | wall s | x larger floor | CPU s (user+sys) | peak RSS |\n"
          "|---|---:|---:|---:|---:|")
    for k in results:
        print(f"| {k} | {med[k]:.2f} | {med[k] / floor:.2f} | {cpu[k]:.2f} | "
              f"{rss[k] / 1e6:.0f} MB |")
    print(f"\nlarger floor: {'cp -r' if med['cp -r'] >= med['B @ A'] else 'B @ A'} "
          f"({floor:.2f} s); per round: "
          + ", ".join(f"{results['ours'][i][0]:.2f}/{floors[i]:.2f}" for i in range(n)))
    checks = [("whole command <= 1.3x the larger floor (median of the paired ratios)",
               paired_floor <= 1.3, f"{paired_floor:.2f}x (ratio of medians "
               f"{med['ours'] / floor:.2f}x)")]
    if "peft" in results:
        paired_peft = statistics.median(results["peft"][i][0] / results["ours"][i][0]
                                        for i in range(n))
        checks += [
            ("whole command >= 2.5x faster than peft (paired)", paired_peft >= 2.5,
             f"{paired_peft:.2f}x (ratio of medians {med['peft'] / med['ours']:.2f}x)"),
            ("peak RSS <= 1/4 of peft's", rss["ours"] * 4 <= rss["peft"],
             f"{rss['ours'] / rss['peft']:.2f} of peft's")]
    for label, ok, shown in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}: {shown}")
    if spot is not None:
        print(f"spot check, every tensor of ours vs peft's output: {spot['tensors']} tensors "
              f"({spot['merged']} changed by the merge), max |difference| {spot['max_diff']:.3g}, "
              f"{spot['differing']} differing elements; missing in peft's: {spot['missing']}")


def profile(me: list[str], lora: Path, base: Path, work: Path, repeat: int,
            before: Path | None) -> None:
    trees: dict[str, Path | None] = {"now": None}
    if before is not None:
        trees = {"before": before.resolve(), "now": None}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    print(f"machine: {machine()}", file=sys.stderr)
    for rep in range(repeat):
        order = list(trees.items())
        random.Random(rep).shuffle(order)
        for name, src in order:  # paired: both trees in each round, in turn first
            out = work / "llava-bench-profile"
            shutil.rmtree(out, ignore_errors=True)
            settle([base, lora])
            wall, _, info, _ = measure(me + ["phases", str(lora), str(base), str(out)], src)
            runs[name].append(dict(info["phases"]))
            print(f"  round {rep + 1}/{repeat} {name}: {wall:.2f} s", file=sys.stderr)
    skip = "(bench harness imports, not counted)"
    labels: list[str] = []
    for rs in runs.values():
        labels += [k for k in rs[0] if k not in labels and k != skip]
    meds = {name: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in labels}
            for name, rs in runs.items()}
    print(f"\n| phase of `llava-doctor merge` (median of {repeat}) | "
          + " | ".join(f"{n} s | share" for n in trees) + " |")
    print("|---|" + "---:|---:|" * len(trees))
    totals = {n: sum(meds[n].values()) for n in trees}
    for k in labels:
        print(f"| {k} | " + " | ".join(f"{meds[n][k]:.2f} | {meds[n][k] / totals[n]:.0%}"
                                      for n in trees) + " |")
    print("| whole command | " + " | ".join(f"{totals[n]:.2f} | " for n in trees) + "|")


def spot_check(ours: Path, peft_out: Path, base: Path) -> dict:
    """Every tensor of our output against peft's (as float32): the largest difference; and how
    many of them the merge changed (differ from the base's tensor of that name)."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.is_file():
            return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            return {k: d / "model.safetensors" for k in f.keys()}  # noqa: SIM118

    def by_canonical_name(files: dict[str, Path]) -> dict[str, tuple[str, Path]]:
        # llava-hf outputs: peft saves in its transformers' layout, we in the canonical one.
        from llava_doctor.artifacts.hf_layout import detect_layout, to_canonical

        layout = detect_layout(files)
        return {(to_canonical(k, layout) if layout is not None else k): (k, p)
                for k, p in files.items()}

    mine, theirs = by_canonical_name(tensors(ours)), by_canonical_name(tensors(peft_out))
    based = by_canonical_name(tensors(base))
    adapter_keys = set()
    worst, differing, merged = 0.0, 0, 0
    for name, (key, path) in sorted(mine.items()):
        if name not in theirs:
            continue
        with safe_open(str(path), framework="pt") as f:
            a = f.get_tensor(key)
        their_key, their_path = theirs[name]
        with safe_open(str(their_path), framework="pt") as f:
            b = f.get_tensor(their_key)
        if a.shape != b.shape:
            worst = float("inf")
            continue
        d = (a.float() - b.float()).abs()
        worst = max(worst, float(d.max())) if d.numel() else worst
        differing += int((d != 0).sum())
        if name in based:
            base_key, base_path = based[name]
            with safe_open(str(base_path), framework="pt") as f:
                merged += not torch.equal(a, f.get_tensor(base_key))
        adapter_keys.add(name)
    missing = sorted(set(mine) - set(theirs))
    return {"tensors": len(adapter_keys), "merged": merged, "max_diff": worst,
            "differing": differing, "missing": missing[:5] + (["..."] if len(missing) > 5 else [])}


if __name__ == "__main__":
    main()
