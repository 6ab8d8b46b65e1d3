"""Read PyTorch ``torch.save`` files (``.bin``, ``.pt``, ``.pth``) without executing a pickle.

Two on-disk formats exist and torch tells them apart by the first four bytes, so we do too (a
file that is a legacy pickle at the front and a zip at the back is read the way torch would
read it):

* zip (torch >= 1.6): ``<archive>/data.pkl`` holds the object tree, ``<archive>/data/<key>``
  the raw bytes of each storage, plus small ``byteorder``/``version`` records. All members are
  stored uncompressed.
* legacy: five pickles back to back (magic number, protocol version 1001, system info, the
  object tree, the list of storage keys), then for each key an 8-byte element count followed
  by the storage bytes.

:func:`read_torch_file` walks the pickles with :class:`~.pickle_walk.PickleWalker` and never
imports torch. :func:`load_torch_tensors` reads values, and only after the walk found the file
clean.

Naming. The object tree is flattened into ``name -> tensor``: dict keys are joined with ``.``
(``{"a": {"b": t}}`` gives ``"a.b"``; integer keys are written in decimal); a list or tuple
that holds a tensor or a container is entered too, its items named by index (``"layers.0"``),
so a file whose top level is a list gives ``"0"``, ``"1"``, ...; a file that is one bare
tensor gives the single name ``""``. Every other leaf (strings, numbers, lists of numbers,
empty dicts) is listed in ``TorchFile.other`` with a short type description. Two paths that
flatten to the same name are a ``duplicate-name`` error rather than one silently hiding the
other.

``FileCorruptError.rule`` values raised here: ``truncated``, ``not-a-torch-file``,
``unsupported-format``, ``bad-zip``, ``zip-path-escape``, ``zip-duplicate-member``,
``zip-bomb``, ``missing-data-pkl``, ``pickle-too-large``, ``bad-pickle``, ``too-deep``,
``too-complex``, ``bad-persistent-id``, ``bad-tensor``, ``storage-conflict``,
``storage-missing``, ``storage-out-of-bounds``, ``storage-size-mismatch``,
``tensor-out-of-bounds``, ``duplicate-name``, ``torch-load-failed``.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from llava_doctor.artifacts.pickle_walk import (
    ITEMSIZE,
    MAX_NESTING,
    MAX_PICKLE_BYTES,
    BoundedReader,
    Budget,
    PickleWalker,
    StorageRef,
    TensorRef,
    describe,
    looks_like_pickle,
)
from llava_doctor.artifacts.tensors import StorageRecord, TensorInfo
from llava_doctor.errors import FileCorruptError

if TYPE_CHECKING:
    import torch

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# A torch zip holds one member per storage plus a handful of records.
MAX_MEMBERS = 1_000_000
# Flattening visits shared sub-containers once per path; this bounds a "billion laughs" tree.
# An unshared tree needs at least two opcodes per entry, so MAX_OPS / 2 entries is the most a
# file within the opcode cap can hold.
MAX_VISITS = 500_000
# torch.save never shares a container between two keys; a few repeats are tolerated, a
# "billion laughs" of shared dicts is stopped after this many, long before MAX_VISITS.
MAX_SHARED_EXPANSIONS = 10_000

Format = Literal["zip", "legacy"]


@dataclass(frozen=True)
class TorchFile:
    """What the pickle of a torch file declares, read without executing it.

    ``tensors`` keeps the file's order; ``other`` maps names of non-tensor leaves to a short
    type description (``"int"``, ``"list[3]"``); ``archive_name`` is the zip folder name
    (``None`` for the legacy format); ``storages`` says where each storage's bytes are, so that
    values can be read without torch (:mod:`~llava_doctor.artifacts.values`); ``byteorder`` is
    the order they were written in (the zip ``byteorder`` record, the legacy system info).
    """

    path: Path
    format: Format
    tensors: dict[str, TensorInfo]
    other: dict[str, str] = field(default_factory=dict)
    archive_name: str | None = None
    storages: dict[str, StorageRecord] = field(default_factory=dict)
    byteorder: Literal["little", "big"] = "little"


def read_torch_file(path: Path | str) -> TorchFile:
    """Walk a ``torch.save`` file's pickles and storage records; no pickle code runs.

    Raises :class:`~llava_doctor.errors.UnsafePickleError` if any pickle in the file references
    a global outside the tensor-checkpoint allowlist, and
    :class:`~llava_doctor.errors.FileCorruptError` if the file breaks a structural rule or a
    resource cap. Torch is not imported.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        size = fh.seek(0, io.SEEK_END)
        fh.seek(0)
        head = fh.read(4)
        fh.seek(0)
        if not head:
            raise FileCorruptError("file is empty", path=path, rule="truncated")
        if head == ZIP_MAGIC:
            return _read_zip(path, fh, size)
        return _read_legacy(path, fh, size)


