"""One entry point for weight files of any format: headers first, values only on request."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llava_doctor.artifacts.lfs import is_lfs_pointer, lfs_pointer_size
from llava_doctor.artifacts.safetensors_header import read_safetensors_header
from llava_doctor.artifacts.tensors import StorageRecord, TensorInfo
from llava_doctor.errors import FileCorruptError, LfsPointerError

if TYPE_CHECKING:
    import torch

SAFETENSORS = "safetensors"
TORCH = "torch"


@dataclass(frozen=True)
class WeightFile:
    """A weight file whose header has been read and validated.

    ``storages`` and ``byteorder`` locate the bytes of a torch file's storages (empty and
    little for safetensors, whose header gives absolute offsets in ``tensors``).
    """

    path: Path
    format: str  # "safetensors" | "torch-zip" | "torch-legacy"
    tensors: dict[str, TensorInfo]
    size: int
    storages: dict[str, StorageRecord] = field(default_factory=dict)
    byteorder: str = "little"

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def is_safetensors(self) -> bool:
        return self.format == SAFETENSORS


def weight_kind(path: Path) -> str:
    """Which reader a file needs, from its extension (content decides for unknown ones)."""
    if path.suffix == ".safetensors":
        return SAFETENSORS
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return TORCH
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return TORCH
    if head[8:9] == b"{":
        return SAFETENSORS
    return TORCH


def read_weight_file(path: Path | str) -> WeightFile:
    """Read a weight file's header. Raises LfsPointerError, FileCorruptError, UnsafePickleError.

    Nothing from a pickle is executed: torch files are walked by an allowlisting reader.
    """
    path = Path(path)
    if is_lfs_pointer(path):
        size = lfs_pointer_size(path)
        promised = f" (the real file is {size:,} bytes)" if size else ""
        raise LfsPointerError(f"is a Git LFS pointer, not the weights{promised}", path=path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise FileCorruptError(f"cannot read file ({e.strerror})", path=path, rule="unreadable",
                               hint="check the path and its permissions") from None
    if weight_kind(path) == SAFETENSORS:
        header = read_safetensors_header(path)
        return WeightFile(path=path, format=SAFETENSORS, tensors=header.tensors, size=size)
    from llava_doctor.artifacts.torchfile import read_torch_file

    tf = read_torch_file(path)
    return WeightFile(path=path, format=f"torch-{tf.format}", tensors=tf.tensors, size=size,
                      storages=tf.storages, byteorder=tf.byteorder)


def load_tensors(wf: WeightFile, names: Iterable[str] | None = None,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read tensor values (all, or ``names``) of a file whose header was already validated."""
    wanted = list(wf.tensors) if names is None else list(names)
    if wf.is_safetensors:
        from safetensors import safe_open

        out = {}
        with safe_open(str(wf.path), framework="pt", device=device) as f:
            for name in wanted:
                out[name] = f.get_tensor(name)
        return out
    from llava_doctor.artifacts.torchfile import load_torch_tensors

    tensors = load_torch_tensors(wf.path, wanted)
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def iter_tensors(wf: WeightFile, names: Iterable[str] | None = None, device: str = "cpu",
                 *, reuse_buffer: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield tensors one at a time, in file order, with bounded memory.

    safetensors: each tensor is read with one sequential `readinto` (faster than faulting in an
    mmap page by page). With `reuse_buffer` every tensor shares one buffer, so a consumer must be
    done with a tensor before asking for the next (value checks); otherwise each owns its bytes.
    torch files: memory-mapped by `load_torch_tensors`, so this is lazy too.
    """
    wanted = set(wf.tensors) if names is None else set(names)
    if not wf.is_safetensors:
        yield from load_tensors(wf, [n for n in wf.tensors if n in wanted], device).items()
        return
    import torch

    from llava_doctor.artifacts.tensors import ST_TO_TORCH

    infos = sorted((t for n, t in wf.tensors.items() if n in wanted),
                   key=lambda t: t.offset or 0)
    shared = bytearray(max((t.nbytes for t in infos), default=0)) if reuse_buffer else None
    with wf.path.open("rb", buffering=0) as f:
        for info in infos:
            dtype = getattr(torch, ST_TO_TORCH.get(info.dtype, ""), None)
            if dtype is None or info.nbytes == 0:
                # Sub-byte / exotic dtypes and empty tensors: let safetensors build them.
                from safetensors import safe_open

                with safe_open(str(wf.path), framework="pt", device=device) as sf:
                    yield info.name, sf.get_tensor(info.name)
                continue
            buf = memoryview(shared)[:info.nbytes] if shared is not None else bytearray(info.nbytes)
            f.seek(info.offset or 0)
            got = f.readinto(buf)
            if got != info.nbytes:
                from llava_doctor.errors import FileCorruptError

                raise FileCorruptError(f"tensor '{info.name}' is cut short ({got} of "
                                       f"{info.nbytes} bytes)", path=wf.path,
                                       rule="incomplete-buffer", tensor=info.name)
            t = torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
            yield info.name, (t.to(device) if device != "cpu" else t)
