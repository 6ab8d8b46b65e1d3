"""One fixer per fixable code, and every other code says in its doc why it has no fix."""

from __future__ import annotations

import pytest

from llava_doctor.checks.base import all_checks
from llava_doctor.fixes.registry import ORDER, all_planners, planner
from llava_doctor.models import FixSafety


def _fixable_codes() -> set[str]:
    return {code for code, spec in all_checks().items()
            if spec.fix != FixSafety.none or spec.section("Fix").startswith(("Safe", "Unsafe"))}


def test_every_fixable_code_has_a_planner_and_no_planner_is_orphaned() -> None:
    planners = set(all_planners())
    assert planners == _fixable_codes()
    assert planners <= set(all_checks())
    assert planners == set(ORDER)


def test_every_other_code_explains_why_there_is_no_fix() -> None:
    planners = set(all_planners())
    for code, spec in all_checks().items():
        if code in planners:
            continue
        text = " ".join(spec.section("Fix").split())
        assert text.startswith("None"), (code, text)
        assert len(text.split()) >= 5, (code, text)  # "None: <why / what to do instead>"


def test_a_code_gets_one_planner() -> None:
    with pytest.raises(ValueError, match="duplicate planner for LD101"):
        planner("LD101")(lambda pi: None)  # type: ignore[arg-type,return-value]
