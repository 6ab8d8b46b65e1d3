"""JSON: `Report.model_dump_json()`, byte-stable for the same input."""

from __future__ import annotations

from llava_doctor.models import Report


def render_json(report: Report, **_: object) -> str:
    return report.model_dump_json(indent=2) + "\n"
