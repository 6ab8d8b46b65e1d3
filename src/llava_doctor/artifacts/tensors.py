"""Tensor metadata shared by every weight-file reader. No data is read here."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

# safetensors dtype string -> bits per element (safetensors' own `Dtype` enum).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}

# torch dtype name (as in `torch.float16` -> "float16") -> safetensors dtype string.
TORCH_TO_ST: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "complex64": "C64",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0",
}
ST_TO_TORCH: dict[str, str] = {v: k for k, v in TORCH_TO_ST.items()}

# Legacy torch storage class name -> safetensors dtype string.
STORAGE_TO_ST: dict[str, str] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def dtype_size(dtype: str) -> int:
    """Bytes per element for a byte-aligned dtype (raises KeyError for unknown dtypes)."""
    return max(1, DTYPE_BITS[dtype] // 8)


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: enough to plan a merge without reading data.

    ``offset`` is format specific: for safetensors the absolute byte offset of the first byte in
    the file; for torch files the byte offset inside the storage record ``storage_key``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int | None = None
    storage_key: str | None = None
    stride: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def torch_dtype_name(self) -> str:
        return ST_TO_TORCH.get(self.dtype, self.dtype)


@dataclass(frozen=True)
class StorageRecord:
    """Where the bytes of one ``torch.save`` storage live in the file (found by the pickle walk).

    ``offset`` is, for a zip member, the offset of its local file header (the data follows the
    header's variable-length name and extra fields); for the legacy format, the absolute offset
    of the storage's first byte. ``nbytes`` is what the record holds.
    """

    key: str
    offset: int
    nbytes: int
    zip_member: bool


def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...] | None) -> bool:
    """Whether a tensor with these element strides is laid out row-major without gaps (None:
    no strides recorded, i.e. contiguous). Size-1 dimensions may have any stride."""
    if stride is None:
        return True
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True
