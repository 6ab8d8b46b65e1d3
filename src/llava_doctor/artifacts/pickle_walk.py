"""Walk a pickle stream symbolically, without executing it.

``pickle.loads`` runs whatever callables a pickle names. This module never calls it: it reads
opcodes one at a time and keeps a stack of plain Python values and small placeholder objects
(:class:`Global`, :class:`StorageRef`, :class:`TensorRef`). Only the handful of globals that a
tensor checkpoint needs are accepted, and "calling" one of them means evaluating it here, in a
few lines of code that allocate nothing large. Every other global, and every opcode whose real
effect would be to run a method on an object we cannot vouch for, raises
:class:`~llava_doctor.errors.UnsafePickleError` at the point it is *referenced*, so nothing the
attacker stored in the memo or on the stack can later turn it into a call.

Resources are bounded: opcode count, memo size, MARK depth, container nesting and nested
pickles all have caps, and an overrun is a :class:`~llava_doctor.errors.FileCorruptError`.
Nothing here recurses over pickle data, so a hostile file cannot raise ``RecursionError`` or
overflow the C stack (tuple nesting is capped *before* a tuple can be hashed as a dict key).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
import struct
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

from llava_doctor.artifacts.tensors import DTYPE_BITS, STORAGE_TO_ST, TORCH_TO_ST
from llava_doctor.errors import FileCorruptError, UnsafePickleError

# A data.pkl of a checkpoint with 10k tensors is about 2 MB; 64 MiB leaves room for anything
# real while keeping the in-memory copy small.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# About 35 opcodes per tensor: 1M opcodes is ~28k tensors, and walks in well under a second.
MAX_OPS = 1_000_000
# Real checkpoints nest dicts a handful of levels deep.
MAX_NESTING = 100
MAX_MEMO = 1_000_000
# A pickle inside a bytes value inside a pickle...: more than this is never a checkpoint.
MAX_NESTED_PICKLES = 3
# Torch tensors have at most 64 dimensions; sizes and offsets are int64.
MAX_DIMS = 64
MAX_INT64 = 2**63 - 1

Mode = Literal["strict", "scan"]

# Pickle protocols 0-5 begin with PROTO (0x80) and a version byte when the protocol is >= 2.
PROTO_PREFIXES = tuple(bytes([0x80, v]) for v in range(6))


def looks_like_pickle(data: bytes) -> bool:
    """True when ``data`` starts with a PROTO opcode, i.e. could be a pickle of protocol 2..5."""
    return data[:2] in PROTO_PREFIXES


@dataclass(frozen=True)
class Global:
    """A reference to an allowlisted global, e.g. ``torch._utils._rebuild_tensor_v2``."""

    module: str
    name: str
    kind: str

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class StorageRef:
    """A persistent-id storage record: ``nbytes`` are what the pickle declares, not yet checked.

    ``base`` is the byte offset inside the record ``key`` where this storage starts; only the
    legacy format's storage views make it non-zero.
    """

    key: str
    dtype: str
    nbytes: int
    location: str
    base: int = 0


@dataclass(frozen=True, eq=False)  # hashed by identity, like a real tensor used as a dict key
class TensorRef:
    """What ``torch._utils._rebuild_tensor*`` would have built; ``offset`` counts elements."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    is_parameter: bool = False


