"""Patterns from artifacts, evaluated with a time bound, give exactly peft's answers when they
finish, and a verdict (never a hang) when they do not."""

from __future__ import annotations

import re
import time

import pytest

from llava_doctor.artifacts import bounded_re
from llava_doctor.artifacts.bounded_re import (
    PatternTimeout,
    PatternUse,
    config_patterns,
    direct,
    evaluate,
    evaluate_config,
    with_ancestors,
)
from llava_doctor.artifacts.peft_match import config_matches, effective_r_alpha, module_scaling

# peft's own test cases for check_target_module_exists (peft tests/test_tuners_utils.py,
# REGEX_TEST_CASES): key, target_modules, layers_to_transform, layers_pattern, expected.
# The last word is the installed peft's own `check_target_module_exists` when it is there.
PEFT_REGEX_CASES = [
    ("", [], None, None, False),
    ("", ["foo"], None, None, False),
    ("foo", [], None, None, False),
    ("foo", ["foo"], None, None, True),
    ("foo", ["bar"], None, None, False),
    ("foo", ["foo", "bar"], None, None, True),
    ("foo", "foo", None, None, True),
    ("foo", ".*oo", None, None, True),
    ("foo", "fo.*", None, None, True),
    ("foo", ".*bar.*", None, None, False),
    ("foobar", ".*oba.*", None, None, True),
    ("foo.bar.1.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.1.baz", ["baz"], [0], ["bar"], False),
    ("foo.bar.1.baz", ["baz"], [2], ["bar"], False),
    ("foo.bar.10.baz", ["baz"], [0], ["bar"], False),
    ("foo.bar.10.baz", ["baz"], [1], ["bar"], False),
    ("foo.bar.1.baz", ["baz"], [0, 1, 2], ["bar"], True),
    ("foo.bar.1.baz", ["baz", "spam"], [1], ["bar"], True),
    ("foo.bar.1.baz", ["baz", "spam"], [0, 1, 2], ["bar"], True),
    ("foo.whatever.1.baz", ["baz"], [1], [], True),
    ("foo.whatever.1.baz", ["baz"], [0], [], False),
    ("foo.whatever.1.baz", ["baz"], [1], "", True),
    ("foo.whatever.1.baz", ["baz"], [0], "", False),
    ("foo.whatever.1.baz", ["baz"], [1], None, True),
    ("foo.whatever.1.baz", ["baz"], [0], None, False),
    ("transformer.h.1.attn.attention.q_proj.foo", ["q_proj"], None, [], False),
    ("transformer.h.1.attn.attention.q_proj", [], None, [], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], None, [], True),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj", "v_proj"], None, [], True),
    ("transformer.h.1.attn.attention.resid_dropout", ["q_proj", "v_proj"], None, [], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [1], ["h"], True),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [0], ["h"], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [2], ["h"], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [0, 1, 2], ["h"], True),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj", "v_proj"], [0, 1, 2], ["h"], True),
    ("foo.bar.q_proj", ["q_proj"], None, [], True),
    ("foo.bar.1.baz", ["baz"], [1], ["foo"], False),
    ("foo.bar.1.baz", ["baz"], [1], ["baz"], False),
    # the suite of older peft says False; peft 0.21 (the reference here) also accepts the
    # pattern at the start of the name, `(?:^|.*?\.)`, so it matches
    ("bar.1.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.001.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.1.spam.2.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.2.spam.1.baz", ["baz"], [1], ["bar"], False),
    ("blocks.1.weight", ["weight"], [1], ["blocks"], True),  # likewise (older suite: False)
    ("blocks.1.bias", ["weight"], [1], ["blocks"], False),
    ("mlp.blocks.1.weight", ["weight"], [1], ["blocks"], True),
    ("mlp.blocks.1.bias", ["weight"], [1], ["blocks"], False),
]


@pytest.mark.parametrize("key,target,layers,pattern,expected", PEFT_REGEX_CASES)
def test_peft_regex_cases_through_the_bounded_matcher(key, target, layers, pattern, expected):
    cfg = {"target_modules": target, "layers_to_transform": layers, "layers_pattern": pattern}
    ev = evaluate_config(cfg, with_ancestors([key]))
    assert config_matches(cfg, key, matcher=ev) is expected
    assert config_matches(cfg, key) is expected
    peft_utils = pytest.importorskip("peft.tuners.tuners_utils")
    from peft import LoraConfig

    peft_cfg = LoraConfig(target_modules=target, layers_to_transform=layers,
                          layers_pattern=pattern)
    assert bool(peft_utils.check_target_module_exists(peft_cfg, key)) is expected


