"""LD1xx and LD5xx on the standard scenarios: exact codes and paths, no false alarms."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.models import Report, Severity

FOUNDATION = ["LD1", "LD5"]


def run(path: Path, base: Path | None = None, **kw: object) -> Report:
    return run_checks([path], Options(base=base, **kw), select=FOUNDATION)  # type: ignore[arg-type]


def codes(report: Report) -> list[tuple[str, str]]:
    """(code, path relative to its target) for every finding: "." is the target itself."""
    return [(f.code, str(Path(f.path).relative_to(f.target))) for f in report.findings]


@pytest.mark.parametrize("name", ["lora", "lora-bin", "task-lora", "checkpoints-final"])
def test_healthy_runs_have_no_foundation_findings(scenarios: dict[str, Path], name: str) -> None:
    rep = run(scenarios[name], scenarios["base-vicuna"])
    assert rep.findings == []
    assert rep.exit_code() == 0


@pytest.mark.parametrize("scenario,code,filename", [
    ("LD101-no-config", "LD101", "config.json"),
    ("LD102-only-non-lora", "LD102", "."),
    ("LD103-no-adapter-config", "LD103", "adapter_config.json"),
    ("LD104-checkpoint-no-non-lora", "LD104", "non_lora_trainables.bin"),
    ("LD105-empty-adapter", "LD105", "adapter_model.safetensors"),
    ("LD105-zero3-shapes", "LD105", "adapter_model.safetensors"),
    ("LD107-pretrain-dir", "LD107", "."),
    ("LD108-bin-and-safetensors", "LD108", "adapter_model.bin"),
    ("LD501-truncated-safetensors", "LD501", "adapter_model.safetensors"),
    ("LD502-malicious-pickle", "LD502", "non_lora_trainables.bin"),
    ("LD503-fp16-overflow", "LD503", "adapter_model.safetensors"),
    ("LD504-lfs-pointer", "LD504", "adapter_model.safetensors"),
])
def test_each_failure_mode_gives_its_code(scenarios: dict[str, Path], scenario: str, code: str,
                                          filename: str) -> None:
    rep = run(scenarios[scenario], scenarios["base-vicuna"])
    assert (code, filename) in codes(rep), rep.findings
    assert rep.exit_code(fail_on=Severity.warning) == 1


def test_only_non_lora_is_ld102_not_a_crash(scenarios: dict[str, Path]) -> None:
    rep = run(scenarios["LD102-only-non-lora"])
    got = {f.code for f in rep.findings}
    assert "LD102" in got and "LD000" not in got
    msg = next(f.message for f in rep.findings if f.code == "LD102")
    assert "non_lora_trainables.bin" in msg and "not the LoRA" in msg


def test_checkpoint_config_fix_points_at_parent(scenarios: dict[str, Path]) -> None:
    rep = run(scenarios["checkpoint-50"], scenarios["base-vicuna"])
    f101 = next(f for f in rep.findings if f.code == "LD101")
    assert f101.fix.value == "safe"
    assert f101.evidence["copy_from"] == str(scenarios["checkpoints-final"] / "config.json")
    f104 = next(f for f in rep.findings if f.code == "LD104")
    assert f104.fix.value == "unsafe"


def test_loader_name_dispatch(scenarios: dict[str, Path], tmp_path: Path) -> None:
    rep = run(scenarios["LD106-name-without-lora"])
    f = next(f for f in rep.findings if f.code == "LD106")
    assert f.evidence == {"model_name": "llava-v1.5-tiny-finetune", "branch": "projector-only"}
    # a checkpoint under a run named without llava: "<parent>_<checkpoint-N>" as LLaVA computes it
    rep = run(scenarios["checkpoint-50"])
    assert not [f for f in rep.findings if f.code == "LD106"]


def test_malicious_pickle_never_runs(scenarios: dict[str, Path]) -> None:
    from llava_doctor.fixtures import canary_path

    target = scenarios["LD502-malicious-pickle"]
    canary = canary_path(target)
    assert not canary.exists()
    proc = subprocess.run([sys.executable, "-m", "llava_doctor", "check", str(target)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "LD502" in proc.stdout and "Traceback" not in proc.stderr
    assert not canary.exists()


def test_truncation_at_every_byte_is_ld501(scenarios: dict[str, Path], tmp_path: Path) -> None:
    """Every truncation point of a small adapter: LD501, never a crash (LD000) or a hang."""
    import shutil

    src = scenarios["lora"]
    blob = (src / "adapter_model.safetensors").read_bytes()
    d = tmp_path / "llava-trunc-lora"
    shutil.copytree(src, d)
    step = max(1, len(blob) // 400)  # every byte of the header region, then a stride of the data
    cuts = sorted(set(range(0, min(len(blob), 2048))) | set(range(0, len(blob), step)))
    for cut in cuts:
        (d / "adapter_model.safetensors").write_bytes(blob[:cut])
        rep = run_checks([d], Options(fast=True), select=["LD501", "LD105"])
        got = [f.code for f in rep.findings]
        assert "LD501" in got and "LD000" not in got, (cut, got)


def test_lfs_pointer_message(scenarios: dict[str, Path]) -> None:
    rep = run(scenarios["LD504-lfs-pointer"])
    f = next(f for f in rep.findings if f.code == "LD504")
    assert "git lfs pull" in f.message


def test_fast_skips_value_checks(scenarios: dict[str, Path]) -> None:
    rep = run(scenarios["LD503-fp16-overflow"], fast=True)
    assert "LD503" not in {f.code for f in rep.findings}
    outcome = next(o for o in rep.targets[0].checks if o.code == "LD503")
    assert outcome.status.value == "skipped" and "--fast" in (outcome.reason or "")


def test_crashing_check_becomes_ld000(scenarios: dict[str, Path], monkeypatch) -> None:
    from llava_doctor.checks.base import REGISTRY, all_checks

    all_checks()
    spec = REGISTRY["LD103"]

    def boom(ctx):
        raise KeyError("synthetic")

    monkeypatch.setitem(REGISTRY, "LD103", spec.__class__(**{**spec.__dict__, "fn": boom}))
    rep = run(scenarios["LD101-no-config"])
    assert "LD000" in {f.code for f in rep.findings}
    assert "LD101" in {f.code for f in rep.findings}  # the others still ran
    assert next(o for o in rep.targets[0].checks if o.code == "LD103").status.value == "crashed"


def test_value_read_failure_is_ld501_not_a_crash(scenarios: dict[str, Path], tmp_path: Path,
                                                 ) -> None:
    """A .bin whose header walk passes but whose data cannot be read (a storage record's zip local
    header is damaged; the walk reads only the central directory and data.pkl) is reported as
    LD501, and the value check that met it is skipped, not crashed."""
    import shutil
    import zipfile

    lora = shutil.copytree(scenarios["lora"], tmp_path / "llava-v1.5-tiny-lora")
    nl = lora / "non_lora_trainables.bin"
    with zipfile.ZipFile(nl) as zf:
        member = next(i for i in zf.infolist() if "/data/" in i.filename)
    blob = bytearray(nl.read_bytes())
    assert blob[member.header_offset:member.header_offset + 4] == b"PK\x03\x04"
    blob[member.header_offset + 2:member.header_offset + 4] = b"\x00\x00"
    nl.write_bytes(bytes(blob))
    rep = run_checks([lora], Options(base=scenarios["base-vicuna"]))
    got = {(f.code, Path(f.path).name) for f in rep.findings}
    assert ("LD501", "non_lora_trainables.bin") in got
    assert "LD000" not in {c for c, _ in got}
    ld501 = next(f for f in rep.findings if f.code == "LD501")
    assert "has no zip local header at byte" in ld501.message
    ld503 = next(o for o in rep.targets[0].checks if o.code == "LD503")
    assert ld503.status.value == "skipped"