# torch dtype name -> (dtype string used in TensorInfo, bytes per element). The string is the
# safetensors name where safetensors has one, else the torch name (TensorInfo.torch_dtype_name
# maps it back either way).
TORCH_DTYPES: dict[str, tuple[str, int]] = {
    name: (st, max(1, DTYPE_BITS[st] // 8)) for name, st in TORCH_TO_ST.items()
}
TORCH_DTYPES.update({"complex128": ("complex128", 16), "complex32": ("complex32", 4)})
ITEMSIZE: dict[str, int] = {dt: size for dt, size in TORCH_DTYPES.values()}

_STORAGE_DTYPES: dict[str, str] = dict(STORAGE_TO_ST)
_STORAGE_DTYPES["ComplexDoubleStorage"] = "complex128"

# (module, name) -> kind. Exact pairs only: "torch" + "_utils._rebuild_tensor_v2" would resolve
# to the same function on protocol 4, but torch never writes it that way, so it is refused.
ALLOWED_GLOBALS: dict[tuple[str, str], str] = {
    ("collections", "OrderedDict"): "ordereddict",
    ("torch._utils", "_rebuild_tensor"): "rebuild_tensor",
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "rebuild_tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "rebuild_parameter_with_state",
    ("torch._tensor", "_rebuild_from_type_v2"): "rebuild_from_type_v2",
    ("torch.nn.parameter", "Parameter"): "parameter",
    ("torch", "Tensor"): "tensor_type",
    ("torch", "Size"): "size",
    ("_codecs", "encode"): "encode",
    # Python writes sets as REDUCE(builtins.set, ([...],)) on protocol 2.
    ("builtins", "set"): "set",
    ("builtins", "frozenset"): "frozenset",
    ("torch", "UntypedStorage"): "storage",
    ("torch.storage", "UntypedStorage"): "storage",
}
ALLOWED_GLOBALS.update({("torch", name): "storage" for name in _STORAGE_DTYPES})
ALLOWED_GLOBALS.update({("torch", name): "dtype" for name in TORCH_DTYPES})

_TENSOR_BUILDERS = frozenset({
    "rebuild_tensor", "rebuild_tensor_v2", "rebuild_tensor_v3", "rebuild_parameter",
    "rebuild_parameter_with_state", "parameter",
})
_CONTAINERS = (list, tuple, dict, OrderedDict, set, frozenset)
_CODECS_ENCODINGS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})

_VALUE_OPS = ("BININT1", "BININT2", "BININT", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT",
              "FLOAT", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
              "BINSTRING", "SHORT_BINSTRING")
_BYTES_OPS = ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8")
# Argument readers in pickletools raise these on malformed or truncated input.
_READER_ERRORS = (ValueError, struct.error, OverflowError, EOFError)


class Budget:
    """Opcodes left for all walks of one file, so nested and extra pickles share one cap."""

    def __init__(self, ops: int = MAX_OPS):
        self.limit = ops
        self.left = ops


class BoundedReader:
    """A read-only view of a file that refuses to hand out more than ``limit`` bytes.

    Lets the legacy reader stream its pickles from the file (the tensor data behind them can
    be gigabytes) while a pickle with no STOP cannot make us read all of it.
    """

    def __init__(self, fh: BinaryIO, limit: int):
        self._fh = fh
        self._left = limit
        self.exceeded = False

    def _note_cut(self, wanted: int) -> None:
        if wanted > 0 and self._left == 0:
            pos = self._fh.tell()
            if self._fh.read(1):
                self.exceeded = True
            self._fh.seek(pos)

    def read(self, n: int = -1) -> bytes:
        want = self._left + 1 if n is None or n < 0 else n
        data = self._fh.read(min(want, self._left))
        self._left -= len(data)
        if len(data) < want:
            self._note_cut(want - len(data))
        return data

    def readline(self) -> bytes:
        data = self._fh.readline(self._left)
        self._left -= len(data)
        if not data.endswith(b"\n"):
            self._note_cut(1)
        return data

    def tell(self) -> int:
        return self._fh.tell()


class _Stop(Exception):
    """Raised in scan mode when the bytes turn out not to be a pickle we need to worry about."""


