"""Tensor bytes straight from weight files, by `pread`: no mmap, no whole-shard loads.

Why not `safe_open`/`torch.load(mmap=True)`: pages of a memory-mapped file that the merge has
read stay resident in *our* address space until the map is closed, so the peak RSS of a merge
that reads a 10 GB shard through a map is 10 GB even though each tensor is used once. Reading
with `os.preadv` into a small reused buffer leaves the page cache to the kernel and keeps the
process at "one block plus the adapter".

A tensor is read directly when its bytes are one contiguous run in the file: always for
safetensors (the header gives absolute offsets), and for `torch.save` zip files when the
storage record is stored uncompressed (torch never compresses) and the tensor is contiguous
in it. Anything else (the legacy torch format, strided views, big-endian records) falls back to
`artifacts.weights.load_tensors`, whose torch reader walks the pickle safely first; the
fallback keeps one file's tensors at a time.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from llava_doctor.artifacts.tensors import ST_TO_TORCH, TensorInfo, is_contiguous
from llava_doctor.artifacts.weights import WeightFile, load_tensors
from llava_doctor.errors import FileCorruptError, MergeError

if TYPE_CHECKING:
    import torch

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a header dtype string ("F16", "BF16", ...)."""
    import torch

    name = ST_TO_TORCH.get(st_dtype, st_dtype)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise MergeError(f"tensor dtype {st_dtype} has no torch equivalent on this torch "
                         f"({torch.__version__})", hint="upgrade torch")
    return dt


def read_exact(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill ``buf`` from ``offset`` of an open file; a short file is a FileCorruptError."""
    done = 0
    n = len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise FileCorruptError(f"ends at byte {offset + done}, inside a tensor that should "
                                   f"run to byte {offset + n} (file changed or truncated while "
                                   "merging?)", path=path, rule="truncated")
        done += got


class TensorSource:
    """Reads the tensors of one weight file whose header was validated by `read_weight_file`."""

    def __init__(self, wf: WeightFile):
        self.wf = wf
        self.path = wf.path
        self._fd: int | None = None
        self._zip_data: dict[str, tuple[int, int]] | None = None  # storage key -> (start, size)
        self._little_endian = True
        self._fallback: dict[str, torch.Tensor] | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise FileCorruptError(f"cannot open for reading ({e.strerror})", path=self.path,
                                       rule="unreadable") from None
        return self._fd

    def close(self) -> None:
        """Release the file descriptor and any fallback tensors."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fallback = None

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- where a tensor's bytes are ---------------------------------------------------------
    def _zip_records(self) -> dict[str, tuple[int, int]]:
        """Storage key -> (absolute data offset, size) for every `<archive>/data/<key>` record."""
        if self._zip_data is None:
            records: dict[str, tuple[int, int]] = {}
            try:
                with zipfile.ZipFile(self.path) as zf, open(self.path, "rb") as fh:
                    for info in zf.infolist():
                        parts = info.filename.split("/")
                        if parts[-1] == "byteorder" and len(parts) == 2:
                            self._little_endian = zf.read(info).strip() != b"big"
                        if len(parts) != 3 or parts[1] != "data":
                            continue
                        if info.compress_type != zipfile.ZIP_STORED:
                            continue  # never written by torch; load_tensors will handle or refuse
                        fh.seek(info.header_offset)
                        head = fh.read(_LOCAL_HEADER.size)
                        if len(head) != _LOCAL_HEADER.size:
                            continue
                        fields = _LOCAL_HEADER.unpack(head)
                        if fields[0] != _LOCAL_MAGIC:
                            continue
                        name_len, extra_len = fields[-2], fields[-1]
                        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                        records[parts[2]] = (start, info.file_size)
            except (zipfile.BadZipFile, OSError, ValueError, struct.error) as e:
                raise FileCorruptError(f"zip archive cannot be read ({e})", path=self.path,
                                       rule="bad-zip") from None
            self._zip_data = records
        return self._zip_data

    def file_offset(self, info: TensorInfo) -> int | None:
        """Absolute offset of the tensor's first byte when it can be read as one run, else None."""
        if self.wf.is_safetensors:
            return info.offset
        if self.wf.format != "torch-zip" or info.storage_key is None or info.offset is None:
            return None
        if not is_contiguous(info.shape, info.stride):
            return None
        rec = self._zip_records().get(info.storage_key)
        if rec is None or not self._little_endian:
            return None
        start, size = rec
        if info.offset + info.nbytes > size:
            return None
        return start + info.offset

    def direct(self, name: str) -> bool:
        """Whether ``name`` can be read row block by row block."""
        return self.file_offset(self.wf.tensors[name]) is not None

    # --- reading ------------------------------------------------------------------------------
    def read_into(self, name: str, first_row: int, rows: int, out: memoryview) -> None:
        """Read rows ``[first_row, first_row + rows)`` of a directly readable tensor into ``out``.

        ``out`` must be exactly ``rows * row_bytes`` long; a 0-d or 1-d tensor is one row.
        """
        info = self.wf.tensors[name]
        start = self.file_offset(info)
        if start is None:
            raise AssertionError(f"{name} is not directly readable")  # a planning bug
        read_exact(self._open(), out, start + first_row * row_bytes(info), self.path)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor on CPU in its stored dtype (a fresh, contiguous tensor)."""
        import torch

        info = self.wf.tensors[name]
        if self.file_offset(info) is not None:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            if info.nbytes:
                self.read_into(name, 0, info.shape[0] if len(info.shape) >= 2 else 1,
                               byte_view(buf))
            return buf.view(torch_dtype(info.dtype)).reshape(info.shape)
        if self._fallback is None:
            # One file at a time (the plan visits a file's tensors together); torch zip files
            # are memory-mapped by the loader, legacy files are small in practice.
            self._fallback = load_tensors(self.wf)
        t = self._fallback[name]
        if tuple(t.shape) != info.shape:
            raise FileCorruptError(f"tensor '{name}' loads with shape {list(t.shape)} but its "
                                   f"header says {list(info.shape)}", path=self.path,
                                   rule="bad-tensor", tensor=name)
        return t.contiguous()


    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor with at least 2 dims, as a fresh CPU tensor."""
        import torch

        info = self.wf.tensors[name]
        if self.file_offset(info) is None:
            return self.tensor(name)[start:stop].contiguous()
        n = (stop - start) * row_bytes(info)
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            self.read_into(name, start, stop - start, byte_view(buf))
        return buf.view(torch_dtype(info.dtype)).reshape((stop - start, *info.shape[1:]))


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor (no copy)."""
    # numpy arrays are buffers; the stubs just do not say so
    return memoryview(t.numpy())  # type: ignore[arg-type]


def row_bytes(info: TensorInfo) -> int:
    """Bytes of one row (dim 0) of a tensor; the whole tensor for 0-d and 1-d ones."""
    if len(info.shape) >= 2:
        return info.nbytes // info.shape[0] if info.shape[0] else 0
    return info.nbytes
