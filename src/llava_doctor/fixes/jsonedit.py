"""Edit top-level keys of a JSON object file without touching the rest of its text.

transformers writes configs with `json.dumps(indent=2, sort_keys=True) + "\\n"`, peft without the
trailing newline, hand-edited files any way at all. A fix must change only the keys it fixes, so
instead of re-serialising the whole object we splice the text: the span of each top-level member
is found with the json module's own scanner, and only the edited members are rewritten, in the
file's indentation, separators and key order (sorted files stay sorted).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]  # public, not in typeshed
from typing import Any

__all__ = ["DELETE", "JsonStyle", "detect_style", "dump_json", "edit_json_text",
           "TRANSFORMERS_STYLE"]


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


#: Edit value meaning "remove this key".
DELETE: Any = _Delete()


@dataclass(frozen=True)
class JsonStyle:
    """How a JSON file is laid out."""

    indent: str | None = "  "       # None: one line
    key_sep: str = ": "
    item_sep: str = ", "             # only used when indent is None
    trailing_newline: bool = True
    ensure_ascii: bool = True
    sort_keys: bool = True


#: What `PretrainedConfig.to_json_file` writes.
TRANSFORMERS_STYLE = JsonStyle()

_WS = " \t\n\r"


@dataclass(frozen=True)
class _Member:
    key: str
    key_start: int    # index of the opening quote of the key
    value_start: int
    value_end: int    # one past the value


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _members(text: str) -> tuple[int, int, list[_Member]]:
    """(index of `{`, index of the closing `}`, top-level members) of a JSON object text."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "{":
        raise ValueError("not a JSON object")
    open_at = i
    i = _skip_ws(text, i + 1)
    members: list[_Member] = []
    if text[i] == "}":
        return open_at, i, members
    while True:
        if text[i] != '"':
            raise ValueError(f"expected a key at {i}")
        key, after_key = scanstring(text, i + 1)
        j = _skip_ws(text, after_key)
        if text[j] != ":":
            raise ValueError(f"expected ':' at {j}")
        v = _skip_ws(text, j + 1)
        _, end = decoder.raw_decode(text, v)
        members.append(_Member(key, i, v, end))
        k = _skip_ws(text, end)
        if text[k] == ",":
            i = _skip_ws(text, k + 1)
            continue
        if text[k] == "}":
            return open_at, k, members
        raise ValueError(f"expected ',' or '}}' at {k}")


def detect_style(text: str) -> JsonStyle:
    """The layout of an existing JSON object text (defaults to transformers' for `{}`)."""
    try:
        open_at, close_at, members = _members(text)
    except (ValueError, IndexError):
        return TRANSFORMERS_STYLE
    # json.dumps(ensure_ascii=True) escapes everything from DEL (0x7f) up.
    ensure_ascii = all(ord(c) < 0x7f for c in text)
    trailing = text.endswith("\n")
    if not members:
        return JsonStyle(trailing_newline=trailing, ensure_ascii=ensure_ascii)
    first = members[0]
    _, after_key = scanstring(text, first.key_start + 1)
    key_sep = text[after_key:first.value_start]
    gap = text[open_at + 1:first.key_start]
    keys = [m.key for m in members]
    sort_keys = len(keys) > 1 and keys == sorted(keys)
    if "\n" in gap:
        indent = gap[gap.rfind("\n") + 1:]
        return JsonStyle(indent=indent, key_sep=key_sep, trailing_newline=trailing,
                         ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    item_sep = ", "
    if len(members) > 1:
        between = text[members[0].value_end:members[1].key_start]
        item_sep = between.strip(_WS) and ("," + between.split(",", 1)[1])
    return JsonStyle(indent=None, key_sep=key_sep, item_sep=item_sep or ", ",
                     trailing_newline=trailing, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def dump_json(obj: Any, style: JsonStyle = TRANSFORMERS_STYLE) -> str:
    """Serialise a whole object in `style` (used for files we create)."""
    if style.indent is not None:
        text = json.dumps(obj, indent=style.indent, separators=(",", style.key_sep),
                          ensure_ascii=style.ensure_ascii, sort_keys=style.sort_keys)
    else:
        text = json.dumps(obj, separators=(style.item_sep, style.key_sep),
                          ensure_ascii=style.ensure_ascii, sort_keys=style.sort_keys)
    return text + ("\n" if style.trailing_newline else "")


def _value_text(value: Any, style: JsonStyle, member_indent: str) -> str:
    if style.indent is None:
        return json.dumps(value, separators=(style.item_sep, style.key_sep),
                          ensure_ascii=style.ensure_ascii, sort_keys=style.sort_keys)
    raw = json.dumps(value, indent=style.indent, separators=(",", style.key_sep),
                     ensure_ascii=style.ensure_ascii, sort_keys=style.sort_keys)
    lines = raw.split("\n")
    return "\n".join([lines[0]] + [member_indent + ln for ln in lines[1:]])


def _member_text(key: str, value: Any, style: JsonStyle, member_indent: str) -> str:
    k = json.dumps(key, ensure_ascii=style.ensure_ascii)
    return f"{k}{style.key_sep}{_value_text(value, style, member_indent)}"


def _line_indent(text: str, at: int) -> str:
    start = text.rfind("\n", 0, at) + 1
    seg = text[start:at]
    return seg if not seg.strip(_WS) else ""


def _edit_one(text: str, key: str, value: Any, style: JsonStyle) -> str:
    open_at, close_at, members = _members(text)
    idx = next((n for n, m in enumerate(members) if m.key == key), None)
    if idx is not None:
        m = members[idx]
        if value is DELETE:
            if len(members) == 1:
                return text[:open_at + 1] + text[close_at:]
            if idx > 0:  # drop ", <key>: <value>" from the end of the previous member
                return text[:members[idx - 1].value_end] + text[m.value_end:]
            return text[:m.key_start] + text[members[1].key_start:]
        indent = _line_indent(text, m.key_start) if style.indent is not None else ""
        return text[:m.value_start] + _value_text(value, style, indent) + text[m.value_end:]
    if value is DELETE:
        return text
    if not members:
        if style.indent is None:
            return text[:open_at + 1] + _member_text(key, value, style, "") + text[close_at:]
        inner = "\n" + style.indent + _member_text(key, value, style, style.indent) + "\n"
        return text[:open_at + 1] + inner + text[close_at:]
    keys = [m.key for m in members]
    if style.sort_keys and keys == sorted(keys):
        pos = next((n for n, k in enumerate(keys) if k > key), len(keys))
    else:
        pos = len(keys)
    ref = members[pos] if pos < len(members) else members[-1]
    indent = _line_indent(text, ref.key_start) if style.indent is not None else ""
    # What follows a comma between two members: learnt from the file when it has two members,
    # else the style's own.
    if len(members) > 1:
        gap = text[members[0].value_end:members[1].key_start]
        sep_ws = gap.split(",", 1)[1] if "," in gap else gap
    else:
        sep_ws = ("\n" + indent) if style.indent is not None else style.item_sep.lstrip(",")
    if pos < len(members):
        return (text[:ref.key_start] + _member_text(key, value, style, indent) + "," + sep_ws
                + text[ref.key_start:])
    return (text[:ref.value_end] + "," + sep_ws + _member_text(key, value, style, indent)
            + text[ref.value_end:])


def edit_json_text(text: str, edits: Mapping[str, Any]) -> str:
    """`text` with each top-level key in `edits` set to its value (or removed, for DELETE).

    Every other byte of the text is kept. The result is verified by parsing it; if the splice
    cannot reproduce the intended object (a file we cannot scan), the whole object is
    re-serialised in the detected style instead.
    """
    original = json.loads(text)
    if not isinstance(original, dict):
        raise ValueError("not a JSON object")
    expected = dict(original)
    for k, v in edits.items():
        if v is DELETE:
            expected.pop(k, None)
        else:
            expected[k] = v
    style = detect_style(text)
    out = text
    try:
        for k, v in edits.items():
            out = _edit_one(out, k, v, style)
        if json.loads(out) == expected:
            return out
    except (ValueError, IndexError):
        pass
    return dump_json(expected, style)
