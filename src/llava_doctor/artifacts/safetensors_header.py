"""safetensors headers from raw bytes, with every rule of safetensors' own validator.

The rules and their order follow `SafeTensors::read_metadata` / `Metadata::validate` in the
safetensors Rust crate (see peers-merge-and-formats.md §5.3). Only the header is read; tensor
data is never touched, so a 26 GB shard costs one small read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from llava_doctor.artifacts.tensors import DTYPE_BITS, TensorInfo
from llava_doctor.errors import FileCorruptError

MAX_HEADER_SIZE = 100_000_000
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class SafetensorsHeader:
    """Validated header of one safetensors file."""

    path: Path
    header_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None = field(default=None)

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def parse_safetensors_header(head: bytes, file_size: int, path: Path | str) -> SafetensorsHeader:
    """Validate a header given its first bytes (at least 8 + N) and the total file size."""
    path = Path(path)

    def bad(rule: str, message: str, tensor: str | None = None) -> FileCorruptError:
        return FileCorruptError(f"invalid safetensors file: {message}", path=path, rule=rule,
                                tensor=tensor)

    if file_size < 8 or len(head) < 8:
        raise bad("header-too-small",
                  f"file is {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_SIZE:
        raise bad("header-too-large", f"declared header length {n} exceeds {MAX_HEADER_SIZE} bytes")
    if 8 + n > file_size:
        raise bad("invalid-header-length",
                  f"declared header length {n} runs past the end of the {file_size}-byte file "
                  "(truncated?)")
    raw = head[8:8 + n]
    if len(raw) < n:
        raise bad("invalid-header-length", f"could read only {len(raw)} of {n} header bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad("invalid-header-utf8", f"header is not UTF-8 (byte {e.start})") from None
    if not text.startswith("{"):
        raise bad("invalid-header-start", "header does not start with '{'")
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _Duplicate as d:
        raise bad("duplicate-tensor", f"tensor name '{d.key}' appears twice in the header",
                  tensor=d.key) from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise bad("invalid-header-json", f"header is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise bad("invalid-header-json", "header JSON is not an object")

    metadata = None
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, info in obj.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("invalid-metadata", "__metadata__ must map strings to strings")
            metadata = dict(info)
            continue
        # Like serde in safetensors: the three fields are required, unknown extra fields ignored.
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad("invalid-tensor-info",
                      f"tensor '{name}' must have dtype, shape and data_offsets",
                      tensor=name)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad("unknown-dtype", f"tensor '{name}' has unknown dtype {dtype!r}", tensor=name)
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _U64_MAX
                           for d in shape)):
            raise bad("invalid-shape", f"tensor '{name}' shape {shape!r} is not a list of sizes",
                      tensor=name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= _U64_MAX
                           for o in offsets)):
            raise bad("invalid-offsets", f"tensor '{name}' data_offsets {offsets!r} are not two "
                      "byte offsets", tensor=name)
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))

    entries.sort(key=lambda e: (e[0], e[1]))
    tensors: dict[str, TensorInfo] = {}
    expected_begin = 0
    data_start = 8 + n
    for begin, end, name, dtype, shape in entries:
        if begin != expected_begin or end < begin:
            raise bad("invalid-offset",
                      f"invalid offset for tensor '{name}': data_offsets [{begin}, {end}] do not "
                      f"start where the previous tensor ends ({expected_begin}); tensors must be "
                      "contiguous with no gaps or overlaps", tensor=name)
        numel = prod(shape)
        if numel > _U64_MAX:
            raise bad("validation-overflow", f"tensor '{name}' element count overflows",
                      tensor=name)
        nbits = numel * DTYPE_BITS[dtype]
        if nbits % 8:
            raise bad("misaligned-slice", f"tensor '{name}' is not a whole number of bytes",
                      tensor=name)
        if end - begin != nbits // 8:
            raise bad("tensor-invalid-info",
                      f"tensor '{name}' of shape {list(shape)} {dtype} needs {nbits // 8} bytes "
                      "but "
                      f"data_offsets span {end - begin}", tensor=name)
        tensors[name] = TensorInfo(name=name, dtype=dtype, shape=shape, nbytes=end - begin,
                                   offset=data_start + begin)
        expected_begin = end
    if data_start + expected_begin != file_size:
        raise bad("incomplete-buffer",
                  f"incomplete metadata, file not fully covered: tensors end at byte "
                  f"{data_start + expected_begin} but the file has {file_size} bytes"
                  + (" (truncated?)" if file_size < data_start + expected_begin else ""))
    # Keep header order for display: JSON order of the names.
    ordered = {name: tensors[name] for name in obj if name != "__metadata__"}
    return SafetensorsHeader(path=path, header_size=n, tensors=ordered, metadata=metadata)


def read_safetensors_header(path: Path | str) -> SafetensorsHeader:
    """Read and validate the header of ``path`` without reading tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            first = f.read(8)
            if len(first) == 8:
                (n,) = struct.unpack("<Q", first)
                rest = f.read(n) if n <= MAX_HEADER_SIZE and 8 + n <= size else b""
            else:
                rest = b""
    except OSError as e:
        raise FileCorruptError(f"cannot read file ({e.strerror})", path=path, rule="unreadable",
                               hint="check the path and its permissions") from None
    return parse_safetensors_header(first + rest, size, path)
