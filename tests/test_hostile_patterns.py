"""Hostile regexes in adapter_config.json end `check`, `fix` and `merge` quickly with a finding.

Whole `llava-doctor` processes, as a CI gate would run them on an untrusted artifact: each
catastrophic pattern of the corpus (tests/hostile_patterns.py) must end `check --fast` in under
5 s with LD210 naming the field and the pattern, and exit 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_patterns import CATASTROPHIC, INVALID, ISSUE_PATTERN, PATTERNS, HostilePattern

from llava_doctor.artifacts.bounded_re import shorten
from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks

WHOLE_PROCESS_S = 5.0


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "llava_doctor", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _victim(scenarios: dict[str, Path], tmp_path: Path, hp: HostilePattern) -> Path:
    d = tmp_path / "llava-v1.5-hostile-lora"
    shutil.copytree(scenarios["lora"], d)
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    hp.edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    return d


def test_corpus_has_the_issue_pattern_and_five_more() -> None:
    assert CATASTROPHIC[0].pattern == ISSUE_PATTERN
    assert len(CATASTROPHIC) >= 6
    assert {p.technique for p in PATTERNS} == {"nested-quantifier", "alternation", "polynomial",
                                               "huge", "invalid"}


@pytest.mark.parametrize("hp", CATASTROPHIC, ids=[p.name for p in CATASTROPHIC])
def test_check_ends_within_5s_with_ld210(scenarios: dict[str, Path], tmp_path: Path,
                                         hp: HostilePattern) -> None:
    d = _victim(scenarios, tmp_path, hp)
    t0 = time.monotonic()
    r = _cli("check", str(d), "--base", str(scenarios["base-vicuna"]), "--fast",
             "--format", "json")
    took = time.monotonic() - t0
    assert took < WHOLE_PROCESS_S, f"{took:.2f} s"
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    ld210 = [f for f in rep["findings"] if f["code"] == "LD210"]
    assert len(ld210) == 1, rep["findings"]
    f = ld210[0]
    assert f["severity"] == "error"
    assert f["evidence"]["field"] == hp.field
    assert f["evidence"]["status"] == "over-budget"
    assert f"the {hp.field} pattern {shorten(hp.pattern)} did not finish within 1 s" \
        in f["message"]
    assert "peft evaluates it with Python's re on the same names and would hang on it too" \
        in f["message"]
    assert not [x for x in rep["findings"] if x["code"] == "LD000"]
    # the checks that need the pattern say why they did not run
    skipped = {c["code"]: c["reason"] for t in rep["targets"] for c in t["checks"]
               if c["status"] == "skipped"}
    needs = {"rank_pattern": "LD203", "alpha_pattern": "LD203"}.get(hp.field, "LD202")
    assert "(LD210)" in skipped[needs] and "did not finish" in skipped[needs]


@pytest.mark.parametrize("hp", INVALID, ids=[p.name for p in INVALID])
def test_invalid_patterns_are_reported_as_peft_fails(scenarios: dict[str, Path], tmp_path: Path,
                                                      hp: HostilePattern) -> None:
    d = _victim(scenarios, tmp_path, hp)
    rep = run_checks([d], Options(base=scenarios["base-vicuna"], fast=True))
    assert not [f for f in rep.findings if f.code in ("LD000", "LD210")], rep.findings
    got = [f for f in rep.findings if f.code == hp.expect]
    assert len(got) == 1, rep.findings
    assert "not a valid regular expression" in got[0].message
    assert "re.error" in got[0].message


def test_fix_is_bounded_too(scenarios: dict[str, Path], tmp_path: Path) -> None:
    d = _victim(scenarios, tmp_path, CATASTROPHIC[0])
    before = (d / "adapter_config.json").read_bytes()
    t0 = time.monotonic()
    r = _cli("fix", str(d), "--base", str(scenarios["base-vicuna"]), "--dry-run")
    # `fix` reads values and plans as well (seconds on a loaded machine); without the bound
    # it would not end at all
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "LD210" in r.stdout
    assert (d / "adapter_config.json").read_bytes() == before


def test_merge_refuses_with_the_finding(scenarios: dict[str, Path], tmp_path: Path) -> None:
    d = _victim(scenarios, tmp_path, CATASTROPHIC[0])
    out = tmp_path / "merged"
    r = _cli("merge", str(d), "--base", str(scenarios["base-vicuna"]), "--out", str(out),
             "--quiet")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "LD210" in r.stdout and "pattern-over-budget" in r.stdout
    assert not out.exists()


def test_merge_force_still_refuses_a_rank_key_over_budget(scenarios: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """--force merges past findings, but the scaling of each module needs the rank keys."""
    hp = next(p for p in CATASTROPHIC if p.field == "rank_pattern")
    d = _victim(scenarios, tmp_path, hp)
    out = tmp_path / "merged"
    t0 = time.monotonic()
    r = _cli("merge", str(d), "--base", str(scenarios["base-vicuna"]), "--out", str(out),
             "--quiet", "--force")
    assert time.monotonic() - t0 < 20
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "the rank_pattern pattern" in r.stderr and "(LD210)" in r.stderr
    assert not out.exists()


def test_huge_lists_and_many_patterns_are_bounded(scenarios: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """A 300,000-entry target_modules list is matched in time bounded by the module names; a
    config with thousands of rank keys is one LD210 finding, not thousands of regex scans."""
    d = tmp_path / "llava-v1.5-lists-lora"
    shutil.copytree(scenarios["lora"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = [f"x{i}_proj" for i in range(300_000)] + ["q_proj"]
    cfg["exclude_modules"] = [f"y{i}_proj" for i in range(300_000)]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    rep = run_checks([d], Options(base=scenarios["base-vicuna"], fast=True))
    assert time.monotonic() - t0 < WHOLE_PROCESS_S
    codes = {f.code for f in rep.findings}
    assert "LD000" not in codes and "LD210" not in codes
    # the adapter holds k/v/o/... keys the list no longer targets: LD207 still sees that
    assert "LD207" in codes
    cfg["rank_pattern"] = {f"layers\\.{i}\\.q_proj": 4 for i in range(5000)}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    rep = run_checks([d], Options(base=scenarios["base-vicuna"], fast=True))
    assert time.monotonic() - t0 < WHOLE_PROCESS_S
    ld210 = [f for f in rep.findings if f.code == "LD210"]
    assert len(ld210) == 1
    assert "the config holds 5,000 patterns (more than 1,000)" in ld210[0].message
