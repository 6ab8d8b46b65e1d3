"""What a new user meets first: the progress line of a long `check`, the per-target summary,
usage lines and hints."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_doctor.checks.context import CheckEvent, Options
from llava_doctor.commands.progress import CheckProgress
from llava_doctor.doctor import run_checks
from llava_doctor.models import Consumer
from llava_doctor.report.text import render_text

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- progress -----------------------------------------------------------------------------------
def _console(buf: io.StringIO):
    from rich.console import Console

    return Console(file=buf, force_terminal=True, width=120)


def test_progress_line_draws_checks_and_reads_once_the_delay_passed() -> None:
    buf = io.StringIO()
    target = Path("/runs/llava-v1.5-7b-lora")
    with CheckProgress(delay=0.0, console=_console(buf)) as bar:
        deadline = time.monotonic() + 10
        while bar._progress is None and time.monotonic() < deadline:  # the timer thread
            time.sleep(0.01)
        bar(CheckEvent(target, "check", code="LD205"))
        bar(CheckEvent(target, "read", file=target / "adapter_model.safetensors",
                       bytes_done=300_000_000, bytes_total=640_000_000))
        bar._progress.refresh()
        shown = buf.getvalue()
        bar(CheckEvent(target, "check", code="LD303"))  # back to a bar without a total
        bar._progress.refresh()
    assert "llava-v1.5-7b-lora: reading adapter_model.safetensors" in shown
    assert "300.0/640.0 MB" in shown
    assert "llava-v1.5-7b-lora: LD303" in buf.getvalue()


def test_progress_line_stays_silent_for_a_quick_run() -> None:
    buf = io.StringIO()
    with CheckProgress(delay=5.0, console=_console(buf)) as bar:
        bar(CheckEvent(Path("run"), "check", code="LD101"))
    assert buf.getvalue() == "" and bar._progress is None


def test_run_checks_reports_checks_and_reads_to_the_observer(scenarios: dict[str, Path]) -> None:
    events: list[CheckEvent] = []
    run_checks([scenarios["lora"]], Options(), select=["LD205"], observer=events.append)
    assert [e.phase for e in events[:2]] == ["target", "check"]
    reads = [e for e in events if e.phase == "read"]
    assert {e.file.name for e in reads if e.file} == {"adapter_model.safetensors",
                                                      "non_lora_trainables.bin"}
    last = reads[-1]
    assert last.bytes_done == last.bytes_total > 0


_CHILD = r"""
import sys
import llava_doctor.commands.progress as progress
progress.DELAY_S = 0.0   # every run counts as a long one
from llava_doctor.cli import main
main(sys.argv[1:])
"""


def _run_on_tty(argv: list[str]) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns (exit code, what the terminal got)."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], stdout=subprocess.DEVNULL,
                            stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_progress_on_a_terminal_and_never_with_json(scenarios: dict[str, Path]) -> None:
    lora = str(scenarios["lora"])
    # severities for llava-doctor's merge: vicuna's generation config (LD404) stops only LLaVA's
    ours = ["--merge-with", "llava-doctor"]
    code, tty = _run_on_tty(["check", lora, "--isolated", *ours])
    assert code == 0
    assert "llava-v1.5-tiny-lora:" in tty  # the transient line was drawn (and erased)
    code, tty = _run_on_tty(["check", lora, "--isolated", "--format", "json", *ours])
    assert code == 0 and tty == ""


def test_no_progress_on_a_pipe(scenarios: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, "check", str(scenarios["lora"]),
                           "--isolated", "--merge-with", "llava-doctor"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""


# --- the summary line --------------------------------------------------------------------------
def _summary(report) -> str:
    return next(ln for ln in render_text(report).splitlines() if "checks passed" in ln).strip()


def test_summary_does_not_call_an_info_finding_a_failure(scenarios: dict[str, Path]) -> None:
    # LD602 (the memory plan) is the only finding of the LD6 checks: it is information.
    rep = run_checks([scenarios["lora"]], Options(), select=["LD6"])
    assert [(f.code, f.severity.value) for f in rep.findings] == [("LD602", "info")]
    status = {o.code: o.status.value for o in rep.targets[0].checks}
    assert status == {"LD601": "skipped", "LD602": "failed"}  # LD601 needs --out
    assert _summary(rep) == "✓ 0 checks passed, 1 with info only, 1 skipped"


def test_summary_names_each_kind_of_finding(scenarios: dict[str, Path]) -> None:
    # an untrained adapter (LD204, a warning) on vicuna, for llava-doctor's merge (LD404 info)
    rep = run_checks([scenarios["lora-untrained"]], Options(consumer=Consumer.llava_doctor))
    sev = {f.code: f.severity.value for f in rep.findings}  # one finding per code here
    assert sev["LD204"] == "warning" and sev["LD404"] == "info" and sev["LD602"] == "info"
    assert "error" not in sev.values()
    warned = sum(1 for v in sev.values() if v == "warning")
    noted = sum(1 for v in sev.values() if v == "info")
    passed = sum(1 for o in rep.targets[0].checks if o.status.value == "passed")
    skipped = sum(1 for o in rep.targets[0].checks if o.status.value == "skipped")
    assert _summary(rep) == (f"✓ {passed} checks passed, {warned} with warnings, {noted} with "
                             f"info only, {skipped} skipped")
    rep = run_checks([scenarios["LD105-empty-adapter"]], Options(), select=["LD1"])
    assert {f.severity.value for f in rep.findings} == {"error"}
    assert ", 1 failed, " in _summary(rep)
    rep = run_checks([scenarios["lora"]], Options(), select=["LD1"])
    assert rep.findings == [] and ", 0 failed, " in _summary(rep)


# --- usage lines and hints -----------------------------------------------------------------------
@pytest.mark.parametrize("command,usage", [("merge", "[OPTIONS] LORA_DIR"),
                                           ("fix", "[OPTIONS] LORA_DIR"),
                                           ("inspect", "[OPTIONS] PATH"),
                                           ("explain", "[OPTIONS] [CODE]"),
                                           ("convert", "[OPTIONS] LLAVA_DIR")])
def test_usage_lines_name_arguments_in_capitals(command: str, usage: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "llava_doctor", command, "--help"],
                         capture_output=True, text=True, env=env, timeout=120).stdout
    first = out.splitlines()[0]
    assert first.endswith(f"{command} {usage}"), first
    assert "{" not in first


def test_every_command_names_its_arguments_in_capitals() -> None:
    """Commands added later get the same usage line without declaring a metavar."""
    import typer

    from llava_doctor.cli import app

    group = typer.main.get_command(app)
    names = sorted(group.commands)  # type: ignore[attr-defined]
    assert {"check", "fix", "merge", "inspect", "explain"} <= set(names)
    for name in names:
        cmd = group.commands[name]  # type: ignore[attr-defined]
        with cmd.make_context(name, ["--help"], resilient_parsing=True) as ctx:
            usage = cmd.get_usage(ctx)
        assert "{" not in usage, usage
        for p in cmd.params:
            if not isinstance(p, typer.core.TyperArgument):
                continue
            assert p.metavar is not None, (name, p.name)
            if "|" not in p.metavar:  # a choice lists its values as they are typed
                assert p.metavar == p.metavar.upper(), (name, p.name, p.metavar)
