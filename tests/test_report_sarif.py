"""SARIF 2.1.0: valid against the official schema, and what GitHub code scanning requires."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from check_helpers import layout_report

from llava_doctor.checks.base import all_checks
from llava_doctor.doctor import run_checks
from llava_doctor.models import Consumer, Finding, Report, Severity, TargetResult
from llava_doctor.report.locate import json_key_lines
from llava_doctor.report.sarif import FINGERPRINT_KEY, build_sarif, fingerprint, render_sarif

SARIF_SCHEMA = Path(__file__).resolve().parents[2] / "shared/schemas/sarif-schema-2.1.0.json"

TARGETS = ("lora", "LD101-no-config", "LD103-no-adapter-config", "LD106-name-without-lora",
           "LD107-pretrain-dir")


@pytest.fixture(scope="module")
def root(scenarios: dict[str, Path]) -> Path:
    return scenarios["base-vicuna"].parent


@pytest.fixture(scope="module")
def report(scenarios: dict[str, Path]) -> Report:
    return layout_report(scenarios, TARGETS)


@pytest.fixture(scope="module")
def sarif(report: Report, root: Path) -> dict:
    return json.loads(render_sarif(report, root=root, lines=json_key_lines(report)))


def _validator() -> jsonschema.protocols.Validator:
    if not SARIF_SCHEMA.is_file():
        pytest.skip(f"the official SARIF schema is not at {SARIF_SCHEMA} (the shared/ folder is "
                    "copied beside the repository in CI; it is absent here)")
    schema = json.loads(SARIF_SCHEMA.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_valid_against_the_official_sarif_schema(sarif: dict) -> None:
    errors = sorted(_validator().iter_errors(sarif), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_an_empty_report_is_valid_sarif_too() -> None:
    log = build_sarif(Report())
    assert not list(_validator().iter_errors(log))
    assert log["runs"][0]["results"] == []


def test_log_header_and_driver(sarif: dict) -> None:
    from llava_doctor import __version__

    assert sarif["version"] == "2.1.0"
    assert sarif["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert len(sarif["runs"]) == 1
    driver = sarif["runs"][0]["tool"]["driver"]
    assert driver["name"] == "llava-doctor"
    assert driver["version"] == __version__


def test_rules_come_from_the_check_registry_with_what_github_requires(sarif: dict) -> None:
    rules = sarif["runs"][0]["tool"]["driver"]["rules"]
    checks = all_checks()
    assert [r["id"] for r in rules] == list(checks)
    level = {"error": "error", "warning": "warning", "info": "note"}
    for r in rules:
        spec = checks[r["id"]]
        assert r["name"] == spec.name
        assert r["shortDescription"]["text"] == " ".join(spec.summary.split())
        assert 0 < len(r["shortDescription"]["text"]) <= 1024
        assert 0 < len(r["fullDescription"]["text"]) <= 1024
        assert r["fullDescription"]["text"].startswith(r["shortDescription"]["text"])
        assert r["help"]["text"].startswith(spec.doc)
        assert "## Why is this bad?" in r["help"]["markdown"]
        assert r["defaultConfiguration"]["level"] == level[spec.severity.value]
        assert r["properties"]["severityByConsumer"] == {
            c.value: spec.severity_for(c).value for c in Consumer}


def test_the_run_says_whose_merge_the_levels_are_for(sarif: dict, report: Report,
                                                     root: Path) -> None:
    props = sarif["runs"][0]["properties"]
    assert props["consumer"] == "llava"
    assert props["severitiesFor"] == "LLaVA's merge_lora_weights.py (transformers 4.37.2)"
    assert set(props["targetConsumers"].values()) == {"llava"}
    # Under another consumer the rules' default levels follow it (LD106: info -> note).
    ours = report.model_copy(update={"consumer": Consumer.llava_doctor})
    run = build_sarif(ours, root=root)["runs"][0]
    assert run["properties"]["consumer"] == "llava-doctor"
    (ld106,) = [r for r in run["tool"]["driver"]["rules"] if r["id"] == "LD106"]
    assert ld106["defaultConfiguration"]["level"] == "note"


def test_results_point_at_files_relative_to_root(sarif: dict, report: Report, root: Path) -> None:
    run = sarif["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    results = run["results"]
    assert len(results) == len(report.findings)
    for res in results:
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        assert res["level"] in ("error", "warning", "note")
        assert res["message"]["text"]
        (loc,) = res["locations"]
        uri = loc["physicalLocation"]["artifactLocation"]["uri"]
        assert not uri.startswith(("/", "file:")), uri
        assert (root / uri).resolve().is_relative_to(root.resolve())
        region = loc["physicalLocation"]["region"]
        assert region["startLine"] >= 1 and region["startColumn"] >= 1
        assert res["partialFingerprints"][FINGERPRINT_KEY]

    by_rule = {(r["ruleId"], r["properties"]["target"]): r for r in results}
    ld101 = by_rule[("LD101", "broken/LD101-no-config/llava-v1.5-tiny-lora")]
    assert ld101["level"] == "error"
    assert ld101["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == \
        "broken/LD101-no-config/llava-v1.5-tiny-lora/config.json"
    assert ld101["locations"][0]["physicalLocation"]["region"] == {
        "startLine": 1, "startColumn": 1, "endLine": 1, "endColumn": 2}
    ld103 = by_rule[("LD103", "broken/LD103-no-adapter-config/llava-v1.5-tiny-lora")]
    assert ld103["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == \
        "broken/LD103-no-adapter-config/llava-v1.5-tiny-lora/adapter_config.json"
    ld106 = by_rule[("LD106", "broken/LD106-name-without-lora/llava-v1.5-tiny-finetune")]
    assert ld106["level"] == "error"  # LLaVA's merge takes the wrong branch
    ld107 = by_rule[("LD107", "broken/LD107-pretrain-dir/llava-v1.5-tiny-pretrain")]
    assert ld107["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == \
        "broken/LD107-pretrain-dir/llava-v1.5-tiny-pretrain"
    assert not [r for r in results if r["properties"]["target"] == "llava-v1.5-tiny-lora"]


def test_fingerprints_are_stable_across_runs_and_checkouts(scenarios: dict[str, Path],
                                                           root: Path, tmp_path: Path) -> None:
    src = scenarios["LD101-no-config"]
    a = run_checks([src], select=["LD101"])
    b = run_checks([src], select=["LD101"])
    assert build_sarif(a, root=root) == build_sarif(b, root=root)

    # The same problem in another checkout (another absolute path) keeps its fingerprint.
    other = tmp_path / "elsewhere"
    copy = other / src.relative_to(root)
    shutil.copytree(src, copy)
    c = run_checks([copy], select=["LD101"])
    fp = [r["partialFingerprints"] for r in build_sarif(a, root=root)["runs"][0]["results"]]
    fp_other = [r["partialFingerprints"] for r in build_sarif(c, root=other)["runs"][0]["results"]]
    assert fp == fp_other and fp


def _finding(**kw: object) -> Finding:
    base = dict(code="LD103", name="adapter-config-missing", severity=Severity.error,
                message="runs/a has adapter weights but no adapter_config.json",
                path="runs/a/adapter_config.json", target="runs/a")
    base.update(kw)
    return Finding(**base)


def test_fingerprint_ignores_the_message_but_not_code_path_or_identity() -> None:
    f = _finding()
    assert fingerprint(f, "/") == fingerprint(f.model_copy(update={"message": "reworded"}), "/")
    # Measurements may change while the problem stays the same.
    assert fingerprint(f) == fingerprint(f.model_copy(update={"evidence": {"count": 3}}))
    assert fingerprint(f) != fingerprint(f.model_copy(update={"code": "LD102"}))
    moved = f.model_copy(update={"path": "runs/b/adapter_config.json"})
    assert fingerprint(f) != fingerprint(moved)
    assert fingerprint(f) != fingerprint(f.model_copy(update={"evidence": {"key": "r"}}))


def test_duplicate_identities_stay_separate_alerts() -> None:
    f = _finding()
    report = Report(targets=[TargetResult(path="runs/a", kind="lora-output")], findings=[f, f])
    fps = [r["partialFingerprints"][FINGERPRINT_KEY]
           for r in build_sarif(report)["runs"][0]["results"]]
    assert fps[0].endswith(":1") and fps[1].endswith(":2")
    assert fps[0].split(":")[0] == fps[1].split(":")[0]


def test_region_is_the_line_of_the_json_key_the_finding_names(tmp_path: Path) -> None:
    cfg = tmp_path / "run" / "adapter_config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"],
                               "nested": {"r": 4}}, indent=2) + "\n", encoding="utf-8")
    findings = [
        _finding(code="LD201", name="x", path=str(cfg), target=str(cfg.parent),
                 evidence={"key": "target_modules"}),
        _finding(code="LD202", name="y", path=str(cfg), target=str(cfg.parent),
                 evidence={"field": "nested.r"}),
        _finding(code="LD203", name="z", path=str(cfg), target=str(cfg.parent),
                 evidence={"key": "not_there"}),
    ]
    report = Report(targets=[TargetResult(path=str(cfg.parent), kind="lora-output")],
                    findings=findings)
    lines = json_key_lines(report)
    regions = [r["locations"][0]["physicalLocation"]["region"]
               for r in build_sarif(report, root=tmp_path, lines=lines)["runs"][0]["results"]]
    # json.dumps(indent=2): 1 "{", 2 peft_type, 3 r, 4-6 target_modules, 7 nested, 8 its "r".
    assert regions[0] == {"startLine": 4, "startColumn": 3, "endLine": 4, "endColumn": 19}
    assert regions[1]["startLine"] == 8
    assert regions[2]["startLine"] == 1
    # Without the looked-up lines the renderer does not touch the disk: line 1.
    plain = build_sarif(report, root=tmp_path)["runs"][0]["results"]
    assert {r["locations"][0]["physicalLocation"]["region"]["startLine"] for r in plain} == {1}


def test_paths_outside_root_become_absolute_file_uris(tmp_path: Path) -> None:
    f = _finding(path=str(tmp_path / "x" / "adapter_config.json"), target=str(tmp_path / "x"),
                 severity=Severity.info)
    report = Report(targets=[TargetResult(path=str(tmp_path / "x"), kind="lora-output")],
                    findings=[f])
    (res,) = build_sarif(report, root=tmp_path / "elsewhere")["runs"][0]["results"]
    uri = res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == (tmp_path / "x" / "adapter_config.json").as_uri()
    assert res["level"] == "note"


def test_rendering_is_byte_stable(report: Report, root: Path) -> None:
    assert render_sarif(report, root=root) == render_sarif(report, root=root)