class PickleWalker:
    """Symbolic interpreter for one pickle stream.

    ``mode="strict"`` is for pickles that a loader would unpickle (``data.pkl``, the legacy
    pickles, extra ``.pkl`` members): anything outside the allowlist is unsafe and anything
    malformed is corrupt. ``mode="scan"`` is for bytes that merely *start* like a pickle (a
    bytes value, an odd zip member): only a forbidden global reference is reported; any other
    oddity means "not a pickle" and ends the scan quietly.

    After :meth:`walk`, ``storages`` maps storage keys to what the pickle declared and
    ``tensors`` lists every tensor built, reachable from the root or not.
    """

    def __init__(self, path: Path | str, where: str, *, budget: Budget | None = None,
                 mode: Mode = "strict", level: int = 0):
        self.path = path
        self.where = where
        self.budget = budget if budget is not None else Budget()
        self.mode = mode
        self.level = level
        self.storages: dict[str, StorageRef] = {}
        self.tensors: list[TensorRef] = []
        self._pos = 0
        # id -> (container, depth) for containers holding containers; keeping the container
        # alive here means its id cannot be reused while the entry exists.
        self._deep: dict[int, tuple[object, int]] = {}

    # ----------------------------------------------------------------- errors
    def _corrupt(self, reason: str, rule: str = "bad-pickle") -> Exception:
        # Resource caps stay errors in scan mode: giving up quietly would let a hostile file
        # hide a forbidden global behind a wall of opcodes.
        if self.mode == "scan" and rule not in ("too-complex", "too-deep", "pickle-too-large"):
            return _Stop()
        return FileCorruptError(f"pickle '{self.where}' {reason} (at byte {self._pos})",
                                path=self.path, rule=rule)

    def _unsafe(self, global_name: str, reason: str | None = None) -> UnsafePickleError:
        if reason is None:
            reason = f"references forbidden global '{global_name}'"
        return UnsafePickleError(
            f"pickle '{self.where}' {reason} (at byte {self._pos}); nothing was executed",
            path=self.path, global_name=global_name)

    def _odd(self, global_name: str, reason: str) -> Exception:
        """An operation that would run code on an object we do not vouch for."""
        if self.mode == "scan":
            return _Stop()
        return self._unsafe(global_name, reason)

    # ------------------------------------------------------------------ depth
    def _note_depth(self, container: object, children: Any) -> None:
        deep = self._deep
        inner = 0
        for child in children:  # a plain loop: this runs for every container built
            if isinstance(child, _CONTAINERS):
                entry = deep.get(id(child))
                d = entry[1] if entry is not None else 1
                if d > inner:
                    inner = d
        if inner == 0:
            return
        depth = inner + 1
        if depth > MAX_NESTING:
            raise self._corrupt(f"nests containers more than {MAX_NESTING} levels deep",
                                "too-deep")
        entry = self._deep.get(id(container))
        if entry is None or entry[1] < depth:
            self._deep[id(container)] = (container, depth)

    # ------------------------------------------------------------------- walk
    def walk(self, stream: BinaryIO | BoundedReader) -> object:
        """Interpret one pickle up to its STOP and return the symbolic root value.

        In scan mode returns ``None`` when the bytes are not a well-formed pickle.
        """
        try:
            return self._run(stream)
        except _Stop:
            return None

    def _run(self, stream: BinaryIO | BoundedReader) -> object:
        # One flat stack plus the stack heights at each MARK (as CPython's C unpickler does).
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0
        table = self._table()
        budget = self.budget
        read = stream.read
        tell = stream.tell
        while True:
            self._pos = tell()
            budget.left -= 1
            if budget.left < 0:
                raise self._corrupt(f"needs more than {budget.limit} opcodes", "too-complex")
            code = read(1)
            if not code:
                raise self._ended(stream)
            entry = table[code[0]]
            if entry is None:
                if self.mode == "scan":
                    raise _Stop()
                raise self._unsafe(f"<unknown opcode 0x{code[0]:02x}>",
                                   f"contains unknown opcode 0x{code[0]:02x}")
            name, reader, handler = entry
            arg: Any = None
            if reader is not None:
                try:
                    arg = reader(stream)
                except _READER_ERRORS as exc:
                    if not read(1):
                        raise self._ended(stream) from None
                    reason = _first_line(exc)
                    raise self._corrupt(f"has a malformed {name} argument: {reason}") from None
            if handler is None:  # STOP
                return self._pop()
            handler(arg)

    def _table(self) -> list[tuple[str, Any, Any] | None]:
        """Opcode byte -> (name, argument reader, handler) for this walker."""
        push = self.stack.append
        handlers: dict[str, Any] = {
            "STOP": None,
            "NONE": lambda _: push(None),
            "NEWTRUE": lambda _: push(True),
            "NEWFALSE": lambda _: push(False),
            "EMPTY_LIST": lambda _: push([]),
            "EMPTY_TUPLE": lambda _: push(()),
            "EMPTY_DICT": lambda _: push({}),
            "EMPTY_SET": lambda _: push(set()),
            "PROTO": self._op_proto,
            # Frames only batch reads; the opcodes inside are the same stream.
            "FRAME": lambda _: None,
            "MARK": self._op_mark,
            "POP": self._op_pop,
            "POP_MARK": lambda _: self._pop_mark(),
            "DUP": lambda _: push(self._top()),
            "TUPLE": lambda _: self._push_tuple(self._pop_mark()),
            "TUPLE1": lambda _: self._push_tuple(self._pop_n(1)),
            "TUPLE2": lambda _: self._push_tuple(self._pop_n(2)),
            "TUPLE3": lambda _: self._push_tuple(self._pop_n(3)),
            "LIST": self._op_list,
            "DICT": self._op_dict,
            "FROZENSET": lambda _: push(self._make_set(frozenset, self._pop_mark())),
            "APPEND": self._op_append,
            "APPENDS": self._op_appends,
            "SETITEM": self._op_setitem,
            "SETITEMS": self._op_setitems,
            "ADDITEMS": self._op_additems,
            "PUT": self._op_put,
            "BINPUT": self._op_put,
            "LONG_BINPUT": self._op_put,
            "MEMOIZE": lambda _: self._op_put(len(self.memo)),
            "GET": self._op_get,
            "BINGET": self._op_get,
            "LONG_BINGET": self._op_get,
            "GLOBAL": lambda arg: push(self._global(arg[0], arg[1])),
            "STACK_GLOBAL": self._op_stack_global,
            "REDUCE": self._op_reduce,
            "INST": self._op_inst,
            "OBJ": self._op_obj,
            "NEWOBJ": lambda _: self._op_newobj("NEWOBJ"),
            "NEWOBJ_EX": lambda _: self._op_newobj("NEWOBJ_EX"),
            "BUILD": self._op_build,
            "PERSID": lambda arg: push(self._persistent(arg)),
            "BINPERSID": lambda _: push(self._persistent(self._pop())),
        }
        for name in _VALUE_OPS:
            handlers[name] = push
        for name in _BYTES_OPS:
            handlers[name] = self._op_bytes
        table: list[tuple[str, Any, Any] | None] = [None] * 256
        for op in pickletools.opcodes:
            reader = _read_global_pair if op.name in ("GLOBAL", "INST") else (
                op.arg.reader if op.arg is not None else None)
            # EXT1/2/4 resolve names through copyreg's extension registry and
            # NEXT_BUFFER/READONLY_BUFFER need out-of-band buffers: no checkpoint uses them.
            handler = handlers.get(op.name, self._unsupported(op.name))
            table[ord(op.code)] = (op.name, reader, handler)
        return table

    # ---------------------------------------------------------------- opcodes
    def _pop(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self._corrupt("pops from an empty stack")
        return self.stack.pop()

    def _top(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self._corrupt("uses the top of an empty stack")
        return self.stack[-1]

    def _pop_n(self, n: int) -> list[Any]:
        if len(self.stack) - (self.marks[-1] if self.marks else 0) < n:
            raise self._corrupt("pops from an empty stack")
        items = self.stack[-n:]
        del self.stack[-n:]
        return items

    def _pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self._corrupt("pops a MARK that was never pushed")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def _unsupported(self, name: str) -> Any:
        def handler(_: Any) -> None:
            if self.mode == "scan":
                raise _Stop()
            raise self._unsafe(f"<opcode {name}>", f"uses unsupported opcode {name}")
        return handler

    def _op_proto(self, arg: int) -> None:
        self.proto = arg

    def _op_mark(self, _: Any) -> None:
        if len(self.marks) >= MAX_NESTING:
            raise self._corrupt(f"nests MARKs more than {MAX_NESTING} levels deep", "too-deep")
        self.marks.append(len(self.stack))

    def _op_pop(self, _: Any) -> None:
        # pickle's load_pop: an empty stack above the last MARK pops the MARK instead.
        if len(self.stack) > (self.marks[-1] if self.marks else 0):
            self.stack.pop()
        else:
            self._pop_mark()

    def _op_bytes(self, arg: bytes | bytearray) -> None:
        self._scan_bytes(arg)
        self.stack.append(arg)

    def _push_tuple(self, items: list[Any]) -> None:
        value = tuple(items)
        self._note_depth(value, value)
        self.stack.append(value)

    def _op_list(self, _: Any) -> None:
        items = self._pop_mark()
        self._note_depth(items, items)
        self.stack.append(items)

    def _op_dict(self, _: Any) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise self._corrupt("builds a dict from an odd number of items")
        value: dict = {}
        self._set_items(value, items)
        self.stack.append(value)

    def _op_append(self, _: Any) -> None:
        item = self._pop()
        target = self._top()
        if type(target) is not list:
            raise self._odd(f"<APPEND to {_type_name(target)}>",
                            f"appends to a {_type_name(target)}, not a list")
        target.append(item)
        self._note_depth(target, (item,))

    def _op_appends(self, _: Any) -> None:
        items = self._pop_mark()
        target = self._top()
        if type(target) is not list:
            raise self._odd(f"<APPENDS to {_type_name(target)}>",
                            f"extends a {_type_name(target)}, not a list")
        target.extend(items)
        self._note_depth(target, items)

    def _op_setitem(self, _: Any) -> None:
        value = self._pop()
        key = self._pop()
        self._setitems_on_top("SETITEM", [key, value])

    def _op_setitems(self, _: Any) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise self._corrupt("sets items from an odd number of values")
        self._setitems_on_top("SETITEMS", items)

    def _setitems_on_top(self, name: str, items: list[Any]) -> None:
        target = self._top()
        if type(target) not in (dict, OrderedDict):
            raise self._odd(f"<{name} on {_type_name(target)}>",
                            f"sets items on a {_type_name(target)}, not a dict")
        self._set_items(target, items)

    def _op_additems(self, _: Any) -> None:
        items = self._pop_mark()
        target = self._top()
        if type(target) is not set:
            raise self._odd(f"<ADDITEMS to {_type_name(target)}>",
                            f"adds items to a {_type_name(target)}, not a set")
        self._add_to_set(target, items)

    def _op_put(self, index: Any) -> None:
        if not isinstance(index, int) or index < 0:
            raise self._corrupt("stores to a negative or non-integer memo index")
        index = int(index)
        if len(self.memo) >= MAX_MEMO and index not in self.memo:
            raise self._corrupt(f"stores more than {MAX_MEMO} memo entries", "too-complex")
        self.memo[index] = self._top()

    def _op_get(self, index: Any) -> None:
        try:
            self.stack.append(self.memo[index])
        except (KeyError, TypeError):
            raise self._corrupt(f"reads memo index {_short_repr(index)} that was never "
                                "stored") from None

    def _op_stack_global(self, _: Any) -> None:
        name = self._pop()
        module = self._pop()
        if type(module) is not str or type(name) is not str:
            raise self._odd("<dynamic>", "builds a global name from non-string values")
        self.stack.append(self._global(module, name))

    def _op_reduce(self, _: Any) -> None:
        args = self._pop()
        func = self._pop()
        self.stack.append(self._call(func, args, "REDUCE"))

    def _op_inst(self, arg: tuple[str, str]) -> None:
        cls = self._global(arg[0], arg[1])
        self.stack.append(self._call(cls, tuple(self._pop_mark()), "INST"))

    def _op_obj(self, _: Any) -> None:
        items = self._pop_mark()
        if not items:
            raise self._corrupt("has an OBJ without a class")
        self.stack.append(self._call(items[0], tuple(items[1:]), "OBJ"))

    def _op_newobj(self, name: str) -> None:
        kwargs = self._pop() if name == "NEWOBJ_EX" else {}
        args = self._pop()
        cls = self._pop()
        self.stack.append(self._new(cls, args, kwargs, name))

    def _op_build(self, _: Any) -> None:
        state = self._pop()
        self._build(self._top(), state)

    # ---------------------------------------------------------------- helpers
    def _ended(self, stream: BinaryIO | BoundedReader) -> Exception:
        if isinstance(stream, BoundedReader) and stream.exceeded:
            return self._corrupt(f"is larger than {MAX_PICKLE_BYTES} bytes; refusing to read "
                                 "further", "pickle-too-large")
        return self._corrupt("ends before its STOP opcode", "truncated")

    def _scan_bytes(self, data: bytes | bytearray) -> None:
        if not looks_like_pickle(bytes(data[:2])):
            return
        if self.level >= MAX_NESTED_PICKLES:
            raise FileCorruptError(
                f"pickle '{self.where}' holds pickles nested more than {MAX_NESTED_PICKLES} "
                f"levels deep (at byte {self._pos})", path=self.path, rule="too-deep")
        inner = PickleWalker(self.path, f"bytes value in {self.where}", budget=self.budget,
                             mode="scan", level=self.level + 1)
        inner.walk(io.BytesIO(bytes(data)))

    def _set_items(self, target: dict, items: list[Any]) -> None:
        self._note_depth(target, items)
        for i in range(0, len(items), 2):
            try:
                target[items[i]] = items[i + 1]
            except TypeError:
                raise self._corrupt(f"uses an unhashable {_type_name(items[i])} as a dict key") \
                    from None

    def _add_to_set(self, target: set, items: list[Any]) -> None:
        self._note_depth(target, items)
        try:
            target.update(items)
        except TypeError:
            raise self._corrupt("puts an unhashable value in a set") from None

    def _make_set(self, kind: type, items: Any) -> set | frozenset:
        items = list(items)
        try:
            value = kind(items)
        except TypeError:
            raise self._corrupt("puts an unhashable value in a set") from None
        self._note_depth(value, items)
        return value

    def _global(self, module: str, name: str) -> Global:
        # Mirror pickle.Unpickler.find_class(fix_imports=True): protocol < 3 names are mapped
        # from Python 2 before import, so the mapped name is the one that would be imported.
        if self.proto < 3:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        kind = ALLOWED_GLOBALS.get((module, name))
        full = f"{module}.{name}"
        if kind is None:
            raise self._unsafe(full[:200])
        return Global(module, name, kind)

    def _call(self, func: Any, args: Any, opname: str) -> Any:
        if not isinstance(func, Global):
            raise self._odd(f"<{opname} of {_type_name(func)}>",
                            f"calls a {_type_name(func)} value")
        if type(args) is not tuple:
            raise self._corrupt(f"calls '{func.full_name}' with a non-tuple argument list")
        kind = func.kind
        if kind in _TENSOR_BUILDERS:
            return self._rebuild(func, args)
        if kind == "rebuild_from_type_v2":
            if len(args) != 4:
                raise self._bad_args(func)
            inner, new_type, inner_args, _state = args
            if not (isinstance(inner, Global) and inner.kind in _TENSOR_BUILDERS) or not (
                    isinstance(new_type, Global) and new_type.kind in ("tensor_type", "parameter")):
                raise self._odd(func.full_name, f"calls '{func.full_name}' with a function or "
                                "type that is not a tensor builder")
            if type(inner_args) is not tuple:
                raise self._bad_args(func)
            tensor = self._rebuild(inner, inner_args)
            if new_type.kind == "parameter" and not tensor.is_parameter:
                tensor = replace(tensor, is_parameter=True)
            return tensor
        if kind == "ordereddict":
            value: OrderedDict = OrderedDict()
            if len(args) > 1:
                raise self._bad_args(func)
            if args:
                pairs = args[0]
                if isinstance(pairs, dict):
                    pairs = list(pairs.items())
                if not isinstance(pairs, (list, tuple)) or not all(
                        type(p) in (tuple, list) and len(p) == 2 for p in pairs):
                    raise self._bad_args(func)
                self._set_items(value, [x for p in pairs for x in p])
            return value
        if kind == "size":
            if len(args) > 1 or (args and not _is_int_seq(args[0])):
                raise self._bad_args(func)
            return tuple(args[0]) if args else ()
        if kind in ("set", "frozenset"):
            if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, set, frozenset))):
                raise self._bad_args(func)
            return self._make_set(set if kind == "set" else frozenset, args[0] if args else ())
        if kind == "encode":
            # pickle protocol 2 writes bytes as _codecs.encode(str, 'latin1').
            if not 1 <= len(args) <= 2 or type(args[0]) is not str or (
                    len(args) == 2 and args[1] not in _CODECS_ENCODINGS):
                raise self._odd(func.full_name, f"calls '{func.full_name}' with arguments "
                                "other than (str, 'latin1')")
            try:
                data = args[0].encode(args[1] if len(args) == 2 else "utf-8")
            except UnicodeEncodeError:
                raise self._corrupt("encodes a string that does not fit its codec") from None
            self._scan_bytes(data)
            return data
        raise self._odd(func.full_name, f"calls '{func.full_name}', which a tensor checkpoint "
                        "never calls")

    def _bad_args(self, func: Global) -> Exception:
        return self._corrupt(f"calls '{func.full_name}' with arguments it does not take",
                             "bad-tensor" if func.kind in _TENSOR_BUILDERS else "bad-pickle")

    def _rebuild(self, func: Global, args: tuple) -> TensorRef:
        kind = func.kind
        if kind in ("rebuild_parameter", "rebuild_parameter_with_state", "parameter"):
            wanted = {"rebuild_parameter": (3, 3), "rebuild_parameter_with_state": (4, 4),
                      "parameter": (1, 2)}[kind]
            if not wanted[0] <= len(args) <= wanted[1] or not isinstance(args[0], TensorRef):
                raise self._bad_args(func)
            tensor = replace(args[0], is_parameter=True)
            self.tensors.append(tensor)
            return tensor
        counts = {"rebuild_tensor": (4, 4), "rebuild_tensor_v2": (6, 7),
                  "rebuild_tensor_v3": (7, 8)}[kind]
        if not counts[0] <= len(args) <= counts[1]:
            raise self._bad_args(func)
        storage, offset, size, stride = args[:4]
        if not isinstance(storage, StorageRef):
            raise self._corrupt(f"calls '{func.full_name}' without a storage record",
                                "bad-tensor")
        dtype = storage.dtype
        if kind == "rebuild_tensor_v3":
            dt = args[6]
            if not (isinstance(dt, Global) and dt.kind == "dtype"):
                raise self._bad_args(func)
            dtype = TORCH_DTYPES[dt.name][0]
        if not (type(offset) is int and 0 <= offset <= MAX_INT64 and _is_int_seq(size)
                and _is_int_seq(stride) and len(size) == len(stride) <= MAX_DIMS
                and all(0 <= v <= MAX_INT64 for v in (*size, *stride))):
            raise self._corrupt(f"gives '{func.full_name}' an offset, size or stride that is "
                                "not a list of non-negative int64 values", "bad-tensor")
        tensor = TensorRef(storage, offset, tuple(size), tuple(stride), dtype)
        self.tensors.append(tensor)
        return tensor

    def _new(self, cls: Any, args: Any, kwargs: Any, opname: str) -> Any:
        if not isinstance(cls, Global):
            raise self._odd(f"<{opname} of {_type_name(cls)}>",
                            f"instantiates a {_type_name(cls)} value")
        if type(args) is not tuple or type(kwargs) is not dict or kwargs:
            raise self._corrupt(f"gives {opname} of '{cls.full_name}' malformed arguments")
        # cls.__new__(cls, *args): OrderedDict ignores the arguments, tuple subclasses use them.
        if cls.kind == "ordereddict":
            return OrderedDict()
        if cls.kind == "size":
            return self._call(cls, args, opname)
        raise self._odd(cls.full_name, f"instantiates '{cls.full_name}' with {opname}")

    def _build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, TensorRef):
            return  # Tensor.__setstate__ only restores requires_grad and hooks
        if type(inst) is OrderedDict and isinstance(state, dict) and all(
                type(k) is str and not k.startswith("__") for k in state):
            # state_dict() OrderedDicts carry `_metadata`; it lands in the instance __dict__.
            self._note_depth(inst, state.values())
            return
        raise self._odd(f"<BUILD on {_type_name(inst)}>",
                        f"sets state on a {_type_name(inst)}, which a tensor checkpoint never "
                        "does")

    def _persistent(self, pid: Any) -> StorageRef:
        # torch writes ('storage', StorageClass, key, location, numel) and, in the legacy
        # format, a sixth item: None or a (view_key, offset, size) storage view.
        if type(pid) is not tuple or len(pid) not in (5, 6) or _ascii(pid[0]) != "storage":
            raise self._corrupt("has a persistent id that is not a torch storage record",
                                "bad-persistent-id")
        storage_type, key, location, numel = pid[1:5]
        key = _ascii(key)
        location = _ascii(location)
        if not (isinstance(storage_type, Global) and storage_type.kind == "storage"
                and key and location is not None and type(numel) is int
                and 0 <= numel <= MAX_INT64):
            raise self._corrupt("has a malformed torch storage record", "bad-persistent-id")
        if storage_type.name == "UntypedStorage":
            dtype, itemsize = "U8", 1
        else:
            dtype = _STORAGE_DTYPES[storage_type.name]
            itemsize = ITEMSIZE[dtype]
        ref = StorageRef(key, dtype, numel * itemsize, location)
        known = self.storages.setdefault(key, ref)
        if (known.dtype, known.nbytes) != (ref.dtype, ref.nbytes):
            raise self._corrupt(f"declares storage '{key[:50]}' twice with different types or "
                                "sizes", "storage-conflict")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return known
        if not (type(view) is tuple and len(view) == 3 and _ascii(view[0])
                and type(view[1]) is int and type(view[2]) is int
                and 0 <= view[1] and 0 <= view[2]):
            raise self._corrupt("has a malformed storage view record", "bad-persistent-id")
        base, size = view[1] * itemsize, view[2] * itemsize
        if base + size > known.nbytes:
            raise self._corrupt(f"declares a view of storage '{key[:50]}' past its end",
                                "storage-out-of-bounds")
        return StorageRef(key, dtype, size, known.location, base)


