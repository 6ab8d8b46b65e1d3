"""Renderers: pure functions `(report, **options) -> str`. `--format` choices are this dict's keys.

Options every renderer accepts (and ignores when irrelevant): `root` (paths are shown relative
to it; SARIF URIs and GitHub annotation files need that), `fail_on` (the gate's threshold, so
JUnit and markdown agree with the exit code), `lines` (JSON key lines from
`locate.json_key_lines`), `color` and `verbose` (text only). Heavy imports (sarif-pydantic,
junitparser) happen inside the renderer that needs them.
"""

from __future__ import annotations

from collections.abc import Callable

from llava_doctor.models import Report
from llava_doctor.report.github import render_github
from llava_doctor.report.json_ import render_json
from llava_doctor.report.junit import render_junit
from llava_doctor.report.markdown import render_markdown
from llava_doctor.report.sarif import render_sarif
from llava_doctor.report.text import render_text

Renderer = Callable[..., str]

RENDERERS: dict[str, Renderer] = {
    "text": render_text,
    "json": render_json,
    "sarif": render_sarif,
    "junit": render_junit,
    "github": render_github,
    "markdown": render_markdown,
}


def render(report: Report, fmt: str, **options: object) -> str:
    """Render `report` in format `fmt` (a key of RENDERERS)."""
    return RENDERERS[fmt](report, **options)
