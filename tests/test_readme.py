"""The README's generated parts stay in sync with the code."""

from __future__ import annotations

import re
from pathlib import Path

from llava_doctor.checks.base import DOC_SECTIONS, all_checks, codes_table_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- codes:begin -->", "<!-- codes:end -->"


def test_codes_table_in_sync() -> None:
    text = README.read_text()
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n") + "\n"
    assert block == codes_table_markdown(), (
        "README codes table is stale: run `python -m llava_doctor.checks.readme_table` and "
        "paste its output between the codes markers")


def test_every_check_has_its_doc_sections() -> None:
    for spec in all_checks().values():
        for section in DOC_SECTIONS:
            assert section in spec.doc, f"{spec.code} doc lacks '{section}'"
        assert re.fullmatch(r"LD\d{3}", spec.code)


def test_readme_names_the_test_command() -> None:
    assert "python -m pytest" in README.read_text()
