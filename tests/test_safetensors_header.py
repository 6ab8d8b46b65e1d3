"""The safetensors header reader against files written by safetensors itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llava_doctor.artifacts.safetensors_header import (
    parse_safetensors_header,
    read_safetensors_header,
)
from llava_doctor.errors import FileCorruptError


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(12, dtype=torch.float16).reshape(3, 4),
               "b": torch.ones(3, dtype=torch.bfloat16),
               "s": torch.tensor(7, dtype=torch.int64),
               "e": torch.zeros(0, 5)}, str(p), metadata={"format": "pt"})
    return p


def _raw(header: dict, data: bytes = b"", pad: bool = True) -> bytes:
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def test_matches_safetensors_own_view(small: Path) -> None:
    hdr = read_safetensors_header(small)
    with safe_open(str(small), framework="pt") as f:
        assert set(f.keys()) == set(hdr.tensors)
        assert f.metadata() == hdr.metadata
        for name in f.keys():
            t = f.get_tensor(name)
            info = hdr.tensors[name]
            assert tuple(t.shape) == info.shape
            assert t.numel() * t.element_size() == info.nbytes
    # offsets point at the real bytes
    raw = small.read_bytes()
    w = hdr.tensors["w"]
    assert raw[w.offset:w.offset + w.nbytes] == torch.arange(12, dtype=torch.float16).numpy().tobytes()


@pytest.mark.parametrize("header,data,rule", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "incomplete-buffer"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "incomplete-buffer"),
    ({"t": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown-dtype"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "tensor-invalid-info"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "invalid-offset"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "invalid-offset"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12, "invalid-offset"),
    ({"__metadata__": {"format": 1}}, b"", "invalid-metadata"),
    ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "invalid-shape"),
    ({"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8,
     "validation-overflow"),
    ({"t": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "invalid-tensor-info"),
])
def test_each_rule(tmp_path: Path, header: dict, data: bytes, rule: str) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(_raw(header, data))
    with pytest.raises(FileCorruptError) as ei:
        read_safetensors_header(p)
    assert ei.value.rule == rule
    assert str(p) in str(ei.value)
    with pytest.raises((SafetensorError, Exception)):  # safetensors itself rejects it too
        with safe_open(str(p), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_duplicate_names_detected(tmp_path: Path) -> None:
    h = (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
         b'"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    p = tmp_path / "d.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    with pytest.raises(FileCorruptError) as ei:
        read_safetensors_header(p)
    assert ei.value.rule == "duplicate-tensor" and ei.value.tensor == "t"


def test_header_length_rules(tmp_path: Path) -> None:
    p = tmp_path / "h.safetensors"
    for raw, rule in [(b"\x01\x02", "header-too-small"),
                      (struct.pack("<Q", 200_000_000) + b"{}", "header-too-large"),
                      (struct.pack("<Q", 64) + b"{}", "invalid-header-length"),
                      (struct.pack("<Q", 2) + b"\xff\xfe", "invalid-header-utf8"),
                      (struct.pack("<Q", 2) + b"[]", "invalid-header-start"),
                      (struct.pack("<Q", 3) + b"{x}", "invalid-header-json")]:
        p.write_bytes(raw)
        with pytest.raises(FileCorruptError) as ei:
            read_safetensors_header(p)
        assert ei.value.rule == rule, raw


def test_every_truncation_point_is_rejected(small: Path, tmp_path: Path) -> None:
    raw = small.read_bytes()
    for cut in range(len(raw)):
        with pytest.raises(FileCorruptError):
            parse_safetensors_header(raw[:cut], cut, tmp_path / "t.safetensors")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0, max_value=10_000), val=st.integers(min_value=0, max_value=255))
def test_byte_mutations_agree_with_safetensors(small: Path, tmp_path: Path, pos: int,
                                               val: int) -> None:
    """Differential: wherever we accept a mutated file, safetensors can read every tensor."""
    raw = bytearray(small.read_bytes())
    pos %= len(raw)
    raw[pos] = val
    p = tmp_path / "m.safetensors"
    p.write_bytes(bytes(raw))
    try:
        hdr = read_safetensors_header(p)
    except FileCorruptError:
        return
    with safe_open(str(p), framework="pt") as f:
        assert set(f.keys()) == set(hdr.tensors)
        for k in f.keys():
            assert tuple(f.get_tensor(k).shape) == hdr.tensors[k].shape