def load_torch_tensors(path: Path | str, names: Iterable[str] | None = None,
                       ) -> dict[str, torch.Tensor]:
    """Load tensor values, on CPU, after :func:`read_torch_file` found the file clean.

    ``names`` uses the flattened naming of :func:`read_torch_file`; ``None`` loads all. Zip
    files are memory-mapped, so only the pages of the tensors actually used are read. Raises
    ``KeyError`` for a name the file does not hold.
    """
    info = read_torch_file(path)  # a hostile file raises here, before torch sees it
    wanted = list(info.tensors) if names is None else list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in info.tensors]
    if missing:
        raise KeyError(f"{path}: no tensor named {missing[0]!r}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    import torch  # only here: reading headers must work without it

    try:
        # weights_only=True as a second fence; the walk above already refused anything it
        # would let through on the torch versions with known unpickler holes.
        obj = torch.load(str(path), map_location="cpu", weights_only=True,
                         mmap=info.format == "zip")
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FileCorruptError(f"torch.load failed after a clean header walk: {first}",
                               path=path, rule="torch-load-failed") from exc
    flat, _ = flatten_tree(obj, lambda v: isinstance(v, torch.Tensor), path=path)
    return {name: flat[name] for name in wanted}


def flatten_tree(root: object, is_tensor: Callable[[object], bool], *, path: Path | str,
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """Flatten an object tree into ``(tensors, other)`` using the module's naming rules.

    Shared by the header walk and :func:`load_torch_tensors` so that both name tensors the
    same way. Iterative, with depth and visit caps, so cycles and shared sub-trees are safe.
    """
    tensors: dict[str, Any] = {}
    other: dict[str, str] = {}
    if isinstance(root, dict) and not root:
        return tensors, other
    visits = repeats = 0
    expanded: set[int] = set()  # ids are stable: the whole tree stays alive meanwhile
    todo: list[tuple[str, object, int]] = [("", root, 0)]
    while todo:
        name, value, depth = todo.pop()
        visits += 1
        if visits > MAX_VISITS:
            raise FileCorruptError(f"object tree has more than {MAX_VISITS} entries once "
                                   "shared parts are expanded", path=path, rule="too-complex")
        if is_tensor(value):
            _add(tensors, other, name, value, path)
            continue
        children: list[tuple[str, object]] | None = None
        if isinstance(value, dict) and value:
            children = [(_join(name, _key_name(k)), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)) and any(
                is_tensor(v) or isinstance(v, (dict, list, tuple)) for v in value):
            children = [(_join(name, str(i)), v) for i, v in enumerate(value)]
        if children is None:
            _add(other, tensors, name, describe(value), path)
            continue
        if depth >= MAX_NESTING:
            raise FileCorruptError(f"object tree nests more than {MAX_NESTING} levels deep "
                                   "(or contains itself)", path=path, rule="too-deep")
        if id(value) in expanded:
            repeats += 1
            if repeats > MAX_SHARED_EXPANSIONS:
                raise FileCorruptError(f"object tree reuses shared containers more than "
                                       f"{MAX_SHARED_EXPANSIONS} times", path=path,
                                       rule="too-complex")
        else:
            expanded.add(id(value))
        todo.extend((n, v, depth + 1) for n, v in reversed(children))
    return tensors, other


def _add(target: dict, rival: dict, name: str, value: Any, path: Path | str) -> None:
    if name in target or name in rival:
        raise FileCorruptError(f"two entries flatten to the same name {name[:200]!r}",
                               path=path, rule="duplicate-name", tensor=name)
    target[name] = value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _key_name(key: object) -> str:
    if type(key) is str:
        return key
    if type(key) is int and abs(key) < 10**18:  # str() of a huge int is slow or refused
        return str(key)
    return f"<{describe(key)}>"


# ------------------------------------------------------------------------------------- zip
def _read_zip(path: Path, fh: BinaryIO, size: int) -> TorchFile:
    try:
        zf = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, struct.error, EOFError,
            OSError, NotImplementedError, OverflowError, UnicodeDecodeError) as exc:
        raise FileCorruptError(f"is not a readable zip archive: {_first_line(exc)}",
                               path=path, rule="bad-zip") from None
    with zf:
        infos = zf.infolist()
        archive = _check_members(path, infos, size)
        by_name = {i.filename: i for i in infos}
        budget = Budget()

        pkl_name = f"{archive}/data.pkl"
        if pkl_name not in by_name:
            raise FileCorruptError(f"zip archive has no '{pkl_name}' (not a torch.save file)",
                                   path=path, rule="missing-data-pkl")
        walker = PickleWalker(path, pkl_name, budget=budget)
        data = _read_member(path, zf, by_name[pkl_name])
        stream = io.BytesIO(data)
        root = walker.walk(stream)
        _scan_trailing(path, stream, pkl_name, budget)
        _scan_extra_members(path, zf, infos, archive, budget)

        records: dict[str, StorageRecord] = {}
        for key, storage in walker.storages.items():
            if "/" in key or "\\" in key or key in (".", ".."):
                raise FileCorruptError(f"storage key {key[:100]!r} escapes '{archive}/data/'",
                                       path=path, rule="zip-path-escape")
            member = by_name.get(f"{archive}/data/{key}")
            if member is None:
                raise FileCorruptError(f"storage '{key}' has no record '{archive}/data/{key}'",
                                       path=path, rule="storage-missing")
            if storage.nbytes > member.file_size:
                raise FileCorruptError(
                    f"storage '{key}' declares {storage.nbytes} bytes but its record holds "
                    f"{member.file_size}", path=path, rule="storage-out-of-bounds")
            records[key] = StorageRecord(key, member.header_offset, member.file_size, True)
        order = by_name.get(f"{archive}/byteorder")
        # torch.load reads a missing record as little-endian (what every torch >= 1.6 writes).
        big = order is not None and _read_member(path, zf, order, limit=16).strip() == b"big"
    tensors, other = _tensor_infos(path, root, walker)
    return TorchFile(path, "zip", tensors, other, archive, records,
                     "big" if big else "little")


def _check_members(path: Path, infos: list[zipfile.ZipInfo], size: int) -> str:
    """Validate member names and sizes; return the archive folder name."""
    if not infos:
        raise FileCorruptError("zip archive is empty", path=path, rule="missing-data-pkl")
    if len(infos) > MAX_MEMBERS:
        raise FileCorruptError(f"zip archive has {len(infos)} members (more than "
                               f"{MAX_MEMBERS})", path=path, rule="too-complex")
    # torch takes the archive name from the first member, as its C++ reader does.
    first = infos[0].filename
    archive = first.split("/", 1)[0]
    if "/" not in first or not archive:
        raise FileCorruptError(f"zip member {first[:200]!r} is not inside an archive folder",
                               path=path, rule="zip-path-escape")
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if ("\\" in name or name.startswith("/") or ":" in parts[0] or ".." in parts
                or "." in parts or parts[0] != archive or len(parts) < 2):
            raise FileCorruptError(f"zip member {name[:200]!r} escapes the archive folder "
                                   f"'{archive}/'", path=path, rule="zip-path-escape")
        if name in seen:
            # zipfile keeps the last copy and torch's reader may take the first: two readers,
            # two different pickles.
            raise FileCorruptError(f"zip member {name[:200]!r} appears twice", path=path,
                                   rule="zip-duplicate-member")
        seen.add(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise FileCorruptError(
                f"zip member {name[:200]!r} is compressed (method {info.compress_type}, "
                f"{info.file_size} bytes declared); torch writes members uncompressed",
                path=path, rule="zip-bomb")
        if info.file_size != info.compress_size or info.header_offset + info.compress_size > size:
            raise FileCorruptError(
                f"zip member {name[:200]!r} declares {info.file_size} bytes, more than the "
                f"{size}-byte file can hold", path=path, rule="zip-bomb")
        if info.flag_bits & 0x1:
            raise FileCorruptError(f"zip member {name[:200]!r} is encrypted", path=path,
                                   rule="bad-zip")
    return archive


def _read_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                 limit: int | None = None) -> bytes:
    if limit is None and info.file_size > MAX_PICKLE_BYTES:
        raise FileCorruptError(f"pickle '{info.filename}' is {info.file_size} bytes, more "
                               f"than the {MAX_PICKLE_BYTES}-byte cap", path=path,
                               rule="pickle-too-large")
    try:
        with zf.open(info) as member:
            return member.read(limit if limit is not None else -1)
    except (zipfile.BadZipFile, ValueError, struct.error, EOFError, OSError,
            NotImplementedError, RuntimeError, OverflowError) as exc:
        raise FileCorruptError(f"zip member {info.filename[:200]!r} cannot be read: "
                               f"{_first_line(exc)}", path=path, rule="bad-zip") from None


def _scan_trailing(path: Path, stream: io.BytesIO, where: str, budget: Budget) -> None:
    # pickle.load stops at STOP; a second pickle glued behind it is for some other loader.
    rest = stream.read()
    if looks_like_pickle(rest):
        PickleWalker(path, f"bytes after STOP in {where}", budget=budget,
                     mode="scan").walk(io.BytesIO(rest))


def _scan_extra_members(path: Path, zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo],
                        archive: str, budget: Budget) -> None:
    """Walk every other member that is, or starts like, a pickle."""
    for info in infos:
        name = info.filename
        if name == f"{archive}/data.pkl":
            continue
        if name.endswith(".pkl"):
            data = _read_member(path, zf, info)
            PickleWalker(path, name, budget=budget).walk(io.BytesIO(data))
        elif not name.startswith(f"{archive}/data/") and info.file_size >= 2:
            # Storage records are raw tensor bytes and may start with anything; torch never
            # unpickles them, so only other members are sniffed.
            if looks_like_pickle(_read_member(path, zf, info, limit=2)):
                data = _read_member(path, zf, info)
                PickleWalker(path, name, budget=budget, mode="scan").walk(io.BytesIO(data))


