"""JUnit XML, written with `junitparser`: one testsuite per target, one testcase per check.

CI dashboards (GitLab, Jenkins, Azure) then show what was checked, not only what failed: a
passed check is a passing testcase, a skipped one is skipped with its reason, a check whose
findings reach the gate's threshold (`fail_on`) is a failure carrying the findings' messages,
and a crashed check is an error. Findings below the threshold leave the testcase passing and
are listed in its `system-out`, so the dashboard agrees with the exit code.
"""

from __future__ import annotations

import os
from xml.dom.minidom import parseString

from llava_doctor.models import CheckStatus, Finding, Report, Severity
from llava_doctor.report.locate import display_path, outcome_code

SUITES_NAME = "llava-doctor"


def _finding_line(f: Finding, root: str | os.PathLike[str] | None) -> str:
    where = display_path(f.path if f.path is not None else f.target, root)
    return f"{f.code} {f.severity.value}: {where}: {f.message}"


def render_junit(report: Report, *, root: str | os.PathLike[str] | None = None,
                 fail_on: Severity = Severity.info, **_: object) -> str:
    """JUnit XML text (UTF-8, pretty-printed, byte-stable for the same report)."""
    from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

    by_check: dict[tuple[str, str], list[Finding]] = {}
    for f in report.findings:
        by_check.setdefault((f.target, outcome_code(f)), []).append(f)

    xml = JUnitXml(SUITES_NAME)
    for target in report.targets:
        name = display_path(target.path, root)
        suite = TestSuite(name)
        # Properties before the testcases, as the JUnit XSD orders them.
        suite.add_property("kind", target.kind)
        if target.family:
            suite.add_property("family", target.family)
        # Whose merge the severities (and so the failures) are for.
        suite.add_property("consumer", target.consumer.value)
        for outcome in target.checks:
            case = TestCase(f"{outcome.code} {outcome.name}", classname=name)
            found = by_check.get((target.path, outcome.code), [])
            if outcome.status == CheckStatus.skipped:
                case.result = [Skipped(outcome.reason or "skipped")]
            elif outcome.status == CheckStatus.crashed:
                err = Error(outcome.reason or "the check crashed", type_="crash")
                if found:
                    err.text = "\n".join(_finding_line(f, root) for f in found)
                case.result = [err]
            elif found:
                blocking = [f for f in found if f.severity.rank >= fail_on.rank]
                if blocking:
                    worst = max(blocking, key=lambda f: f.severity.rank)
                    msg = blocking[0].message if len(blocking) == 1 else \
                        f"{len(blocking)} findings; first: {blocking[0].message}"
                    fail = Failure(msg, type_=worst.severity.value)
                    fail.text = "\n".join(_finding_line(f, root) for f in found)
                    case.result = [fail]
                else:
                    case.system_out = "\n".join(_finding_line(f, root) for f in found)
            suite.add_testcase(case)
        suite.update_statistics()
        xml.add_testsuite(suite)
    xml.update_statistics()
    # junitparser writes compact XML; minidom indents it the same way junitparser's own
    # `write(pretty=True)` does, and deterministically.
    return parseString(xml.tostring()).toprettyxml(indent="  ", encoding="UTF-8").decode("utf-8")
