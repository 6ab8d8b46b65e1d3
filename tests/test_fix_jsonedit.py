"""JSON rewrites change only the fixed keys, in the file's own layout and key order."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llava_doctor.fixes.jsonedit import DELETE, detect_style, dump_json, edit_json_text

TRANSFORMERS = json.dumps({"a": 1, "model_type": "llava", "q": {"x": [1, 2]}, "z": None},
                          indent=2, sort_keys=True) + "\n"


def test_replace_one_value_keeps_every_other_byte() -> None:
    out = edit_json_text(TRANSFORMERS, {"model_type": "llava_llama"})
    assert out == TRANSFORMERS.replace('"llava"', '"llava_llama"')


def test_delete_a_nested_member_removes_exactly_its_lines() -> None:
    out = edit_json_text(TRANSFORMERS, {"q": DELETE})
    assert out == '{\n  "a": 1,\n  "model_type": "llava",\n  "z": null\n}\n'


def test_delete_first_last_and_only_member() -> None:
    assert edit_json_text(TRANSFORMERS, {"a": DELETE}).startswith('{\n  "model_type"')
    assert edit_json_text(TRANSFORMERS, {"z": DELETE}).endswith(']\n  }\n}\n')
    assert edit_json_text('{"k": 1}', {"k": DELETE}) == "{}"


def test_new_key_goes_to_its_sorted_place_with_nested_indentation() -> None:
    out = edit_json_text(TRANSFORMERS, {"m": {"b": [True]}})
    assert out == ('{\n  "a": 1,\n  "m": {\n    "b": [\n      true\n    ]\n  },\n'
                   '  "model_type": "llava",\n  "q": {\n    "x": [\n      1,\n      2\n    ]\n'
                   '  },\n  "z": null\n}\n')


def test_unsorted_file_gets_new_keys_at_the_end_and_peft_style_has_no_newline() -> None:
    text = '{\n    "r": 8,\n    "lora_alpha": 16\n}'
    out = edit_json_text(text, {"use_rslora": DELETE, "peft_type": "LORA"})
    assert out == '{\n    "r": 8,\n    "lora_alpha": 16,\n    "peft_type": "LORA"\n}'


def test_one_line_file_stays_one_line() -> None:
    assert edit_json_text('{"b": 1, "a": [1, 2]}', {"b": 2, "c": 3}) == \
        '{"b": 2, "a": [1, 2], "c": 3}'


def test_non_ascii_is_kept_raw_when_the_file_has_it_raw() -> None:
    out = edit_json_text('{\n  "name": "caf\u00e9",\n  "x": 1\n}\n', {"x": "\u00fc"})
    assert out == '{\n  "name": "caf\u00e9",\n  "x": "\u00fc"\n}\n'


def test_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        edit_json_text("[1, 2]", {"a": 1})


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
_values = st.recursive(_scalars, lambda c: st.one_of(
    st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)), max_leaves=6)
_keys = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(obj=st.dictionaries(_keys, _values, max_size=6),
       edits=st.dictionaries(_keys, st.one_of(_values, st.just(DELETE)), max_size=4),
       indent=st.sampled_from([None, 2, 4]), sort=st.booleans(), newline=st.booleans(),
       ascii_=st.booleans())
def test_splice_equals_a_full_redump_in_the_same_style(obj, edits, indent, sort, newline,
                                                       ascii_) -> None:
    """For any file json.dumps wrote, editing it is what re-dumping the edited object in the
    same layout would give: so no byte outside the edited members can change."""
    text = json.dumps(obj, indent=indent, sort_keys=sort, ensure_ascii=ascii_) \
        + ("\n" if newline else "")
    out = edit_json_text(text, edits)
    expected = dict(obj)
    for k, v in edits.items():
        if v is DELETE:
            expected.pop(k, None)
        else:
            expected[k] = v
    style = detect_style(text)
    # An unsorted file whose top-level keys happen to be in order looks sorted; a re-dump would
    # then also sort its nested dicts, which the splice rightly leaves alone.
    assume(style.sort_keys == sort or not any(_has_dict(v) for v in obj.values()))
    assert json.loads(out) == expected
    assert out == dump_json(expected, style)
    if not edits:
        assert out == text


def _has_dict(v) -> bool:
    if isinstance(v, dict):
        return True
    return isinstance(v, list) and any(_has_dict(x) for x in v)
