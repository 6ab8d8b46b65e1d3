"""GitHub Actions workflow commands: one `::error`/`::warning`/`::notice` line per finding.

Escaping follows @actions/core (`toolkit/packages/core/src/command.ts`): in the message `%`, CR
and LF are percent-encoded; in property values `:` and `,` are too, since they delimit the
properties. File paths are relative to `root` so GitHub can attach them to the checkout.
"""

from __future__ import annotations

import os

from llava_doctor.models import Report, Severity
from llava_doctor.report.locate import Lines, display_path, span_of

_COMMAND = {Severity.error: "error", Severity.warning: "warning", Severity.info: "notice"}


def escape_data(s: str) -> str:
    """Escape a workflow command's message."""
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(s: str) -> str:
    """Escape a workflow command's property value."""
    return escape_data(s).replace(":", "%3A").replace(",", "%2C")


def render_github(report: Report, *, root: str | os.PathLike[str] | None = None,
                  lines: Lines | None = None, **_: object) -> str:
    """Annotation lines, then one plain summary line (plain lines are just log output)."""
    out = []
    for f in report.findings:
        props = [f"file={escape_property(display_path(f.path or f.target, root))}"]
        span = span_of(f, lines)
        if span is not None:
            props += [f"line={span.line}", f"col={span.column}",
                      f"endColumn={span.end_column}"]
        props.append(f"title={escape_property(f'{f.code} {f.name}')}")
        out.append(f"::{_COMMAND[f.severity]} {','.join(props)}::{escape_data(f.message)}")
    c = report.counts
    n = len(report.targets)
    who = f" (severities for: {report.consumer_label()})"
    if report.findings:
        out.append(f"llava-doctor: {c['error']} error(s), {c['warning']} warning(s), "
                   f"{c['info']} info in {n} target(s){who}")
    else:
        out.append(f"llava-doctor: no issues found in {n} target(s){who}")
    return "\n".join(out) + "\n"
