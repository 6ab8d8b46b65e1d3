"""`llava-doctor schema`: the JSON report's contract, pinned."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from llava_doctor.cli import main
from llava_doctor.commands.schema import render_schema, report_schema
from llava_doctor.models import SCHEMA_VERSION

PINNED = Path(__file__).parent / "data" / "report.schema.json"


def test_schema_matches_the_pinned_copy() -> None:
    pinned = PINNED.read_text(encoding="utf-8")
    current = render_schema()
    if current == pinned:
        return
    pinned_version = json.loads(pinned)["$comment"].rsplit(" ", 1)[-1]
    if pinned_version == SCHEMA_VERSION:
        pytest.fail(f"The JSON report schema changed but models.SCHEMA_VERSION is still "
                    f"{SCHEMA_VERSION}: bump models.SCHEMA_VERSION (the JSON report is a "
                    "contract for CI consumers), then regenerate the pinned copy with "
                    "`llava-doctor schema > tests/data/report.schema.json`.")
    pytest.fail(f"models.SCHEMA_VERSION was bumped to {SCHEMA_VERSION} (pinned: "
                f"{pinned_version}); regenerate the pinned copy with "
                "`llava-doctor schema > tests/data/report.schema.json`.")


def test_the_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["schema"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == render_schema()


def test_it_is_a_valid_json_schema_naming_every_field_as_required() -> None:
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["required"] == ["consumer", "counts", "env", "findings", "schema_version",
                                  "targets", "tool", "tool_version"]
    assert SCHEMA_VERSION == "1.3"  # 1.3: the environment section names its consumer
    assert "consumer" in schema["$defs"]["EnvReport"]["required"]
    consumer = schema["properties"]["consumer"]
    assert {"$ref": "#/$defs/Consumer"} in consumer["anyOf"]
    assert schema["$defs"]["Consumer"]["enum"] == ["llava", "llava-doctor", "peft"]
    assert "consumer" in schema["$defs"]["TargetResult"]["required"]
    assert schema["$defs"]["Finding"]["required"] == ["code", "evidence", "fix", "message",
                                                      "name", "path", "severity", "target"]
    assert "default" not in schema["properties"]["tool_version"]


def test_a_real_report_validates_and_a_broken_one_does_not(
        scenarios: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(scenarios["base-vicuna"].parent)
    with pytest.raises(SystemExit):
        main(["check", str(scenarios["LD101-no-config"]), str(scenarios["LD107-pretrain-dir"]),
              "--format", "json", "--isolated", "--select", "LD1"])
    report = json.loads(capsys.readouterr().out)
    validator = jsonschema.Draft202012Validator(report_schema())
    assert not list(validator.iter_errors(report))
    assert {f["code"] for f in report["findings"]} == {"LD101", "LD107"}

    report["findings"][0]["severity"] = "fatal"
    del report["targets"][0]["kind"]
    errors = {e.validator for e in validator.iter_errors(report)}
    assert errors == {"enum", "required"}
