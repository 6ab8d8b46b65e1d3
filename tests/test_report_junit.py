"""JUnit XML, read back with junitparser the way a CI dashboard reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from check_helpers import layout_report
from junitparser import Error, Failure, JUnitXml, Skipped

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.models import (
    CheckOutcome,
    CheckStatus,
    Consumer,
    Finding,
    Report,
    Severity,
    TargetResult,
)
from llava_doctor.report.junit import render_junit

TARGETS = ("lora", "LD101-no-config", "LD106-name-without-lora", "LD107-pretrain-dir")


@pytest.fixture(scope="module")
def root(scenarios: dict[str, Path]) -> Path:
    return scenarios["base-vicuna"].parent


@pytest.fixture(scope="module")
def report(scenarios: dict[str, Path]) -> Report:
    return layout_report(scenarios, TARGETS)


def _parse(text: str) -> JUnitXml:
    return JUnitXml.fromstring(text.encode("utf-8"))


def _cases(suite) -> dict[str, object]:
    return {c.name: c for c in suite}


def test_one_suite_per_target_one_case_per_check(report: Report, root: Path) -> None:
    xml = _parse(render_junit(report, root=root))
    suites = list(xml)
    assert [s.name for s in suites] == [
        "llava-v1.5-tiny-lora",
        "broken/LD101-no-config/llava-v1.5-tiny-lora",
        "broken/LD106-name-without-lora/llava-v1.5-tiny-finetune",
        "broken/LD107-pretrain-dir/llava-v1.5-tiny-pretrain",
    ]
    for suite, target in zip(suites, report.targets, strict=True):
        names = [c.name for c in suite]
        assert names == [f"{o.code} {o.name}" for o in target.checks]
        assert suite.tests == len(target.checks)
        assert {c.classname for c in suite} == {suite.name}
    assert xml.tests == sum(len(t.checks) for t in report.targets)


def test_outcomes_map_to_passed_failed_and_skipped(report: Report, root: Path) -> None:
    suites = {s.name: s for s in _parse(render_junit(report, root=root))}

    healthy = suites["llava-v1.5-tiny-lora"]
    assert all(c.is_passed for c in healthy)
    assert healthy.failures == 0 and healthy.skipped == 0

    broken = _cases(suites["broken/LD101-no-config/llava-v1.5-tiny-lora"])
    (fail,) = broken["LD101 lora-config-missing"].result
    assert isinstance(fail, Failure)
    (f101,) = [f for f in report.findings if f.code == "LD101"]
    assert fail.message == f101.message
    assert fail.type == "error"
    assert "broken/LD101-no-config/llava-v1.5-tiny-lora/config.json" in fail.text
    assert broken["LD102 adapter-weights-missing"].is_passed

    # A stage-1 folder is not a LoRA: the LoRA checks are skipped with the reason, and
    # LD107 (which runs on any folder) fails.
    pre = _cases(suites["broken/LD107-pretrain-dir/llava-v1.5-tiny-pretrain"])
    (skip,) = pre["LD101 lora-config-missing"].result
    assert isinstance(skip, Skipped)
    assert skip.message == "not a LoRA output directory (classified as pretrain)"
    assert isinstance(pre["LD107 not-a-lora-dir"].result[0], Failure)


def test_findings_below_the_gate_leave_the_case_passing(scenarios: dict[str, Path],
                                                       root: Path) -> None:
    # For llava-doctor's merge a folder name is harmless: LD106 is info there.
    report = run_checks([scenarios["LD106-name-without-lora"]],
                        Options(base=scenarios["base-vicuna"], consumer=Consumer.llava_doctor),
                        select=["LD106"])
    target = "broken/LD106-name-without-lora/llava-v1.5-tiny-finetune"
    (f106,) = [f for f in report.findings if f.code == "LD106"]
    assert f106.severity == Severity.info

    def case(**options: object):
        suites = {s.name: s for s in _parse(render_junit(report, root=root, **options))}
        return _cases(suites[target])["LD106 loader-name-dispatch"]

    for gate in (Severity.error, Severity.warning):
        below = case(fail_on=gate)
        assert below.is_passed
        assert f106.message in below.system_out

    (fail,) = case().result  # without a gate, any finding fails
    assert isinstance(fail, Failure) and fail.type == "info"


def test_each_suite_says_whose_merge_its_severities_are_for(report: Report, root: Path) -> None:
    for suite in _parse(render_junit(report, root=root)):
        props = {p.name: p.value for p in suite.properties()}
        assert props["consumer"] == "llava"
    ours = report.model_copy(update={"targets": [
        t.model_copy(update={"consumer": Consumer.llava_doctor}) for t in report.targets]})
    for suite in _parse(render_junit(ours, root=root)):
        assert {p.name: p.value for p in suite.properties()}["consumer"] == "llava-doctor"


def test_a_crashed_check_is_an_error_with_the_crash_finding() -> None:
    crash = Finding(code="LD000", name="internal-error", severity=Severity.error,
                    message="check LD203 (adapter-shape-mismatch) crashed on runs/a: KeyError: 'x'",
                    path="runs/a", target="runs/a", evidence={"check": "LD203"})
    report = Report(
        targets=[TargetResult(path="runs/a", kind="lora-output", checks=[
            CheckOutcome(code="LD101", name="lora-config-missing", status=CheckStatus.passed),
            CheckOutcome(code="LD203", name="adapter-shape-mismatch",
                         status=CheckStatus.crashed, reason="KeyError: 'x'"),
        ])],
        findings=[crash])
    (suite,) = _parse(render_junit(report, root="/"))
    cases = _cases(suite)
    (err,) = cases["LD203 adapter-shape-mismatch"].result
    assert isinstance(err, Error)
    assert err.message == "KeyError: 'x'"
    assert crash.message in err.text
    assert cases["LD101 lora-config-missing"].is_passed
    assert suite.errors == 1


def test_several_findings_of_one_check_make_one_failure_listing_all() -> None:
    fs = [Finding(code="LD105", name="adapter-weights-empty", severity=Severity.error,
                  message=f"tensor {i} is empty", path="runs/a/adapter_model.safetensors",
                  target="runs/a") for i in range(2)]
    report = Report(targets=[TargetResult(path="runs/a", kind="lora-output", checks=[
        CheckOutcome(code="LD105", name="adapter-weights-empty", status=CheckStatus.failed)])],
        findings=fs)
    (suite,) = _parse(render_junit(report, root="/"))
    (case,) = list(suite)
    (fail,) = case.result
    assert fail.message == "2 findings; first: tensor 0 is empty"
    assert "tensor 0 is empty" in fail.text and "tensor 1 is empty" in fail.text


def test_rendering_is_byte_stable(report: Report, root: Path) -> None:
    text = render_junit(report, root=root)
    assert text == render_junit(report, root=root)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
