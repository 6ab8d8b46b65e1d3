"""The figures of the README's "Guarantees" section, measured by one command.

  * malicious pickles: every technique of the test corpus (tests/malicious_pickles.py) walked by
    the reader and run through `llava-doctor check` as a non_lora_trainables.bin; how many were
    flagged and how many executed (a canary file per payload);
  * hostile regexes: every pattern of tests/hostile_patterns.py (nested quantifiers, alternation
    blow-ups, polynomial repeats, a 9 MB pattern, invalid patterns) in adapter_config.json, each
    through a whole `llava-doctor check --fast` process: flagged with the expected code and exit
    1 in under 5 s;
  * extreme numbers: every numeric config field the checks read set to every extreme value of
    tests/hostile_numbers.py, each through every check (values read): no crash, under 2 s;
  * fuzzing: bench/fuzz.py for --fuzz-seconds (inputs tried, crashes, slowest input);
  * kill points: `llava-doctor fix` and `llava-doctor merge` aborted after every write
    (LLAVA_DOCTOR_TEST_ABORT_AFTER_WRITES=N) and SIGKILLed at random moments; originals that were
    neither untouched nor fully replaced with a backup are "corrupted", and an output directory
    that exists after a killed merge without being a complete model is a "partial output".

Usage: python bench/hardening_report.py [--fuzz-seconds 60] [--random-kills 20]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from llava_doctor.errors import FileCorruptError, UnsafePickleError  # noqa: E402
from llava_doctor.fixes.apply import ABORT_ENV, ABORT_EXIT  # noqa: E402
from llava_doctor.fixtures import build_all, build_base, build_lora  # noqa: E402
from llava_doctor.fixtures.builder import TINY  # noqa: E402


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != ABORT_ENV}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "llava_doctor", *args], capture_output=True,
                          text=True, env=e)


def malicious(work: Path) -> tuple[int, int, int]:
    import malicious_pickles as mp

    from llava_doctor.artifacts.torchfile import read_torch_file

    lora_template = build_all(work / "fx")["lora"]
    tried = flagged = executed = 0
    for i, tech in enumerate(mp.TECHNIQUES):
        d = work / f"mal-{i}" / "llava-v1.5-evil-lora"
        shutil.copytree(lora_template, d)
        canary = d.parent / "CANARY"
        path = d / "non_lora_trainables.bin"
        (d.parent / "src").mkdir()
        shutil.copyfile(tech.build(d.parent / "src", canary), path)
        tried += 1
        ok = False
        try:
            read_torch_file(path)
        except (UnsafePickleError, FileCorruptError):
            ok = True
        r = cli("check", str(d), "--select", "LD5")
        cli_ok = r.returncode == 1 and ("LD502" in r.stdout or "LD501" in r.stdout)
        if not (ok and cli_ok):
            print(f"  not flagged: {tech.name} (reader raised: {ok}, check exit "
                  f"{r.returncode}: {(r.stdout + r.stderr).strip()[-200:]})", file=sys.stderr)
        flagged += ok and cli_ok
        executed += canary.exists()
    return tried, flagged, executed


def hostile_regexes(work: Path) -> tuple[int, int, float, str]:
    import json

    import hostile_patterns as hp

    paths = build_all(work / "rfx")
    tried = flagged = 0
    slowest = (0.0, "")
    for i, pat in enumerate(hp.PATTERNS):
        d = work / f"re-{i}" / "llava-v1.5-hostile-lora"
        shutil.copytree(paths["lora"], d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        pat.edit(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        t0 = time.monotonic()
        r = cli("check", str(d), "--base", str(paths["base-vicuna"]), "--fast", "--format",
                "json")
        took = time.monotonic() - t0
        tried += 1
        codes = {f["code"] for f in json.loads(r.stdout)["findings"]} \
            if r.stdout.startswith("{") else set()
        ok = r.returncode == 1 and pat.expect in codes and "LD000" not in codes and took < 5.0
        if not ok:
            print(f"  not flagged in time: {pat.name} (exit {r.returncode}, {took:.2f} s, "
                  f"codes {sorted(codes)})", file=sys.stderr)
        flagged += ok
        if took > slowest[0]:
            slowest = (took, pat.name)
    return tried, flagged, slowest[0], slowest[1]


def extreme_numbers(work: Path) -> tuple[int, int, float, str]:
    import hostile_numbers as hn

    from llava_doctor.checks.context import Options
    from llava_doctor.doctor import run_checks

    paths = build_all(work / "nfx")
    d = work / "num" / "llava-v1.5-extreme-lora"
    shutil.copytree(paths["lora"], d)
    cases = list(hn.every_case())
    cases += [("config.json", f"{field}|{tpl}", n) for field, tpl in
              hn.NUMERIC_STRINGS["config.json"] for n in hn.DEPTHS]
    bad = 0
    slowest = (0.0, "")
    for fname, field, token in cases:
        path = d / fname
        original = path.read_bytes()
        if "|" in field:
            name, tpl = field.split("|")
            path.write_text(hn.with_depth(original.decode(), name, tpl, token))
        else:
            path.write_text(hn.with_number(original.decode(), field, token))
        t0 = time.monotonic()
        try:
            rep = run_checks([d], Options(base=paths["base-vicuna"]))
            crashed = [f.message for f in rep.findings if f.code == "LD000"]
        except Exception as e:  # the property under test: never
            crashed = [f"{type(e).__name__}: {e}"]
        took = time.monotonic() - t0
        path.write_bytes(original)
        if crashed or took > 2.0:
            bad += 1
            print(f"  {fname}:{field}={token[:20]}: {crashed[:1] or f'{took:.2f} s'}",
                  file=sys.stderr)
        if took > slowest[0]:
            slowest = (took, f"{fname}:{field}={token[:12]}")
    return len(cases), bad, slowest[0], slowest[1]


def fix_kills(work: Path, random_kills: int, rng: random.Random) -> tuple[int, int]:
    name = "llava-v1.5-tiny-finetune"  # LD106 symlink, LD305 keys, LD406, LD208, LD201 fixes
    template = work / "fix-template"
    base = build_base(template / "vicuna-tiny-v1.5", TINY)
    build_lora(template / name, TINY, base=base, non_lora_style="ddp", model_type="llava",
               quantization_config=True, peft_version="0.10.0")
    files = ("adapter_config.json", "config.json", "non_lora_trainables.bin")
    originals = {f: sha(template / name / f) for f in files}

    def run(env: dict[str, str] | None, kill_after: float | None) -> tuple[bool, int]:
        root = work / f"fix-{time.monotonic_ns()}"
        shutil.copytree(template, root, symlinks=True)
        args = ["fix", str(root / name), "--base", str(root / "vicuna-tiny-v1.5"),
                "--peft-version", "0.8.0", "--yes", "--unsafe"]
        if kill_after is None:
            rc = cli(*args, env=env).returncode
        else:
            p = subprocess.Popen([sys.executable, "-m", "llava_doctor", *args],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(kill_after)
            p.send_signal(signal.SIGKILL)
            rc = p.wait()
        backups = {sha(p) for p in (root / name / ".llava-doctor").rglob("*")
                   if p.is_file() and p.name != "manifest.json"} \
            if (root / name / ".llava-doctor").exists() else set()
        corrupt = 0
        for f in files:
            now = sha(root / name / f)
            if now != originals[f] and originals[f] not in backups:
                corrupt += 1
        shutil.rmtree(root, ignore_errors=True)
        return rc == ABORT_EXIT or rc == -signal.SIGKILL, corrupt

    points = corrupted = 0
    n = 1
    while True:
        aborted, bad = run({ABORT_ENV: str(n)}, None)
        if not aborted:
            break
        points += 1
        corrupted += bad
        n += 1
    for _ in range(random_kills):
        _, bad = run(None, rng.uniform(0.3, 2.5))
        points += 1
        corrupted += bad
    return points, corrupted


def incomplete(out: Path) -> bool:
    """An output dir that exists but is not a complete model (a killed merge must leave none;
    a kill after the final rename leaves a complete one, which is fine)."""
    from llava_doctor.artifacts.model_dir import ModelDir
    from llava_doctor.errors import DoctorError

    if not out.exists():
        return False
    try:
        md = ModelDir.find(out)
    except DoctorError:
        return True
    return (md is None or bool(md.problems) or md.index_total_size != md.total_bytes
            or not (out / "config.json").is_file())


def merge_kills(work: Path, random_kills: int, rng: random.Random) -> tuple[int, int]:
    paths = build_all(work / "mfx")
    lora, base = paths["lora"], paths["base-vicuna"]
    points = partial = 0
    n = 1
    while n < 500:
        out = work / f"merged-{n}" / "llava-v1.5-tiny-merged"
        r = cli("merge", str(lora), "--base", str(base), "--out", str(out), "--quiet",
                env={ABORT_ENV: str(n)})
        if r.returncode != -signal.SIGKILL:
            break
        points += 1
        partial += incomplete(out)
        n += 1
    for i in range(random_kills):
        out = work / f"merged-r{i}" / "llava-v1.5-tiny-merged"
        p = subprocess.Popen([sys.executable, "-m", "llava_doctor", "merge", str(lora), "--base",
                              str(base), "--out", str(out), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 3.0))
        p.send_signal(signal.SIGKILL)
        if p.wait() == -signal.SIGKILL:
            points += 1
            partial += incomplete(out)
    return points, partial


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fuzz-seconds", type=float, default=60.0)
    ap.add_argument("--random-kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="llava-doctor-hardening-"))
    try:
        tried, flagged, executed = malicious(work)
        print(f"malicious pickles: {tried} tried, {flagged} flagged (LD502/LD501), "
              f"{executed} executed")
        rt, rf, rslow, rname = hostile_regexes(work)
        print(f"hostile regexes: {rt} tried, {rf} flagged in time (LD210 or the re.error "
              f"finding, exit 1), slowest whole check {rslow:.2f} s ({rname})")
        nt, nbad, nslow, nname = extreme_numbers(work)
        print(f"extreme numbers: {nt} tried, {nbad} crashes or over 2 s, slowest "
              f"{nslow * 1e3:.0f} ms ({nname})")
        fz = subprocess.run([sys.executable, str(REPO / "bench" / "fuzz.py"), "--seconds",
                             str(args.fuzz_seconds)], capture_output=True, text=True)
        lines = dict(ln.split(": ", 1) for ln in fz.stdout.splitlines() if ": " in ln)
        print(f"fuzz: {lines.get('fuzz inputs tried')} inputs tried, {lines.get('crashes')} "
              f"crashes, {lines.get('over the time limit')} over the time limit, slowest "
              f"{lines.get('slowest input')}, slowest regex input "
              f"{lines.get('slowest regex input')}")
        fp, fc = fix_kills(work, args.random_kills, rng)
        print(f"fix kill points: {fp} tried, {fc} corrupted originals")
        mp_, mpart = merge_kills(work, args.random_kills, rng)
        print(f"merge kill points: {mp_} tried, {mpart} partial outputs")
        return 0 if (executed == 0 and flagged == tried and fc == 0 and mpart == 0
                     and rf == rt and nbad == 0 and lines.get("crashes") == "0"
                     and lines.get("over the time limit") == "0") else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
