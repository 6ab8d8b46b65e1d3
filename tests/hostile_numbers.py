"""Extreme numbers for every numeric config field the checks read: the corpus the tests and
the fuzzer (bench/fuzz.py) share.

Values are JSON text, put in place of the field's value, so that numbers `json.dumps` would
refuse to write (a 5,000-digit integer, NaN, Infinity) reach the reader exactly as a damaged
or hand-edited file would hold them.
"""

from __future__ import annotations

import json
from typing import Any

# JSON texts: huge, negative, zero, float where int, NaN/Infinity, 1e308, beyond float, wrong
# JSON types.
EXTREMES: list[str] = [
    "1000000000", "1000000000000000", "1" + "0" * 100, "9" * 5000,
    "-1", "-64", "0", "1.5", "8.0", "1e308", "-1e308", "1e309", "5e-324",
    "NaN", "Infinity", "-Infinity", "true", '"8"', "null", "[]", "{}",
]
# The subset a deterministic test runs for every field (the fuzzer draws from all of them).
CORE_EXTREMES: list[str] = ["1000000000", "9" * 5000, "-64", "0", "1.5", "1e308", "NaN"]

# file -> dotted field paths ("a.b": key b of the object at key a; created when absent).
NUMERIC_FIELDS: dict[str, list[str]] = {
    "config.json": ["hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size", "mm_hidden_size",
                    "head_dim", "mm_vision_select_layer", "text_config.hidden_size",
                    "text_config.num_hidden_layers", "text_config.vocab_size"],
    "adapter_config.json": ["r", "lora_alpha", "lora_dropout", "layers_to_transform",
                            "rank_pattern.q_proj", "alpha_pattern.v_proj",
                            "rank_pattern.model\\.layers\\.0\\.mlp\\.down_proj"],
}
# Strings whose digits the checks parse: the projector depth.
NUMERIC_STRINGS: dict[str, list[tuple[str, str]]] = {
    "config.json": [("mm_projector_type", "mlp{n}x_gelu"),
                    ("mm_projector_type", "mlp{n}x_res{n}x_gelu")],
}
DEPTHS = ["0", "3", "257", "100000000", "9" * 5000]

_MARK = "__llava_doctor_extreme__"


def with_numbers(text: str, changes: dict[str, str]) -> str:
    """The JSON config ``text`` with each field of ``changes`` set to its raw JSON token."""
    data: Any = json.loads(text)
    marks = {}
    for n, (field, token) in enumerate(changes.items()):
        mark = f"{_MARK}{n}"
        marks[mark] = token
        head, _, key = field.partition(".")
        # the key inside a pattern dict is the whole rest ("rank_pattern.model\.layers...")
        if key:
            inner = data.get(head)
            data[head] = {**(inner if isinstance(inner, dict) else {}), key: mark}
        else:
            data[head] = mark
    out = json.dumps(data, indent=2)
    for mark, token in marks.items():
        out = out.replace(f'"{mark}"', token)
    return out


def with_number(text: str, field: str, token: str) -> str:
    """The JSON config ``text`` with ``field`` set to the raw JSON ``token``."""
    return with_numbers(text, {field: token})


def with_depth(text: str, field: str, template: str, n: str) -> str:
    """The JSON config ``text`` with a projector type whose declared depth is ``n``."""
    data = json.loads(text)
    data[field] = template.format(n=n)
    return json.dumps(data, indent=2)


def every_case(core_only: bool = False) -> list[tuple[str, str, str]]:
    """(file, field, JSON token) for every numeric field and extreme value."""
    values = CORE_EXTREMES if core_only else EXTREMES
    return [(f, field, v) for f, fields in NUMERIC_FIELDS.items() for field in fields
            for v in values]
