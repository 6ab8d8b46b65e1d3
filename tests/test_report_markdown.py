"""The markdown summary for $GITHUB_STEP_SUMMARY."""

from __future__ import annotations

from llava_doctor.models import (
    CheckOutcome,
    CheckStatus,
    Consumer,
    Finding,
    Report,
    Severity,
    TargetResult,
)
from llava_doctor.report.markdown import render_markdown


def _report(message: str = "runs/b has no config.json", severity: Severity = Severity.error
            ) -> Report:
    return Report(
        targets=[
            TargetResult(path="runs/a", kind="lora-output", checks=[
                CheckOutcome(code="LD101", name="lora-config-missing", status=CheckStatus.passed),
            ]),
            TargetResult(path="runs/b", kind="checkpoint", checks=[
                CheckOutcome(code="LD101", name="lora-config-missing", status=CheckStatus.failed),
                CheckOutcome(code="LD301", name="projector-shape", status=CheckStatus.skipped,
                             reason="no projector found"),
            ]),
        ],
        findings=[Finding(code="LD101", name="lora-config-missing", severity=severity,
                          message=message, path="runs/b/config.json", target="runs/b")])


def test_headline_table_findings_and_checks() -> None:
    md = render_markdown(_report(), root=".")
    lines = md.splitlines()
    assert lines[0] == "## ❌ llava-doctor: 1 error(s), 0 warning(s), 0 info in 2 target(s)"
    assert lines[2] == ("Severities for: LLaVA's merge_lora_weights.py (transformers 4.37.2).")
    assert "| `runs/a` | lora-output | llava | 0 | 0 | 0 | 1 / 0 / 0 |" in lines
    assert "| `runs/b` | checkpoint | llava | 1 | 0 | 0 | 0 / 1 / 1 |" in lines
    assert "### `runs/b`" in lines
    assert ("| ❌ | LD101 `lora-config-missing` | `runs/b/config.json` "
            "| runs/b has no config.json | none |") in lines
    assert "  - LD301 `projector-shape` skipped: no projector found" in lines


def test_targets_of_different_consumers_say_their_own() -> None:
    r = _report()
    mixed = r.model_copy(update={"consumer": None, "targets": [
        r.targets[0], r.targets[1].model_copy(update={"consumer": Consumer.peft})]})
    lines = render_markdown(mixed, root=".").splitlines()
    assert lines[2] == "Severities for: each target's own consumer (llava, peft)."
    assert "| `runs/b` | checkpoint | peft | 1 | 0 | 0 | 0 / 1 / 1 |" in lines


def test_headline_follows_the_gate() -> None:
    warn = _report(severity=Severity.warning)
    assert render_markdown(warn, root=".").startswith("## ✅ llava-doctor: 0 error(s), 1 warn")
    assert render_markdown(warn, root=".", fail_on=Severity.warning).startswith("## ❌")


def test_messages_cannot_inject_html_or_break_the_table() -> None:
    md = render_markdown(_report("<img src=x onerror=alert(1)> a|b\nc"), root=".")
    assert "<img" not in md
    assert "&lt;img src=x onerror=alert(1)&gt; a\\|b<br>c" in md


def test_a_clean_run() -> None:
    report = Report(targets=[TargetResult(path="runs/a", kind="lora-output")])
    assert render_markdown(report, root=".").splitlines()[0] == \
        "## ✅ llava-doctor: no issues found in 1 target(s)"