# ---------------------------------------------------------------------------------- legacy
def _read_legacy(path: Path, fh: BinaryIO, size: int) -> TorchFile:
    head = fh.read(512)
    fh.seek(0)
    if head[257:262] == b"ustar":
        raise FileCorruptError("is a pre-1.0 torch tar archive, which cannot be read without "
                               "unpickling; re-save it with a current torch",
                               path=path, rule="unsupported-format")
    if not (looks_like_pickle(head) or head[:1] == b"L"):
        raise FileCorruptError("is neither a torch zip archive nor a legacy torch pickle",
                               path=path, rule="not-a-torch-file")
    reader = BoundedReader(fh, MAX_PICKLE_BYTES)
    budget = Budget()

    def walk(where: str) -> tuple[object, PickleWalker]:
        walker = PickleWalker(path, where, budget=budget)
        return walker.walk(reader), walker

    magic, _ = walk("legacy magic number")
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise FileCorruptError("does not start with the legacy torch magic number",
                               path=path, rule="not-a-torch-file")
    version, _ = walk("legacy protocol version")
    if type(version) is not int or version != LEGACY_PROTOCOL_VERSION:
        raise FileCorruptError(f"has legacy protocol version {_short(version)}, not "
                               f"{LEGACY_PROTOCOL_VERSION}", path=path,
                               rule="unsupported-format")
    sys_info, _ = walk("legacy system info")
    little = not (isinstance(sys_info, dict) and sys_info.get("little_endian") is False)
    root, walker = walk("legacy main pickle")
    keys, _ = walk("legacy storage keys")
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise FileCorruptError("legacy storage-key pickle is not a list of strings",
                               path=path, rule="bad-persistent-id")

    offset = reader.tell()
    seen: set[str] = set()
    records: dict[str, StorageRecord] = {}
    for key in keys:
        storage = walker.storages.get(key)
        if storage is None or key in seen:
            raise FileCorruptError(f"legacy storage list names {key[:100]!r}, which the "
                                   "pickle never declared (or names it twice)", path=path,
                                   rule="storage-missing")
        seen.add(key)
        if offset + 8 > size:
            raise FileCorruptError(f"storage '{key}' starts at byte {offset}, past the end of "
                                   f"the {size}-byte file", path=path,
                                   rule="storage-out-of-bounds")
        fh.seek(offset)
        (count,) = struct.unpack("<q" if little else ">q", fh.read(8))
        itemsize = ITEMSIZE[storage.dtype] if storage.dtype != "U8" else 1
        if count * itemsize != storage.nbytes:
            raise FileCorruptError(f"storage '{key}' holds {count} elements of {itemsize} "
                                   f"bytes but the pickle declares {storage.nbytes} bytes",
                                   path=path, rule="storage-size-mismatch")
        records[key] = StorageRecord(key, offset + 8, storage.nbytes, False)
        offset += 8 + storage.nbytes
        if offset > size:
            raise FileCorruptError(f"storage '{key}' ends at byte {offset}, past the end of "
                                   f"the {size}-byte file", path=path,
                                   rule="storage-out-of-bounds")
    unlisted = [k for k in walker.storages if k not in seen]
    if unlisted:
        raise FileCorruptError(f"storage '{unlisted[0][:100]}' is used but has no data "
                               "record", path=path, rule="storage-missing")
    tensors, other = _tensor_infos(path, root, walker)
    return TorchFile(path, "legacy", tensors, other, None, records,
                     "little" if little else "big")


