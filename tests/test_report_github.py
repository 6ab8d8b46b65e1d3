"""GitHub Actions annotation lines: format, escaping, levels and JSON key lines."""

from __future__ import annotations

import json
from pathlib import Path

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.models import Consumer, Finding, Report, Severity, TargetResult
from llava_doctor.report.github import escape_data, escape_property, render_github
from llava_doctor.report.locate import json_key_lines


def test_escaping_follows_actions_toolkit() -> None:
    assert escape_data("50% done\r\nnext: a,b") == "50%25 done%0D%0Anext: a,b"
    assert escape_property("runs/a:b,c%\n") == "runs/a%3Ab%2Cc%25%0A"


def test_annotations_for_real_findings(scenarios: dict[str, Path]) -> None:
    root = scenarios["base-vicuna"].parent
    targets = [scenarios["LD101-no-config"], scenarios["LD106-name-without-lora"]]
    report = run_checks(targets, Options(base=scenarios["base-vicuna"]),
                        select=["LD101", "LD106"])
    lines = render_github(report, root=root).splitlines()
    (f101,) = [f for f in report.findings if f.code == "LD101"]
    (f106,) = [f for f in report.findings if f.code == "LD106"]
    assert lines == [
        "::error file=broken/LD101-no-config/llava-v1.5-tiny-lora/config.json,"
        f"title=LD101 lora-config-missing::{escape_data(f101.message)}",
        "::error file=broken/LD106-name-without-lora/llava-v1.5-tiny-finetune,"
        f"title=LD106 loader-name-dispatch::{escape_data(f106.message)}",
        "llava-doctor: 2 error(s), 0 warning(s), 0 info in 2 target(s) (severities for: "
        "LLaVA's merge_lora_weights.py (transformers 4.37.2))",
    ]
    # For llava-doctor's merge the name does not matter: a notice, and the summary says whose.
    ours = run_checks(targets, Options(base=scenarios["base-vicuna"],
                                       consumer=Consumer.llava_doctor), select=["LD101", "LD106"])
    lines = render_github(ours, root=root).splitlines()
    assert lines[1].startswith("::notice file=broken/LD106-name-without-lora/")
    assert lines[2] == ("llava-doctor: 1 error(s), 0 warning(s), 1 info in 2 target(s) "
                        "(severities for: llava-doctor merge)")


def test_escaped_properties_and_messages_and_notice_level() -> None:
    f = Finding(code="LD999", name="odd-name", severity=Severity.info,
                message="line one\nline two: 100%", path="runs/a,b:c/adapter_config.json",
                target="runs/a,b:c")
    report = Report(targets=[TargetResult(path="runs/a,b:c", kind="lora-output")], findings=[f])
    (line, summary) = render_github(report, root=".").splitlines()
    assert line == ("::notice file=runs/a%2Cb%3Ac/adapter_config.json,title=LD999 odd-name::"
                    "line one%0Aline two: 100%25")
    assert summary == ("llava-doctor: 0 error(s), 0 warning(s), 1 info in 1 target(s) "
                       "(severities for: LLaVA's merge_lora_weights.py (transformers 4.37.2))")


def test_line_and_columns_when_the_json_key_is_known(tmp_path: Path) -> None:
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"peft_type": "LORA", "use_dora": True}, indent=2),
                   encoding="utf-8")
    f = Finding(code="LD204", name="k", severity=Severity.error, message="m", path=str(cfg),
                target=str(tmp_path), evidence={"key": "use_dora"})
    report = Report(targets=[TargetResult(path=str(tmp_path), kind="lora-output")], findings=[f])
    (line, _) = render_github(report, root=tmp_path, lines=json_key_lines(report)).splitlines()
    assert line == "::error file=adapter_config.json,line=3,col=3,endColumn=13,title=LD204 k::m"


def test_a_clean_report_is_one_plain_summary_line() -> None:
    report = Report(targets=[TargetResult(path="runs/a", kind="lora-output")],
                    consumer=Consumer.peft)
    assert render_github(report) == (
        "llava-doctor: no issues found in 1 target(s) (severities for: peft's merge_and_unload "
        "(PeftModel on the transformers model class))\n")
