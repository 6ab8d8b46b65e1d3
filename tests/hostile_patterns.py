"""Hostile regular expressions for `adapter_config.json`: the corpus the tests, the fuzzer
(bench/fuzz.py) and bench/hardening_report.py share.

Each entry is one edit of a healthy adapter config that peft would evaluate with `re` on every
module name: catastrophic backtracking (nested quantifiers, alternation blow-ups, polynomial
repeats), a pattern too large to compile in time, and invalid patterns (peft raises re.error).
Every catastrophic one was measured to run for more than 3 s over the tiny fixture's ~40 module
names in CPython's `re` (most for hours); `expect` is the code `check` must report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ISSUE_PATTERN = r"^(a+)+$|(.*)*x(.*)*y(.*)*z"
# 200,000 alternatives, ~9 MB: compiling it alone takes longer than the budget.
HUGE_PATTERN = "|".join(rf"model\.layers\.{i}\.self_attn\.q{i}_proj" for i in range(200_000))


@dataclass(frozen=True)
class HostilePattern:
    name: str
    technique: str  # nested-quantifier | alternation | polynomial | huge | invalid
    field: str      # the adapter_config.json field the pattern is in
    pattern: str
    expect: str     # LD210 (over budget), LD202/LD203 (invalid: peft raises re.error)
    edit: Callable[[dict[str, Any]], None]


# The value each pattern-bearing field gets (rank/alpha patterns map a key to a number).
_KEY_VALUES = {"rank_pattern": 4, "alpha_pattern": 32}


def _edit(field: str, p: str) -> Callable[[dict[str, Any]], None]:
    """The config edit that puts pattern ``p`` into ``field`` the way peft reads that field."""
    def edit(cfg: dict[str, Any]) -> None:
        if field in _KEY_VALUES:
            cfg[field] = {p: _KEY_VALUES[field]}
        elif field == "modules_to_save":
            cfg[field] = [p]
        else:
            if field == "layers_pattern":
                cfg["layers_to_transform"] = [0]  # peft reads layers_pattern only with it
            cfg[field] = p
    return edit


def _entry(name: str, technique: str, field: str, pattern: str, expect: str) -> HostilePattern:
    return HostilePattern(name, technique, field, pattern, expect, _edit(field, pattern))


PATTERNS: list[HostilePattern] = [
    _entry("issue-17", "nested-quantifier", "target_modules", ISSUE_PATTERN, "LD210"),
    _entry("star-of-star", "nested-quantifier", "target_modules", r"(.*)*X", "LD210"),
    _entry("plus-of-plus", "nested-quantifier", "target_modules", r"((.)+)+X", "LD210"),
    _entry("overlapping-alternation", "alternation", "target_modules", r"(.|..|...)*X", "LD210"),
    _entry("many-alternatives", "alternation", "target_modules",
           r"(m|mo|o|d|de|e|l|el|a|y|ye|s|r|er|\.|\d|_|\w)*#", "LD210"),
    _entry("polynomial-repeat", "polynomial", "target_modules", r"(.*?.){12}Z", "LD210"),
    _entry("exclude-word-dot", "nested-quantifier", "exclude_modules", r"(\w+\.?)+!", "LD210"),
    _entry("rank-key", "alternation", "rank_pattern", r"(.|..|...)*X", "LD210"),
    _entry("alpha-key", "nested-quantifier", "alpha_pattern", r"((.)+)+Y", "LD210"),
    _entry("layers-pattern", "alternation", "layers_pattern", r"(.|..|...)*Q", "LD210"),
    _entry("modules-to-save", "alternation", "modules_to_save", r"(.|..|...)*Q", "LD210"),
    _entry("huge-alternation", "huge", "target_modules", HUGE_PATTERN, "LD210"),
    _entry("unclosed-group", "invalid", "target_modules", r"(q_proj|v_proj", "LD202"),
    _entry("nothing-to-repeat", "invalid", "target_modules", r"*_proj", "LD202"),
    # \p{..} is valid for the `regex` package but not for `re`, which peft uses.
    _entry("unicode-property", "invalid", "target_modules", r"\p{L}+_proj", "LD202"),
    _entry("bad-range-key", "invalid", "rank_pattern", r"[z-a]_proj", "LD203"),
    _entry("idx-redefined", "invalid", "layers_pattern", r"(?P<idx>layers)", "LD202"),
]

CATASTROPHIC = [p for p in PATTERNS if p.expect == "LD210"]
INVALID = [p for p in PATTERNS if p.expect != "LD210"]
