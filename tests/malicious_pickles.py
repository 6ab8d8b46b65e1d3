"""Build hostile torch files by script, for tests; no binary fixture is ever committed.

Every payload is written opcode by opcode (or by ``pickle.dumps`` of *benign* values only),
so building the corpus runs nothing. The code-execution payloads, if some loader ever ran
them, would create the ``canary`` file; the tests assert that it never appears. A few
techniques are stepping stones rather than complete exploits (BUILD or SETITEM on an object
that is not a dict, NEWOBJ of an allowlisted type, EXT opcodes) and the resource ones
(nesting, zip bombs, oversized storages) aim at memory or time, not at the canary.

``TECHNIQUES`` lists every technique with the error the reader must raise and the expected
``global_name`` (for :class:`UnsafePickleError`) or ``rule`` (for :class:`FileCorruptError`).
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_doctor.errors import FileCorruptError, UnsafePickleError

# ----------------------------------------------------------------------------- opcodes
PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
MARK = b"("
STOP = b"."
TUPLE = b"t"
TUPLE1 = b"\x85"
EMPTY_TUPLE = b")"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
REDUCE = b"R"
BUILD = b"b"
SETITEM = b"s"
SETITEMS = b"u"
APPEND = b"a"
POP = b"0"
NEWFALSE = b"\x89"
BINPERSID = b"Q"
MEMOIZE = b"\x94"
STACK_GLOBAL = b"\x93"
NEWOBJ = b"\x81"
NEWOBJ_EX = b"\x92"
OBJ = b"o"
NONE = b"N"

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


def glob(module: str, name: str) -> bytes:
    """GLOBAL opcode (protocol 0+)."""
    return b"c" + f"{module}\n{name}\n".encode()


def inst(module: str, name: str) -> bytes:
    return b"i" + f"{module}\n{name}\n".encode()


def ustr(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def binbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def num(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def binput(index: int) -> bytes:
    return b"q" + bytes([index])


def binget(index: int) -> bytes:
    return b"h" + bytes([index])


def tup(values: tuple[int, ...]) -> bytes:
    return MARK + b"".join(num(v) for v in values) + TUPLE


def call(module: str, name: str, *args: bytes) -> bytes:
    """``module.name(*args)`` as GLOBAL, MARK, args, TUPLE, REDUCE."""
    return glob(module, name) + MARK + b"".join(args) + TUPLE + REDUCE


def tensor_v2(key: str, numel: int, shape: tuple[int, ...], stride: tuple[int, ...],
              storage: str = "FloatStorage", extra_pid: bytes = b"") -> bytes:
    """What torch writes for one tensor: _rebuild_tensor_v2(persistent storage, ...)."""
    pid = (MARK + ustr("storage") + glob("torch", storage) + ustr(key) + ustr("cpu")
           + num(numel) + extra_pid + TUPLE + BINPERSID)
    return (glob("torch._utils", "_rebuild_tensor_v2") + MARK + pid + num(0) + tup(shape)
            + tup(stride) + NEWFALSE + glob("collections", "OrderedDict") + EMPTY_TUPLE
            + REDUCE + TUPLE + REDUCE)


def state_dict(*items: tuple[str, bytes]) -> bytes:
    """A protocol 2 pickle of ``{name: value, ...}`` with values given as opcodes."""
    body = b"".join(ustr(k) + v for k, v in items)
    return PROTO2 + EMPTY_DICT + MARK + body + SETITEMS + STOP


def system_call(canary: Path, module: str = "posix", name: str = "system") -> bytes:
    return call(module, name, ustr(f"touch {canary}"))


def evil_pickle(canary: Path, module: str = "posix", name: str = "system") -> bytes:
    return PROTO2 + system_call(canary, module, name) + STOP


# ----------------------------------------------------------------------------- containers
def write_torch_zip(path: Path, data_pkl: bytes, *, archive: str = "archive",
                    storages: dict[str, bytes] | None = None,
                    extra: dict[str, bytes] | None = None,
                    compress: set[str] | None = None) -> Path:
    """Lay out a zip the way torch.save does: data.pkl first, members stored uncompressed."""
    members = {f"{archive}/data.pkl": data_pkl, f"{archive}/byteorder": b"little"}
    for key, raw in (storages or {}).items():
        members[f"{archive}/data/{key}"] = raw
    members[f"{archive}/version"] = b"3\n"
    members.update(extra or {})
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            method = zipfile.ZIP_DEFLATED if name in (compress or ()) else zipfile.ZIP_STORED
            zf.writestr(zipfile.ZipInfo(name), raw, compress_type=method)
    return path


def legacy_file(path: Path, main: bytes, keys: list[str] | None = None,
                records: bytes = b"", magic: bytes | None = None) -> Path:
    """The legacy (non-zip) layout: magic, version, sys info, main pickle, keys, records."""
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = magic if magic is not None else pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2)
    path.write_bytes(head + pickle.dumps(1001, protocol=2) + pickle.dumps(sys_info, protocol=2)
                     + main + pickle.dumps(keys or [], protocol=2) + records)
    return path


def healthy_torch_zip(path: Path, obj: object | None = None) -> Path:
    import torch

    torch.save(obj if obj is not None else {"w": torch.arange(4, dtype=torch.float32)}, path)
    return path


def _torch_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _rezip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(zipfile.ZipInfo(name), raw, compress_type=zipfile.ZIP_STORED)
    return path


# ----------------------------------------------------------------------------- techniques
def t_global_posix_system(d: Path, canary: Path) -> Path:
    return write_torch_zip(d / "posix_system.pt", evil_pickle(canary))


def t_global_os_system_proto0(d: Path, canary: Path) -> Path:
    # Text protocol 0, as hand-written exploits often are.
    data = b"cos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR."
    return write_torch_zip(d / "os_system_proto0.pt", data)


def t_subprocess_popen(d: Path, canary: Path) -> Path:
    data = PROTO2 + call("subprocess", "Popen", EMPTY_LIST + MARK + ustr("touch")
                         + ustr(str(canary)) + b"e") + STOP
    return write_torch_zip(d / "subprocess_popen.pt", data)


def t_builtins_eval_py2_name(d: Path, canary: Path) -> Path:
    # `__builtin__` is Python 2's name; Unpickler maps it to builtins for protocol < 3.
    data = PROTO2 + call("__builtin__", "eval", ustr(f"open({str(canary)!r}, 'w').close()")) + STOP
    return write_torch_zip(d / "builtins_eval.pt", data)


def t_builtins_exec_stack_global(d: Path, canary: Path) -> Path:
    code = f"open({str(canary)!r}, 'w').close()"
    data = (PROTO4 + ustr("builtins") + ustr("exec") + STACK_GLOBAL + MARK + ustr(code)
            + TUPLE + REDUCE + STOP)
    return write_torch_zip(d / "builtins_exec.pt", data)


def t_builtins_import(d: Path, canary: Path) -> Path:
    # __import__('os').system(...) needs getattr too; __import__ is flagged first.
    os_mod = call("builtins", "__import__", ustr("os"))
    data = (PROTO2 + glob("builtins", "getattr") + MARK + os_mod + ustr("system") + TUPLE
            + REDUCE + MARK + ustr(f"touch {canary}") + TUPLE + REDUCE + STOP)
    return write_torch_zip(d / "builtins_import.pt", data)


def t_stack_global_from_memo(d: Path, canary: Path) -> Path:
    # Module and name are memoized, popped, then fetched back: scanners that only look at
    # the two previous string opcodes miss this.
    data = (PROTO4 + ustr("os") + MEMOIZE + ustr("system") + MEMOIZE + POP + POP
            + ustr("collections") + ustr("OrderedDict") + POP + POP
            + binget(0) + binget(1) + STACK_GLOBAL + MARK + ustr(f"touch {canary}") + TUPLE
            + REDUCE + STOP)
    return write_torch_zip(d / "stack_global_memo.pt", data)


def t_stack_global_dynamic(d: Path, canary: Path) -> Path:
    # The module operand is computed (bytes from an allowed call), not a literal string.
    module = call("_codecs", "encode", ustr("os"), ustr("latin1"))
    data = (PROTO4 + module + ustr("system") + STACK_GLOBAL + MARK + ustr(f"touch {canary}")
            + TUPLE + REDUCE + STOP)
    return write_torch_zip(d / "stack_global_dynamic.pt", data)


def t_memo_hidden_callable(d: Path, canary: Path) -> Path:
    # The callable is stored with BINPUT, dropped, and called much later via BINGET, with
    # MEMOIZE and BINPUT indices interleaved (picklescan #14).
    data = (PROTO4 + glob("posix", "system") + binput(7) + POP
            + ustr("a") + MEMOIZE + POP + EMPTY_DICT + binput(1) + POP
            + tensor_v2("0", 4, (4,), (1,)) + POP
            + binget(7) + MARK + ustr(f"touch {canary}") + TUPLE + REDUCE + STOP)
    return write_torch_zip(d / "memo_hidden.pt", data, storages={"0": bytes(16)})


def t_getattr_chain(d: Path, canary: Path) -> Path:
    # _rebuild_tensor_v2.__globals__['sys'].modules['os'].system(...) via builtins.getattr on
    # an allowlisted function.
    ga = binget(0)

    def getattr_(obj: bytes, attr: str) -> bytes:
        return ga + MARK + obj + ustr(attr) + TUPLE + REDUCE

    fn = glob("torch._utils", "_rebuild_tensor_v2")
    globals_get = getattr_(getattr_(fn, "__globals__"), "get")
    sys_mod = globals_get + MARK + ustr("sys") + TUPLE + REDUCE
    modules_get = getattr_(getattr_(sys_mod, "modules"), "get")
    os_mod = modules_get + MARK + ustr("os") + TUPLE + REDUCE
    data = (PROTO2 + glob("builtins", "getattr") + binput(0) + POP
            + getattr_(os_mod, "system") + MARK + ustr(f"touch {canary}") + TUPLE + REDUCE
            + STOP)
    return write_torch_zip(d / "getattr_chain.pt", data)


def t_dotted_name_proto4(d: Path, canary: Path) -> Path:
    # Protocol 4 resolves dotted names attribute by attribute: subprocess.os.system.
    data = (PROTO4 + ustr("subprocess") + ustr("os.system") + STACK_GLOBAL + MARK
            + ustr(f"touch {canary}") + TUPLE + REDUCE + STOP)
    return write_torch_zip(d / "dotted_name.pt", data)


def t_inst(d: Path, canary: Path) -> Path:
    data = b"(S'touch " + str(canary).encode() + b"'\nios\nsystem\n."
    return write_torch_zip(d / "inst.pt", data)


def t_obj(d: Path, canary: Path) -> Path:
    data = PROTO2 + MARK + glob("os", "system") + ustr(f"touch {canary}") + OBJ + STOP
    return write_torch_zip(d / "obj.pt", data)


def t_newobj_allowed_type(d: Path, canary: Path) -> Path:
    # NEWOBJ on a type the allowlist accepts only as a *value* (torch.Tensor as new_type).
    data = PROTO2 + glob("torch", "Tensor") + EMPTY_TUPLE + NEWOBJ + STOP
    return write_torch_zip(d / "newobj_tensor.pt", data)


def t_newobj_ex_popen(d: Path, canary: Path) -> Path:
    args = MARK + EMPTY_LIST + MARK + ustr("touch") + ustr(str(canary)) + b"e" + TUPLE
    data = PROTO4 + glob("subprocess", "Popen") + args + EMPTY_DICT + NEWOBJ_EX + STOP
    return write_torch_zip(d / "newobj_ex.pt", data)


def t_build_on_allowed_class(d: Path, canary: Path) -> Path:
    # modelscan #85: BUILD with slot state sets attributes on an allowlisted class object, a
    # stepping stone for a later call (harmless values here, so BUILD itself is what is
    # flagged).
    data = (PROTO2 + glob("collections", "OrderedDict") + MARK + NONE + EMPTY_DICT
            + ustr("__reduce__") + glob("collections", "OrderedDict") + SETITEM + TUPLE + BUILD
            + STOP)
    return write_torch_zip(d / "build_on_class.pt", data)


def t_setitem_on_tensor(d: Path, canary: Path) -> Path:
    # CVE-2026-24747 class: SETITEM on something that is not a dict.
    data = (PROTO2 + tensor_v2("0", 4, (4,), (1,)) + ustr("x") + ustr("y") + SETITEM + STOP)
    return write_torch_zip(d / "setitem_tensor.pt", data, storages={"0": bytes(16)})


def t_ext_opcode(d: Path, canary: Path) -> Path:
    # EXT1 looks a global up in copyreg's extension registry.
    data = PROTO2 + b"\x82\x01" + MARK + ustr(f"touch {canary}") + TUPLE + REDUCE + STOP
    return write_torch_zip(d / "ext1.pt", data)


def t_unknown_opcode(d: Path, canary: Path) -> Path:
    data = PROTO2 + EMPTY_DICT + b"\xff" + STOP
    return write_torch_zip(d / "unknown_opcode.pt", data)


def t_nested_pickle_loads(d: Path, canary: Path) -> Path:
    data = PROTO2 + call("pickle", "loads", binbytes(evil_pickle(canary))) + STOP
    return write_torch_zip(d / "nested_loads.pt", data)


def t_nested_pickle_in_bytes(d: Path, canary: Path) -> Path:
    # A real torch.save file whose dict also holds a pickle as a bytes value (written by torch
    # as _codecs.encode(str, 'latin1')). Harmless unless someone unpickles it: still flagged.
    import torch

    return healthy_torch_zip(d / "bytes_value.pt",
                             {"w": torch.ones(2), "blob": evil_pickle(canary)})


def t_nested_pickle_binbytes(d: Path, canary: Path) -> Path:
    data = state_dict(("blob", binbytes(evil_pickle(canary, "subprocess", "getoutput"))))
    return write_torch_zip(d / "binbytes_value.pt", data)


def t_zip_extra_pkl(d: Path, canary: Path) -> Path:
    path = healthy_torch_zip(d / "extra_pkl.pt")
    members = _torch_members(path)
    archive = next(iter(members)).split("/")[0]
    members[f"{archive}/extra.pkl"] = evil_pickle(canary)
    return _rezip(path, members)


def t_zip_sniffed_member(d: Path, canary: Path) -> Path:
    # Not named .pkl, but starts with PROTO: some loader may still unpickle it.
    path = healthy_torch_zip(d / "sniffed_member.pt")
    members = _torch_members(path)
    archive = next(iter(members)).split("/")[0]
    members[f"{archive}/extra_state"] = evil_pickle(canary, "nt", "system")
    return _rezip(path, members)


def t_zip_trailing_pickle(d: Path, canary: Path) -> Path:
    data = state_dict(("a", num(1))) + evil_pickle(canary)
    return write_torch_zip(d / "trailing.pt", data)


def t_legacy_evil_main(d: Path, canary: Path) -> Path:
    return legacy_file(d / "legacy_main.bin", evil_pickle(canary))


def t_legacy_evil_magic(d: Path, canary: Path) -> Path:
    # torch unpickles the magic number first, before checking anything.
    return legacy_file(d / "legacy_magic.bin", state_dict(), magic=evil_pickle(canary))


def t_polyglot_legacy_then_zip(d: Path, canary: Path) -> Path:
    # zipfile.is_zipfile() says yes (the zip is at the end) but torch reads the front as a
    # legacy pickle, so that is what must be checked.
    legacy = legacy_file(d / "tmp_front.bin", evil_pickle(canary)).read_bytes()
    (d / "tmp_front.bin").unlink()
    back = healthy_torch_zip(d / "tmp_back.pt").read_bytes()
    (d / "tmp_back.pt").unlink()
    path = d / "polyglot.pt"
    path.write_bytes(legacy + back)
    return path


def t_zip_path_escape(d: Path, canary: Path) -> Path:
    return write_torch_zip(d / "path_escape.pt", state_dict(),
                           extra={"archive/../evil.pkl": evil_pickle(canary)})


def t_zip_second_archive_folder(d: Path, canary: Path) -> Path:
    return write_torch_zip(d / "second_folder.pt", state_dict(),
                           extra={"other/data.pkl": evil_pickle(canary)})


def t_zip_duplicate_member(d: Path, canary: Path) -> Path:
    path = d / "duplicate.pt"
    import warnings

    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we want
        zf.writestr("archive/data.pkl", state_dict())
        zf.writestr("archive/version", b"3\n")
        zf.writestr("archive/data.pkl", evil_pickle(canary))
    return path


def t_zip_bomb_compressed(d: Path, canary: Path) -> Path:
    # 4 MiB of zeros deflate to a few KiB; torch never compresses members.
    data = state_dict(("w", tensor_v2("0", 2**20, (2**20,), (1,))))
    return write_torch_zip(d / "bomb_deflate.pt", data, storages={"0": bytes(4 * 2**20)},
                           compress={"archive/data/0"})


def t_zip_bomb_declared_size(d: Path, canary: Path) -> Path:
    # A member whose central-directory size claims 4 GiB in a file of a few hundred bytes.
    path = write_torch_zip(d / "bomb_size.pt", state_dict(("w", tensor_v2("0", 4, (4,), (1,)))),
                           storages={"0": bytes(16)})
    raw = bytearray(path.read_bytes())
    cd = raw.find(b"PK\x01\x02")  # central-directory entries
    while cd != -1:
        name_len = struct.unpack_from("<H", raw, cd + 28)[0]
        name = bytes(raw[cd + 46: cd + 46 + name_len])
        if name == b"archive/data/0":
            struct.pack_into("<II", raw, cd + 20, 0xFFFFFFF0, 0xFFFFFFF0)
        cd = raw.find(b"PK\x01\x02", cd + 4)
    path.write_bytes(bytes(raw))
    return path


def t_deep_marks(d: Path, canary: Path) -> Path:
    # 100k nested lists via MARK ... LIST.
    n = 100_000
    data = PROTO2 + MARK * n + b"l" * n + STOP
    return write_torch_zip(d / "deep_marks.pt", data)


def t_deep_tuples(d: Path, canary: Path) -> Path:
    # 100k nested one-tuples with no MARK at all, then used as a dict key: hashing it would
    # overflow the C stack of whoever builds it.
    n = 100_000
    data = PROTO2 + EMPTY_DICT + NONE + TUPLE1 * n + NONE + SETITEM + STOP
    return write_torch_zip(d / "deep_tuples.pt", data)


def t_deep_lists_outer_first(d: Path, canary: Path) -> Path:
    # Lists linked outermost first, so no depth is visible while building; only the walk of
    # the finished tree can see it.
    n = 5_000
    body = EMPTY_LIST + binput(0) + b"r" + struct.pack("<I", 1)  # LONG_BINPUT 1 = current
    for _ in range(n):
        body += EMPTY_LIST + b"r" + struct.pack("<I", 2) + POP  # new list -> memo 2
        body += b"j" + struct.pack("<I", 1) + b"j" + struct.pack("<I", 2) + APPEND + POP
        body += b"j" + struct.pack("<I", 2) + b"r" + struct.pack("<I", 1) + POP
    data = PROTO2 + body + POP + binget(0) + STOP
    return write_torch_zip(d / "deep_lists.pt", data)


def t_billion_laughs(d: Path, canary: Path) -> Path:
    # 40 levels of dicts that each hold the previous level twice: 2**40 paths to flatten.
    body = tensor_v2("0", 1, (1,), (1,)) + binput(0) + POP
    for level in range(1, 41):
        body += (EMPTY_DICT + MARK + ustr("a") + binget(level - 1) + ustr("b")
                 + binget(level - 1) + SETITEMS + binput(level) + POP)
    data = PROTO2 + body + binget(40) + STOP
    return write_torch_zip(d / "billion_laughs.pt", data, storages={"0": bytes(4)})


def t_too_many_opcodes(d: Path, canary: Path) -> Path:
    # 2.4M cheap opcodes: the walk must give up, not grind.
    data = PROTO2 + (NONE + POP) * 1_200_000 + EMPTY_DICT + STOP
    return write_torch_zip(d / "many_ops.pt", data)


def t_storage_larger_than_file(d: Path, canary: Path) -> Path:
    n = 2**40
    data = state_dict(("w", tensor_v2("0", n, (n,), (1,))))
    return write_torch_zip(d / "storage_huge.pt", data, storages={"0": bytes(16)})


def t_legacy_storage_larger_than_file(d: Path, canary: Path) -> Path:
    n = 2**40
    main = state_dict(("w", tensor_v2("1", n, (n,), (1,), extra_pid=NONE)))
    return legacy_file(d / "legacy_storage_huge.bin", main, keys=["1"],
                       records=struct.pack("<q", n) + bytes(64))


def t_tensor_past_storage(d: Path, canary: Path) -> Path:
    # A view that reads past its storage: heap over-read in torch < 2.10 weights_only.
    data = state_dict(("w", tensor_v2("0", 4, (100,), (1,))))
    return write_torch_zip(d / "tensor_oob.pt", data, storages={"0": bytes(16)})


@dataclass(frozen=True)
class Technique:
    name: str
    build: Callable[[Path, Path], Path]
    error: type[Exception]
    detail: str  # global_name for UnsafePickleError, rule for FileCorruptError


U, C = UnsafePickleError, FileCorruptError
TECHNIQUES: list[Technique] = [
    Technique("global_posix_system", t_global_posix_system, U, "posix.system"),
    Technique("global_os_system_proto0", t_global_os_system_proto0, U, "os.system"),
    Technique("subprocess_popen", t_subprocess_popen, U, "subprocess.Popen"),
    Technique("builtins_eval_py2_name", t_builtins_eval_py2_name, U, "builtins.eval"),
    Technique("builtins_exec_stack_global", t_builtins_exec_stack_global, U, "builtins.exec"),
    Technique("builtins_import", t_builtins_import, U, "builtins.getattr"),
    Technique("stack_global_from_memo", t_stack_global_from_memo, U, "os.system"),
    Technique("stack_global_dynamic", t_stack_global_dynamic, U, "<dynamic>"),
    Technique("memo_hidden_callable", t_memo_hidden_callable, U, "posix.system"),
    Technique("getattr_chain", t_getattr_chain, U, "builtins.getattr"),
    Technique("dotted_name_proto4", t_dotted_name_proto4, U, "subprocess.os.system"),
    Technique("inst", t_inst, U, "os.system"),
    Technique("obj", t_obj, U, "os.system"),
    Technique("newobj_allowed_type", t_newobj_allowed_type, U, "torch.Tensor"),
    Technique("newobj_ex_popen", t_newobj_ex_popen, U, "subprocess.Popen"),
    Technique("build_on_allowed_class", t_build_on_allowed_class, U,
              "<BUILD on 'collections.OrderedDict'>"),
    Technique("setitem_on_tensor", t_setitem_on_tensor, U, "<SETITEM on tensor>"),
    Technique("ext_opcode", t_ext_opcode, U, "<opcode EXT1>"),
    Technique("unknown_opcode", t_unknown_opcode, U, "<unknown opcode 0xff>"),
    Technique("nested_pickle_loads", t_nested_pickle_loads, U, "pickle.loads"),
    Technique("nested_pickle_in_bytes", t_nested_pickle_in_bytes, U, "posix.system"),
    Technique("nested_pickle_binbytes", t_nested_pickle_binbytes, U, "subprocess.getoutput"),
    Technique("zip_extra_pkl", t_zip_extra_pkl, U, "posix.system"),
    Technique("zip_sniffed_member", t_zip_sniffed_member, U, "nt.system"),
    Technique("zip_trailing_pickle", t_zip_trailing_pickle, U, "posix.system"),
    Technique("legacy_evil_main", t_legacy_evil_main, U, "posix.system"),
    Technique("legacy_evil_magic", t_legacy_evil_magic, U, "posix.system"),
    Technique("polyglot_legacy_then_zip", t_polyglot_legacy_then_zip, U, "posix.system"),
    Technique("zip_path_escape", t_zip_path_escape, C, "zip-path-escape"),
    Technique("zip_second_archive_folder", t_zip_second_archive_folder, C, "zip-path-escape"),
    Technique("zip_duplicate_member", t_zip_duplicate_member, C, "zip-duplicate-member"),
    Technique("zip_bomb_compressed", t_zip_bomb_compressed, C, "zip-bomb"),
    Technique("zip_bomb_declared_size", t_zip_bomb_declared_size, C, "zip-bomb"),
    Technique("deep_marks", t_deep_marks, C, "too-deep"),
    Technique("deep_tuples", t_deep_tuples, C, "too-deep"),
    Technique("deep_lists_outer_first", t_deep_lists_outer_first, C, "too-deep"),
    Technique("billion_laughs", t_billion_laughs, C, "too-complex"),
    Technique("too_many_opcodes", t_too_many_opcodes, C, "too-complex"),
    Technique("storage_larger_than_file", t_storage_larger_than_file, C,
              "storage-out-of-bounds"),
    Technique("legacy_storage_larger_than_file", t_legacy_storage_larger_than_file, C,
              "storage-out-of-bounds"),
    Technique("tensor_past_storage", t_tensor_past_storage, C, "tensor-out-of-bounds"),
]

# Single forbidden globals, each called with the canary command: the allowlist must refuse
# every one of them, whatever a denylist would say.
FORBIDDEN_GLOBALS: list[tuple[str, str]] = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"),
    ("subprocess", "run"), ("subprocess", "check_output"), ("builtins", "eval"),
    ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("builtins", "open"), ("builtins", "compile"), ("operator", "attrgetter"),
    ("operator", "methodcaller"), ("functools", "partial"), ("pickle", "loads"),
    ("_pickle", "loads"), ("importlib", "import_module"), ("torch", "load"),
    ("torch.serialization", "load"), ("runpy", "_run_code"), ("pty", "spawn"),
    ("shutil", "rmtree"), ("numpy.core.multiarray", "_reconstruct"), ("marshal", "loads"),
    ("pkgutil", "resolve_name"), ("webbrowser", "open"), ("torch._utils", "_rebuild_qtensor"),
    ("torch", "FloatStorage"),  # allowlisted as a storage type, never as a callable
]


def forbidden_global_file(d: Path, canary: Path, module: str, name: str) -> Path:
    data = PROTO2 + call(module, name, ustr(f"touch {canary}")) + STOP
    return write_torch_zip(d / f"global_{module}_{name}.pt", data)


def build_corpus(directory: Path, canary: Path) -> dict[str, Path]:
    """Write every technique into ``directory``; returns technique name -> file."""
    directory.mkdir(parents=True, exist_ok=True)
    return {t.name: t.build(directory, canary) for t in TECHNIQUES}
