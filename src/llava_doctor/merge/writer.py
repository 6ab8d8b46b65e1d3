"""A safetensors shard writer that writes the header first and each tensor's bytes in place.

The whole layout of a shard (names, dtypes, shapes, offsets) is known from the plan before any
tensor is computed, so the header goes to disk first, the file is given its final size at once
(a file-size limit fails here, before minutes of work, rather than at the last tensor), and
every block is written at its planned offset with ``pwrite``. The sha256 of the file is
computed from the bytes as they are written; verification compares it with the file as re-read
from disk.

Test hook: with ``LLAVA_DOCTOR_TEST_ABORT_AFTER_WRITES=N`` in the environment the process
SIGKILLs itself right after its N-th write (tensor blocks, JSON files, copies and the final
rename all count), which is how the crash tests stop a merge at a chosen point.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_doctor.errors import MergeError

ABORT_ENV = "LLAVA_DOCTOR_TEST_ABORT_AFTER_WRITES"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

_count_lock = threading.Lock()
_writes = 0


def crash_point() -> None:
    """Count one write; SIGKILL this process at the N-th when the test switch is set."""
    global _writes
    limit = os.environ.get(ABORT_ENV)
    if not limit:
        return
    with _count_lock:
        _writes += 1
        hit = _writes >= int(limit)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


def io_error(e: OSError, path: Path | str, action: str) -> MergeError:
    """A one-line MergeError for an OSError while writing; disk full gets its own remedy."""
    if e.errno in _FULL:
        why = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file size limit exceeded"}[e.errno]
        return MergeError(f"{why} while {action}", path=path,
                          hint="free space (or raise the limit) or choose an --out on another "
                               "disk; nothing was written to --out")
    return MergeError(f"{action} failed: {e.strerror or e}", path=path,
                      hint="check permissions and free space; nothing was written to --out")


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a shard as its header describes it."""

    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    nbytes: int


def build_header(entries: Iterable[HeaderEntry], metadata: dict[str, str] | None = None,
                 ) -> tuple[bytes, list[tuple[int, int]]]:
    """The 8-byte length plus JSON header of a shard, and each entry's data offsets.

    Tensors are laid out contiguously in the order given; the JSON is padded with spaces to a
    multiple of 8 bytes, as safetensors' own writer does, so tensor data stays aligned.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets: list[tuple[int, int]] = []
    pos = 0
    for e in entries:
        if e.name in header:
            raise AssertionError(f"duplicate tensor {e.name} in one shard")  # a planning bug
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                          "data_offsets": [pos, pos + e.nbytes]}
        offsets.append((pos, pos + e.nbytes))
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardWriter:
    """Writes one shard: header at creation, then tensor bytes strictly in planned order."""

    def __init__(self, path: Path, header: bytes, data_size: int, *, durable: bool = True):
        self.path = path
        self.header = header
        self.size = len(header) + data_size
        self.durable = durable
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise io_error(e, path, "creating the shard") from None
        try:
            self._reserve()
            self._pwrite(memoryview(header), 0)
        except BaseException:
            self.abort()
            raise
        self._sha = hashlib.sha256(header)
        self.pos = len(header)

    def _reserve(self) -> None:
        # Give the file its final size at once: a file-size limit fails here, before any work.
        # Not posix_fallocate: on ext4 writing into its unwritten extents measured 2-5x slower
        # than into a hole; free space is checked up front by the caller instead.
        try:
            os.ftruncate(self._fd, self.size)  # type: ignore[arg-type]
        except OSError as e:
            raise io_error(e, self.path, f"sizing the shard to {self.size:,} bytes") from None

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        n = len(data)
        try:
            while done < n:
                done += os.pwrite(self._fd, data[done:], offset + done)  # type: ignore[arg-type]
        except OSError as e:
            raise io_error(e, self.path, "writing the shard") from None
        crash_point()

    def write(self, data: memoryview, offset: int) -> None:
        """Write ``data`` at absolute file ``offset``, which must be where the last write ended.

        The bytes must also be passed to `hash`, in the same order (the executor does that on
        another thread, so hashing and writing overlap).
        """
        if offset != self.pos:
            raise AssertionError(f"{self.path.name}: out-of-order write at {offset}, "
                                 f"expected {self.pos}")  # a bug in the executor
        self._pwrite(data, offset)
        self.pos += len(data)

    def hash(self, data: memoryview) -> None:
        """Add written bytes to the file's sha256 (header already included)."""
        self._sha.update(data)

    def digest(self) -> str:
        """sha256 (hex) of the header and every block passed to `hash`."""
        return self._sha.hexdigest()

    def finish(self) -> None:
        """Check the shard is complete, flush it to disk and close it."""
        if self.pos != self.size:
            raise AssertionError(f"{self.path.name}: wrote {self.pos} of {self.size} bytes")
        try:
            if self.durable:
                os.fsync(self._fd)  # type: ignore[arg-type]
        except OSError as e:
            raise io_error(e, self.path, "flushing the shard to disk") from None
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without checks (the partial directory is removed by the caller)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def write_file(path: Path, data: bytes, *, durable: bool = True) -> str:
    """Write a small file (JSON, tokenizer) into the partial dir; returns its sha256."""
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except OSError as e:
        raise io_error(e, path, f"writing {path.name}") from None
    crash_point()
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, obj: object, *, durable: bool = True) -> str:
    """`write_file` of ``obj`` as transformers writes configs (indent 2, sorted keys)."""
    return write_file(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"),
                      durable=durable)


def write_index(plan: Any, out: Path, durable: bool) -> tuple[str, str]:
    """The shard index Hugging Face loaders read (`total_size` in bytes, sorted weight map);
    returns (file name, sha256)."""
    name = "model.safetensors.index.json"
    index = {"metadata": {"total_size": plan.total_size, "format": "pt"},
             "weight_map": dict(sorted(plan.weight_map().items()))}
    return name, write_json(out / name, index, durable=durable)