# --------------------------------------------------------------------------------- tensors
def _tensor_infos(path: Path, root: object, walker: PickleWalker,
                  ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    refs, other = flatten_tree(root, lambda v: isinstance(v, TensorRef), path=path)
    infos: dict[str, TensorInfo] = {}
    for name, ref in refs.items():
        _check_bounds(path, ref, name)
        itemsize = ITEMSIZE[ref.dtype]
        infos[name] = TensorInfo(
            name=name, dtype=ref.dtype, shape=ref.shape, nbytes=prod(ref.shape) * itemsize,
            offset=ref.storage.base + ref.offset * itemsize, storage_key=ref.storage.key,
            stride=ref.stride)
    # Tensors the flattening does not name (inside a set, as a dict key) are still loaded.
    for ref in walker.tensors:
        _check_bounds(path, ref, None)
    return infos, other


def _check_bounds(path: Path, ref: TensorRef, name: str | None) -> None:
    if 0 in ref.shape:
        return  # an empty tensor reads nothing, wherever it points
    itemsize = ITEMSIZE[ref.dtype]
    span = sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    end = (ref.offset + 1 + span) * itemsize
    storage: StorageRef = ref.storage
    if end > storage.nbytes:
        label = f"tensor {name!r}" if name is not None else "an unnamed tensor"
        raise FileCorruptError(f"{label} reads up to byte {end} of storage '{storage.key}', "
                               f"which holds {storage.nbytes} bytes", path=path,
                               rule="tensor-out-of-bounds", tensor=name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _short(value: object) -> str:
    if type(value) is int and abs(value) < 10**18:
        return str(value)
    return describe(value)
