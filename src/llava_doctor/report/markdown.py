"""A markdown summary for `$GITHUB_STEP_SUMMARY`, merge-request notes and chat.

Messages come from file and tensor names in artifacts we did not write, so they are
HTML-escaped (a step summary renders HTML) and table pipes and newlines are neutralised.
"""

from __future__ import annotations

import html
import os

from llava_doctor.models import CheckStatus, Report, Severity
from llava_doctor.report.locate import display_path

_ICON = {Severity.error: "❌", Severity.warning: "⚠️", Severity.info: "ℹ️"}


def _cell(s: str) -> str:
    return html.escape(s, quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _code(s: str) -> str:
    # Inside a code span HTML is shown literally, so only the span and the table need guarding.
    s = s.replace("`", "'").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return f"`{s}`"


def render_markdown(report: Report, *, root: str | os.PathLike[str] | None = None,
                    fail_on: Severity = Severity.error, **_: object) -> str:
    """Headline, a table of targets, and per target its findings and the checks that ran."""
    c = report.counts
    n = len(report.targets)
    blocking = sum(1 for f in report.findings if f.severity.rank >= fail_on.rank)
    head = "✅" if not blocking else "❌"
    if report.findings:
        title = (f"{head} llava-doctor: {c['error']} error(s), {c['warning']} warning(s), "
                 f"{c['info']} info in {n} target(s)")
    else:
        title = f"{head} llava-doctor: no issues found in {n} target(s)"
    out = [f"## {title}", "", f"Severities for: {_cell(report.consumer_label())}.", ""]
    if not report.targets:
        return "\n".join(out) + "\n"

    out += ["| target | kind | severities for | errors | warnings | info "
            "| checks passed / failed / skipped |",
            "|---|---|---|---:|---:|---:|---|"]
    for t in report.targets:
        found = [f for f in report.findings if f.target == t.path]
        per = {s: sum(1 for f in found if f.severity == s) for s in Severity}
        st = {s: sum(1 for o in t.checks if o.status == s) for s in CheckStatus}
        checks = f"{st[CheckStatus.passed]} / {st[CheckStatus.failed]} / {st[CheckStatus.skipped]}"
        if st[CheckStatus.crashed]:
            checks += f" ({st[CheckStatus.crashed]} crashed)"
        out.append(f"| {_code(display_path(t.path, root))} | {t.kind} | {t.consumer.value} "
                   f"| {per[Severity.error]} "
                   f"| {per[Severity.warning]} | {per[Severity.info]} | {checks} |")

    for t in report.targets:
        found = [f for f in report.findings if f.target == t.path]
        if not found:
            continue
        out += ["", f"### {_code(display_path(t.path, root))}", "",
                "| | code | file | message | fix |", "|---|---|---|---|---|"]
        for f in found:
            where = display_path(f.path or f.target, root)
            out.append(f"| {_ICON[f.severity]} | {f.code} `{f.name}` | {_code(where)} "
                       f"| {_cell(f.message)} | {f.fix.value} |")

    out += ["", "<details><summary>Checks run per target</summary>", ""]
    for t in report.targets:
        out.append(f"- {_code(display_path(t.path, root))}")
        for o in t.checks:
            reason = f": {_cell(o.reason)}" if o.reason else ""
            out.append(f"  - {o.code} `{o.name}` {o.status.value}{reason}")
    out += ["", "</details>", ""]
    out.append("`llava-doctor explain CODE` prints what a code means and how to fix it.")
    return "\n".join(out) + "\n"
