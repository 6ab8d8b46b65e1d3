"""Tensor values straight from the bytes the headers locate, in bounded chunks, with numpy.

The value checks (NaN/Inf, untrained ``lora_B``, fp16 overflow, projector distance, duplicate
adapter files) need every value of a few files once. Reading them through torch would cost the
torch import (more than a second) and hold whole tensors; here each tensor is read with
``readinto`` into one reused buffer of ``chunk_bytes`` and reduced chunk by chunk, so memory stays
at one chunk whatever the file size.

Where the bytes are:

* safetensors: the header gives absolute offsets (``TensorInfo.offset``), always contiguous and
  little-endian;
* ``torch.save`` zip: the pickle walk records each storage's zip member; its data starts after
  the member's local header (torch never compresses), the tensor ``offset``/``stride`` inside it;
* legacy ``torch.save``: the walk records each storage's absolute offset behind the pickles.

Strided tensors are read piece by piece: each piece spans at most ``chunk_bytes`` of the file and
is gathered with numpy's strides, so values always come out in C (row-major) order. bf16 is
decoded as ``uint16 << 16`` viewed as float32. Dtypes numpy has no type for (float8, sub-byte,
complex32) fall back, per tensor, to torch (``safe_open`` or ``torch.load(weights_only=True,
mmap=True)`` after the pickle walk): the only place this module imports torch.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from typing import Any, Literal

import numpy as np

from llava_doctor.artifacts.tensor_stats import TensorStats
from llava_doctor.artifacts.tensors import TensorInfo, is_contiguous
from llava_doctor.artifacts.weights import WeightFile
from llava_doctor.errors import FileCorruptError

#: Bytes read (and reduced) at a time: large enough that per-chunk overhead is noise, small
#: enough to stay in the CPU caches between the read and the reductions.
CHUNK_BYTES = 4 << 20

#: Side-by-side reads (LD303, LD108) decode and compute in float64 per chunk: smaller chunks
#: keep the temporaries in cache (measured: 2x less CPU than 4 MB chunks).
PAIR_CHUNK_BYTES = 256 << 10

#: Files with at least this many value bytes are read by two threads.
PARALLEL_BYTES = 64 << 20

#: Progress: (bytes done, bytes total) of the file being read.
Progress = Callable[[int, int], None]

# safetensors dtype -> numpy type of the stored bytes (bf16 stays raw uint16 until decoded).
_NP: dict[str, str] = {
    "F64": "f8", "F32": "f4", "F16": "f2", "BF16": "u2", "I64": "i8", "I32": "i4", "I16": "i2",
    "I8": "i1", "U8": "u1", "U16": "u2", "U32": "u4", "U64": "u8", "BOOL": "?", "C64": "c8",
    "complex128": "c16",
}
# IEEE floats: (signed view, unsigned view, magnitude mask, exponent all ones, sign bit).
_FLOAT_BITS: dict[str, tuple[str, str, int, int, int]] = {
    "F16": ("i2", "u2", 0x7FFF, 0x7C00, 0x8000),
    "BF16": ("i2", "u2", 0x7FFF, 0x7F80, 0x8000),
    "F32": ("i4", "u4", 0x7FFFFFFF, 0x7F800000, 0x80000000),
    "F64": ("i8", "u8", 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000, 0x8000000000000000),
}

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: magic ... name len, extra len
_LOCAL_MAGIC = b"PK\x03\x04"


def numpy_readable(dtype: str) -> bool:
    """Whether values of this header dtype are read without torch."""
    return dtype in _NP


def _pieces(off: int, shape: tuple[int, ...], stride: tuple[int, ...], limit: int,
            ) -> Iterator[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Split a strided block (in elements) into C-ordered pieces of at most ``limit`` elements
    whose span in the storage is at most ``limit`` elements too (a single element always fits)."""
    if not shape:
        yield off, shape, stride
        return
    inner_shape, inner_stride = shape[1:], stride[1:]
    inner_n = prod(inner_shape)
    inner_span = sum((d - 1) * s for d, s in zip(inner_shape, inner_stride, strict=True)) + 1
    if inner_n <= limit and inner_span <= limit:
        d0, s0 = shape[0], stride[0]
        k = limit // inner_n
        if s0:
            k = min(k, (limit - inner_span) // s0 + 1)
        k = max(1, min(k, d0))
        for i in range(0, d0, k):
            yield off + i * s0, (min(k, d0 - i), *inner_shape), stride
        return
    for i in range(shape[0]):
        yield from _pieces(off + i * stride[0], inner_shape, inner_stride, limit)


@dataclass
class _Located:
    start: int                  # absolute file offset of element 0
    shape: tuple[int, ...]
    stride: tuple[int, ...]     # in elements
    end: int                    # the byte the tensor's storage record ends at


class ValueReader:
    """Reads the values of one weight file whose header (and pickle walk) passed.

    One open file and one buffer of ``chunk_bytes``; arrays handed out by :meth:`raw_chunks`
    are views of that buffer, valid until the next chunk is asked for.
    """

    def __init__(self, wf: WeightFile, chunk_bytes: int | None = None):
        self.wf = wf
        # Read at call time, so that tests can shrink it for the whole run.
        self.chunk_bytes = max(16, CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
        self._buf = bytearray(self.chunk_bytes)
        self._f: Any = None
        self._zip_starts: dict[str, int] = {}
        self._order: Literal["<", ">"] = ">" if wf.byteorder == "big" else "<"

    def __enter__(self) -> ValueReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _file(self) -> Any:
        if self._f is None:
            try:
                self._f = self.wf.path.open("rb", buffering=0)
            except OSError as e:
                raise FileCorruptError(f"cannot read file ({e.strerror})", path=self.wf.path,
                                       rule="unreadable") from None
        return self._f

    def _corrupt(self, message: str, rule: str, tensor: str | None = None) -> FileCorruptError:
        return FileCorruptError(message, path=self.wf.path, rule=rule, tensor=tensor)

    # --- where the bytes are ---------------------------------------------------------------
    def _locate(self, info: TensorInfo) -> _Located:
        shape = info.shape
        if self.wf.is_safetensors:
            return _Located(info.offset or 0, shape, _c_strides(shape),
                            (info.offset or 0) + info.nbytes)
        rec = self.wf.storages.get(info.storage_key or "")
        if rec is None or info.offset is None:
            raise self._corrupt(f"tensor '{info.name}' has no located storage record",
                                "storage-missing", info.name)
        start = rec.offset
        if rec.zip_member:
            if rec.key not in self._zip_starts:
                f = self._file()
                f.seek(rec.offset)
                head = f.read(_LOCAL_HEADER.size)
                if len(head) != _LOCAL_HEADER.size or head[:4] != _LOCAL_MAGIC:
                    raise self._corrupt(f"storage '{rec.key}' has no zip local header at byte "
                                        f"{rec.offset}", "bad-zip", info.name)
                _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
                self._zip_starts[rec.key] = rec.offset + _LOCAL_HEADER.size + name_len + extra_len
            start = self._zip_starts[rec.key]
        stride = info.stride if info.stride is not None else _c_strides(shape)
        return _Located(start + info.offset, shape, stride, start + rec.nbytes)

    # --- reading -----------------------------------------------------------------------------
    def _read(self, pos: int, nbytes: int, info: TensorInfo, end: int) -> memoryview:
        if pos + nbytes > end:
            raise self._corrupt(f"tensor '{info.name}' runs past its storage record",
                                "tensor-out-of-bounds", info.name)
        buf = memoryview(self._buf)[:nbytes]
        f = self._file()
        f.seek(pos)
        got = 0
        while got < nbytes:
            n = f.readinto(buf[got:])
            if not n:
                raise self._corrupt(f"tensor '{info.name}' is cut short ({got} of {nbytes} "
                                    f"bytes at byte {pos})", "incomplete-buffer", info.name)
            got += n
        return buf

    def raw_chunks(self, info: TensorInfo) -> Iterator[np.ndarray]:
        """The tensor's stored values as flat arrays in C order, at most ``chunk_bytes`` each.

        The arrays have the stored numpy type in native byte order (bf16 as raw ``uint16``);
        raises KeyError for a dtype numpy cannot read (see :func:`numpy_readable`).
        """
        if info.numel == 0:
            return
        loc = self._locate(info)
        yield from self._chunks(info, loc, loc.shape)

    def _chunks(self, info: TensorInfo, loc: _Located, shape: tuple[int, ...],
                ) -> Iterator[np.ndarray]:
        base = np.dtype(_NP[info.dtype]).newbyteorder(self._order)
        size = base.itemsize
        limit = max(1, self.chunk_bytes // size)
        stride = loc.stride
        if is_contiguous(shape, stride):
            shape, stride = (prod(shape),), (1,)
        swap = not base.isnative
        for off, pshape, pstride in _pieces(0, shape, stride, limit):
            n = prod(pshape)
            span = sum((d - 1) * s for d, s in zip(pshape, pstride, strict=True)) + 1
            buf = self._read(loc.start + off * size, span * size, info, loc.end)
            arr = np.frombuffer(buf, dtype=base, count=span)
            if pshape != (span,) or pstride != (1,):
                arr = np.lib.stride_tricks.as_strided(
                    arr, pshape, tuple(s * size for s in pstride), writeable=False).reshape(n)
            if swap:
                arr = arr.astype(base.newbyteorder("="))
            yield arr

    # --- statistics --------------------------------------------------------------------------
    def stats(self, info: TensorInfo, progress: Callable[[int], None] | None = None,
              ) -> TensorStats:
        """NaN/Inf count, largest finite magnitude and all-zero flag of one tensor."""
        if not numpy_readable(info.dtype):
            return _torch_stats(self.wf, info)
        acc = _Acc(info.dtype)
        if info.numel == 0:
            return acc.result(0)
        loc = self._locate(info)
        # A dimension of stride 0 (an expanded tensor) repeats the same values: read them once
        # and count NaN/Inf once per repeat, instead of walking every repeat.
        shape = tuple(1 if st == 0 else d for d, st in zip(loc.shape, loc.stride, strict=True))
        repeats = info.numel // prod(shape)
        itemsize = max(1, info.nbytes // info.numel)
        for arr in self._chunks(info, loc, shape):
            acc.add(arr)
            if progress is not None:
                progress(arr.size * itemsize * repeats)
        acc.nonfinite *= repeats
        return acc.result(info.numel)

    def values(self, info: TensorInfo, chunk_elems: int) -> Iterator[np.ndarray]:
        """Decoded values (bf16 -> float32) in C order, exactly ``chunk_elems`` per array
        (the last may be shorter), so two tensors of one shape can be walked side by side."""
        if not numpy_readable(info.dtype):
            yield from _exact(_torch_values(self.wf, info), chunk_elems)
            return
        decode = _bf16_to_f32 if info.dtype == "BF16" else (lambda a: a)
        yield from _exact((decode(a) for a in self.raw_chunks(info)), chunk_elems)


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    acc = 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _exact(chunks: Iterable[np.ndarray], n: int) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    have = 0
    for arr in chunks:
        while arr.size:
            if not pending and arr.size >= n:
                yield arr[:n]
                arr = arr[n:]
                continue
            take = arr[:n - have]
            pending.append(take.copy())
            have += take.size
            arr = arr[take.size:]
            if have == n:
                yield np.concatenate(pending)
                pending, have = [], 0
    if pending:
        yield np.concatenate(pending)


class _Acc:
    """Running statistics of one tensor over its chunks (same results as ``tensor_stats``)."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.nonfinite = 0
        self.top: Any = 0          # float: largest finite magnitude bits; int: largest |x|
        self.any_value = False     # int/bool/complex: some element is non-zero
        self.fmax = 0.0            # complex: largest finite magnitude

    def add(self, a: np.ndarray) -> None:
        bits = _FLOAT_BITS.get(self.dtype)
        if bits is not None:
            signed, unsigned, mask, exp_ones, sign = bits
            # With the sign bit cleared IEEE bit patterns order like magnitudes. The largest
            # positive pattern is the max of the signed view, the largest negative one the max
            # of the unsigned view: two reductions, no temporary.
            hi = int(a.view(signed).max())
            hu = int(a.view(unsigned).max())
            top = max(hi if hi > 0 else 0, hu - sign if hu >= sign else 0)
            if top >= exp_ones:  # NaN or Inf somewhere in this chunk
                m = a.view(unsigned) & np.array(mask, dtype=unsigned)
                bad = m >= exp_ones
                self.nonfinite += int(np.count_nonzero(bad))
                m[bad] = 0
                top = int(m.max())
            self.top = max(self.top, top)
        elif a.dtype.kind == "c":
            f = np.abs(a)
            fin = np.isfinite(f)
            self.nonfinite += int(f.size - np.count_nonzero(fin))
            if fin.any():
                self.fmax = max(self.fmax, float(f[fin].max()))
            self.any_value = self.any_value or bool(np.any(f != 0))
        elif a.dtype.kind == "b":
            self.any_value = self.any_value or bool(a.any())
            self.top = max(self.top, int(self.any_value))
        else:
            # torch's abs wraps the most negative int the same way numpy's does.
            self.top = max(self.top, int(np.abs(a).max()))
            self.any_value = self.any_value or bool(a.any())

    def result(self, numel: int) -> TensorStats:
        if numel == 0:
            return TensorStats(0, 0, 0.0, True)
        bits = _FLOAT_BITS.get(self.dtype)
        if bits is not None:
            unsigned = bits[1]
            if self.dtype == "BF16":
                value = float(np.array([self.top << 16], dtype=np.uint32).view(np.float32)[0])
            else:
                floats = {"u2": np.float16, "u4": np.float32, "u8": np.float64}[unsigned]
                value = float(np.array([self.top], dtype=unsigned).view(floats)[0])
            return TensorStats(numel, self.nonfinite, abs(value),
                               self.top == 0 and not self.nonfinite)
        if self.dtype in ("C64", "complex128"):
            return TensorStats(numel, self.nonfinite, self.fmax,
                               not self.any_value and not self.nonfinite)
        return TensorStats(numel, 0, float(self.top), not self.any_value)


# --- torch fallback (dtypes numpy has no type for) -------------------------------------------
def _torch_tensor(wf: WeightFile, info: TensorInfo) -> Any:
    from llava_doctor.artifacts.weights import load_tensors

    return load_tensors(wf, [info.name])[info.name]


def _torch_stats(wf: WeightFile, info: TensorInfo) -> TensorStats:
    from llava_doctor.artifacts.tensor_stats import tensor_stats

    return tensor_stats(_torch_tensor(wf, info))


def _torch_values(wf: WeightFile, info: TensorInfo) -> Iterator[np.ndarray]:
    import torch

    t = _torch_tensor(wf, info)
    if t.dtype.is_complex:
        t = t.to(torch.complex128)
    elif t.dtype.is_floating_point:
        t = t.double()
    yield t.contiguous().reshape(-1).numpy()


# --- whole files -------------------------------------------------------------------------------
def file_stats(wf: WeightFile, names: Iterable[str] | None = None, *,
               chunk_bytes: int | None = None, progress: Progress | None = None,
               ) -> dict[str, TensorStats]:
    """Statistics of every tensor of a file (or of ``names``), one bounded streaming pass.

    Tensors are read in file order; the result follows the order the torch-based reader used
    (safetensors: by offset; torch files: the pickle's order).
    """
    chosen = None if names is None else set(names)
    wanted = [n for n in wf.tensors if chosen is None or n in chosen]
    infos = [wf.tensors[n] for n in wanted]
    if wf.is_safetensors:
        infos.sort(key=lambda t: t.offset or 0)
        order = [t.name for t in infos]
    else:
        order = wanted
        recs = wf.storages
        infos.sort(key=lambda t: (recs[t.storage_key].offset if t.storage_key in recs else -1,
                                  t.offset or 0))
    total = sum(t.nbytes for t in infos)
    done = 0
    lock = threading.Lock()

    def step(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress is not None:
                progress(done, total)

    def run(part: list[TensorInfo]) -> dict[str, TensorStats]:
        with ValueReader(wf, chunk_bytes) as reader:
            return {info.name: reader.stats(info, step) for info in part}

    # Two readers, each on its half of the file: the reads and the reductions release the GIL,
    # so on two cores the pass takes about half the time; small files are not worth a thread.
    out: dict[str, TensorStats] = {}
    if total >= PARALLEL_BYTES and len(infos) > 1 and (os.cpu_count() or 1) > 1:
        acc, cut = 0, len(infos) - 1
        for i, info in enumerate(infos):
            acc += info.nbytes
            if acc >= total / 2:
                cut = max(1, i)
                break
        with ThreadPoolExecutor(max_workers=2) as pool:
            for part in pool.map(run, (infos[:cut], infos[cut:])):
                out.update(part)
    else:
        out = run(infos)
    return {n: out[n] for n in order}


def read_array(wf: WeightFile, name: str, *, chunk_bytes: int | None = None) -> np.ndarray:
    """One whole tensor, decoded (bf16 -> float32), in its shape; for small tensors only."""
    info = wf.tensors[name]
    with ValueReader(wf, chunk_bytes) as reader:
        parts = [a.copy() for a in reader.values(info, max(1, info.numel))]
    empty = np.float32 if info.dtype == "BF16" else _NP.get(info.dtype, "f8")
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=empty)
    return flat.reshape(info.shape)


def paired_values(a: WeightFile, name_a: str, b: WeightFile, name_b: str, *,
                  chunk_bytes: int | None = None, progress: Callable[[int], None] | None = None,
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decoded values of two tensors of one shape, side by side, one bounded chunk at a time.

    The two arrays of a pair cover the same elements (C order) and stay valid until the next
    pair is asked for.
    """
    ia, ib = a.tensors[name_a], b.tensors[name_b]
    if ia.shape != ib.shape:
        raise ValueError(f"'{name_a}' {list(ia.shape)} and '{name_b}' {list(ib.shape)} differ")
    # bf16 decodes to float32, the torch fallback to float64/complex128: size the chunks by the
    # wider of the two decoded types.
    width = max(4 if t.dtype == "BF16" else np.dtype(_NP[t.dtype]).itemsize
                if numpy_readable(t.dtype) else 16 for t in (ia, ib))
    if chunk_bytes is None:
        chunk_bytes = min(CHUNK_BYTES, PAIR_CHUNK_BYTES)
    with ValueReader(a, chunk_bytes) as ra, ValueReader(b, chunk_bytes) as rb:
        n = max(1, ra.chunk_bytes // width)
        for x, y in zip(ra.values(ia, n), rb.values(ib, n), strict=True):
            yield x, y
            if progress is not None:
                progress(x.nbytes + y.nbytes)