LAYERS = [f"model.layers.{i}.{s}" for i in range(3)
          for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm")]
NAMES = sorted(with_ancestors(LAYERS + ["model.embed_tokens", "model.norm", "lm_head"]))
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = [
    dict(target_modules=r".*\.(q_proj|v_proj)"),
    dict(target_modules=r"model\.layers\.1\..*_proj", exclude_modules=r".*k_proj"),
    dict(target_modules="q_proj"),
    dict(target_modules=ALL7, layers_to_transform=[0, 2], layers_pattern=["blocks", "layers"]),
    dict(target_modules=ALL7, layers_to_transform=1, layers_pattern="lay|layers"),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head", "embed_tokens"]),
    dict(target_modules=ALL7, r=8, lora_alpha=16,
         rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
         alpha_pattern={"v_proj": 32, "^model.layers.0.self_attn.k_proj": 3}),
    dict(target_modules=ALL7, r=8, lora_alpha=16, use_rslora=True,
         rank_pattern={"model.layers.2.self_attn.o_proj": 6}, alpha_pattern={"gate_proj": 5}),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
@pytest.mark.parametrize("version", [None, "0.10.0", "0.14.0"])
def test_bounded_answers_equal_direct_ones(cfg, version):
    """The table from the child equals in-process `re` for every name, rule set and field."""
    from llava_doctor.artifacts.peft_versions import parse_version

    ev = evaluate_config(cfg, NAMES, peft_version=parse_version(version) if version else None)
    assert all(v.status == "ok" for v in ev.verdicts.values())
    for name in NAMES:
        assert config_matches(cfg, name, matcher=ev) is config_matches(cfg, name), name
        assert effective_r_alpha(cfg, name, version, matcher=ev) == \
            effective_r_alpha(cfg, name, version), name
        assert module_scaling(cfg, name, version, matcher=ev) == \
            module_scaling(cfg, name, version), name


def test_which_fields_are_patterns():
    cfg = {"target_modules": ALL7, "exclude_modules": "x", "modules_to_save": ["lm_head"],
           "layers_to_transform": [0], "layers_pattern": ["layers", "h"],
           "rank_pattern": {"q": 2}, "alpha_pattern": {"v": 3}}
    got = [(u.field, u.use, u.pattern) for u in config_patterns(cfg)]
    assert got == [("exclude_modules", "fullmatch", "x"), ("modules_to_save", "saved", "lm_head"),
                   ("layers_pattern", "layer", "layers"), ("layers_pattern", "layer", "h"),
                   ("rank_pattern", "key_new", "q"), ("alpha_pattern", "key_new", "v")]
    assert [u.use for u in config_patterns(cfg, (0, 10, 0))][-2:] == ["key_old", "key_old"]
    assert [u.field for u in config_patterns(cfg, (0, 5, 0))][-1] == "layers_pattern"
    # all-linear is peft's shorthand, not a regex; layers_pattern without layers is unused
    assert config_patterns({"target_modules": "ALL-LINEAR", "layers_pattern": "h"}) == []


def test_invalid_pattern_raises_the_error_re_gives():
    ev = evaluate([PatternUse("target_modules", "fullmatch", "(q_proj")], NAMES)
    with pytest.raises(re.error) as got:
        config_matches({"target_modules": "(q_proj"}, NAMES[0], matcher=ev)
    with pytest.raises(re.error) as want:
        direct("fullmatch", "(q_proj", NAMES[0])
    assert str(got.value) == str(want.value) == "missing ), unterminated subpattern at position 0"


def test_catastrophic_pattern_is_stopped_at_the_budget():
    t0 = time.monotonic()
    ev = evaluate([PatternUse("target_modules", "fullmatch", r"(.*)*X"),
                   PatternUse("exclude_modules", "fullmatch", r".*k_proj")], NAMES, budget=0.5)
    took = time.monotonic() - t0
    slow = ev.verdicts[("fullmatch", r"(.*)*X")]
    assert slow.status == "over-budget" and slow.names == len(NAMES)
    assert slow.describe() == (
        f'the target_modules pattern "(.*)*X" did not finish within 0.5 s over {len(NAMES)} '
        "module names (killed at the budget); peft evaluates it with Python's re on the same "
        "names and would hang on it too")
    # the pattern after it is still evaluated, in a fresh child
    assert ev.verdicts[("fullmatch", r".*k_proj")].status == "ok"
    assert ev("fullmatch", r".*k_proj", "model.layers.0.self_attn.k_proj") == ""
    with pytest.raises(PatternTimeout):
        config_matches({"target_modules": r"(.*)*X"}, NAMES[0], matcher=ev)
    assert took < 5


def test_many_hostile_keys_cost_at_most_a_few_budgets():
    keys = {rf"((.)+)+X{i}": i + 1 for i in range(6)}
    t0 = time.monotonic()
    ev = evaluate_config({"target_modules": ALL7, "rank_pattern": keys}, NAMES, budget=0.3)
    took = time.monotonic() - t0
    statuses = [v.status for v in ev.verdicts.values()]
    assert statuses == ["over-budget"] * bounded_re.MAX_OVER_BUDGET + \
        ["not-evaluated"] * (6 - bounded_re.MAX_OVER_BUDGET)
    assert len(ev.over_budget) == 6
    assert took < bounded_re.MAX_OVER_BUDGET * 0.3 + 4


def test_names_outside_the_table_are_a_bug_not_a_guess():
    ev = evaluate_config({"target_modules": "q"}, ["a.q"])
    with pytest.raises(LookupError):
        ev("fullmatch", "q", "b.q")


def test_the_config_has_a_total_budget_too():
    uses = [PatternUse("rank_pattern", "key_new", r"((.)+)+X"),
            PatternUse("rank_pattern", "key_new", r"((.)+)+Y"),
            PatternUse("rank_pattern", "key_new", "q_proj")]
    t0 = time.monotonic()
    ev = evaluate(uses, NAMES, budget=0.4, total=0.5)
    assert time.monotonic() - t0 < 4
    got = [(v.status, v.error) for v in ev.verdicts.values()]
    assert got[0] == ("over-budget", "killed at the budget")
    assert got[1:] == [("not-evaluated", "the patterns of this config together ran past 0.5 s")] * 2


def test_too_many_patterns_are_not_evaluated_at_all():
    cfg = {"target_modules": ALL7, "rank_pattern": {f"k{i}_proj": 2 for i in range(1500)}}
    t0 = time.monotonic()
    ev = evaluate_config(cfg, NAMES)
    assert time.monotonic() - t0 < 1
    assert ev.verdicts == {}
    assert [v.describe() for v in ev.over_budget] == [
        "the config holds 1,500 patterns (more than 1,000); peft scans every module name with "
        "each of them: none was evaluated"]
    with pytest.raises(PatternTimeout):
        effective_r_alpha(cfg, NAMES[0], matcher=ev)
