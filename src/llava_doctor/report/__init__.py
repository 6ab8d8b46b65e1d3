"""Renderers: pure functions `Report -> str`. `--format` choices are this dict's keys."""

from __future__ import annotations

from collections.abc import Callable

from llava_doctor.models import Report
from llava_doctor.report.json_ import render_json
from llava_doctor.report.text import render_text

Renderer = Callable[..., str]

RENDERERS: dict[str, Renderer] = {
    "text": render_text,
    "json": render_json,
}


def render(report: Report, fmt: str, **options: object) -> str:
    return RENDERERS[fmt](report, **options)