def _read_global_pair(stream: BinaryIO | BoundedReader) -> tuple[str, str]:
    # Like pickle's load_global: two raw UTF-8 lines, no escape processing (pickletools'
    # reader would undo backslash escapes and join the two with a space).
    module = stream.readline()
    name = stream.readline()
    if not (module.endswith(b"\n") and name.endswith(b"\n")):
        raise ValueError("no newline found when trying to read a global name")
    return module[:-1].decode("utf-8"), name[:-1].decode("utf-8")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _short_repr(value: Any) -> str:
    if type(value) is int and abs(value) < 10**18:
        return str(value)
    return describe(value)


def _ascii(value: Any) -> str | None:
    if type(value) is str:
        return value
    if type(value) is bytes:
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


def _is_int_seq(value: Any) -> bool:
    return type(value) in (tuple, list) and all(type(v) is int for v in value)


def _type_name(value: Any) -> str:
    if isinstance(value, Global):
        return f"'{value.full_name}'"
    if isinstance(value, TensorRef):
        return "tensor"
    if isinstance(value, StorageRef):
        return "storage"
    return type(value).__name__


def describe(value: Any) -> str:
    """A short type description of a non-tensor value, e.g. ``int``, ``list[3]``, ``bytes[16]``."""
    if value is None:
        return "None"
    if isinstance(value, Global):
        return value.full_name
    if isinstance(value, StorageRef):
        return f"storage[{value.nbytes} bytes]"
    if isinstance(value, (str, int, float, complex)):
        return type(value).__name__
    try:
        return f"{type(value).__name__}[{len(value)}]"
    except TypeError:
        return type(value).__name__
