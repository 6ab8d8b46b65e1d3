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


def _target(p: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["target_modules"] = p
    return edit


def _exclude(p: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["exclude_modules"] = p
    return edit


def _key(fieldname: str, p: str, value: float) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg[fieldname] = {p: value}
    return edit


def _layers(p: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["layers_to_transform"] = [0]
        cfg["layers_pattern"] = p
    return edit


def _saved(p: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["modules_to_save"] = [p]
    return edit


def _entry(name: str, technique: str, field: str, pattern: str, expect: str,
           edit: Callable[[dict[str, Any]], None]) -> HostilePattern:
    return HostilePattern(name, technique, field, pattern, expect, edit)


PATTERNS: list[HostilePattern] = [
    _entry("issue-17", "nested-quantifier", "target_modules", ISSUE_PATTERN, "LD210",
           _target(ISSUE_PATTERN)),
    _entry("star-of-star", "nested-quantifier", "target_modules", r"(.*)*X", "LD210",
           _target(r"(.*)*X")),
    _entry("plus-of-plus", "nested-quantifier", "target_modules", r"((.)+)+X", "LD210",
           _target(r"((.)+)+X")),
    _entry("overlapping-alternation", "alternation", "target_modules", r"(.|..|...)*X", "LD210",
           _target(r"(.|..|...)*X")),
    _entry("many-alternatives", "alternation", "target_modules",
           r"(m|mo|o|d|de|e|l|el|a|y|ye|s|r|er|\.|\d|_|\w)*#", "LD210",
           _target(r"(m|mo|o|d|de|e|l|el|a|y|ye|s|r|er|\.|\d|_|\w)*#")),
    _entry("polynomial-repeat", "polynomial", "target_modules", r"(.*?.){12}Z", "LD210",
           _target(r"(.*?.){12}Z")),
    _entry("exclude-word-dot", "nested-quantifier", "exclude_modules", r"(\w+\.?)+!", "LD210",
           _exclude(r"(\w+\.?)+!")),
    _entry("rank-key", "alternation", "rank_pattern", r"(.|..|...)*X", "LD210",
           _key("rank_pattern", r"(.|..|...)*X", 4)),
    _entry("alpha-key", "nested-quantifier", "alpha_pattern", r"((.)+)+Y", "LD210",
           _key("alpha_pattern", r"((.)+)+Y", 32)),
    _entry("layers-pattern", "alternation", "layers_pattern", r"(.|..|...)*Q", "LD210",
           _layers(r"(.|..|...)*Q")),
    _entry("modules-to-save", "alternation", "modules_to_save", r"(.|..|...)*Q", "LD210",
           _saved(r"(.|..|...)*Q")),
    _entry("huge-alternation", "huge", "target_modules", HUGE_PATTERN, "LD210",
           _target(HUGE_PATTERN)),
    _entry("unclosed-group", "invalid", "target_modules", r"(q_proj|v_proj", "LD202",
           _target(r"(q_proj|v_proj")),
    _entry("nothing-to-repeat", "invalid", "target_modules", r"*_proj", "LD202",
           _target(r"*_proj")),
    # \p{..} is valid for the `regex` package but not for `re`, which peft uses.
    _entry("unicode-property", "invalid", "target_modules", r"\p{L}+_proj", "LD202",
           _target(r"\p{L}+_proj")),
    _entry("bad-range-key", "invalid", "rank_pattern", r"[z-a]_proj", "LD203",
           _key("rank_pattern", r"[z-a]_proj", 4)),
    _entry("idx-redefined", "invalid", "layers_pattern", r"(?P<idx>layers)", "LD202",
           _layers(r"(?P<idx>layers)")),
]

CATASTROPHIC = [p for p in PATTERNS if p.expect == "LD210"]
INVALID = [p for p in PATTERNS if p.expect != "LD210"]
