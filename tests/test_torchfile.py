"""read_torch_file / load_torch_tensors on real torch.save files, zip and legacy."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from llava_doctor.artifacts.tensors import TORCH_TO_ST
from llava_doctor.artifacts.torchfile import TorchFile, load_torch_tensors, read_torch_file
from llava_doctor.errors import FileCorruptError, UnsafePickleError

FORMATS = ["zip", "legacy"]
SRC = Path(__file__).resolve().parents[1] / "src"


def save(obj: object, path: Path, fmt: str, **kwargs: object) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip", **kwargs)
    return path


def sample_state() -> OrderedDict:
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32)
    sd: OrderedDict = OrderedDict()
    sd["f32"] = torch.randn(3, 4)
    sd["f16"] = torch.randn(5, dtype=torch.float16)
    sd["bf16"] = torch.randn(2, 3, dtype=torch.bfloat16)
    sd["i64"] = torch.arange(7)
    sd["bool"] = torch.tensor([True, False, True])
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0)  # what ZeRO-3 leaves behind for partitioned parameters
    sd["view_a"] = base.view(4, 6)
    sd["view_t"] = base.view(4, 6).t()
    sd["view_slice"] = base[5:11]
    sd["view_strided"] = base[1::3]
    sd["param"] = nn.Parameter(torch.ones(2, 2))
    sd["nested"] = {"inner": {"x": torch.ones(1, dtype=torch.float16)}, "n": 3}
    sd["step"] = 10
    sd["name"] = "llava"
    return sd


EXPECTED_NAMES = ["f32", "f16", "bf16", "i64", "bool", "scalar", "empty", "view_a", "view_t",
                  "view_slice", "view_strided", "param", "nested.inner.x"]


def torch_flat(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Independent reference flattening of torch.load output (dicts only)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(torch_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def assert_matches_torch(tf: TorchFile, path: Path) -> None:
    # Our own files, so the full unpickler is fine here and accepts every protocol.
    loaded = torch_flat(torch.load(path, map_location="cpu", weights_only=False))
    assert list(tf.tensors) == list(loaded)
    for name, t in loaded.items():
        info = tf.tensors[name]
        assert info.name == name
        assert info.dtype == TORCH_TO_ST[str(t.dtype).removeprefix("torch.")]
        assert info.shape == tuple(t.shape)
        assert info.stride == t.stride()
        assert info.nbytes == t.numel() * t.element_size()
        assert info.offset == t.storage_offset() * t.element_size()


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_names_dtypes_shapes(tmp_path: Path, fmt: str) -> None:
    path = save(sample_state(), tmp_path / f"model.{fmt}.bin", fmt)
    tf = read_torch_file(path)
    assert tf.format == fmt
    assert tf.path == path
    assert list(tf.tensors) == EXPECTED_NAMES
    assert tf.other == {"nested.n": "int", "step": "int", "name": "str"}
    assert_matches_torch(tf, path)
    if fmt == "zip":
        assert tf.archive_name == f"model.{fmt}"
    else:
        assert tf.archive_name is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_storage_and_views(tmp_path: Path, fmt: str) -> None:
    tf = read_torch_file(save(sample_state(), tmp_path / "m.bin", fmt))
    keys = {tf.tensors[n].storage_key for n in ("view_a", "view_t", "view_slice", "view_strided")}
    assert len(keys) == 1
    assert tf.tensors["view_slice"].offset == 5 * 4
    assert tf.tensors["view_strided"].stride == (3,)
    assert tf.tensors["view_t"].stride == (1, 6)
    assert tf.tensors["scalar"].shape == () and tf.tensors["scalar"].nbytes == 4
    assert tf.tensors["empty"].shape == (0,) and tf.tensors["empty"].nbytes == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_values_equal_torch_load(tmp_path: Path, fmt: str) -> None:
    path = save(sample_state(), tmp_path / "m.bin", fmt)
    values = load_torch_tensors(path)
    reference = torch_flat(torch.load(path, weights_only=True))
    assert list(values) == list(reference)
    for name, t in reference.items():
        assert values[name].dtype == t.dtype
        assert torch.equal(values[name], t), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_selected_names(tmp_path: Path, fmt: str) -> None:
    path = save(sample_state(), tmp_path / "m.bin", fmt)
    values = load_torch_tensors(path, ["nested.inner.x", "bf16", "bf16"])
    assert list(values) == ["nested.inner.x", "bf16"]
    assert torch.equal(values["nested.inner.x"], torch.ones(1, dtype=torch.float16))
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        load_torch_tensors(path, ["nope"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_with_metadata(tmp_path: Path, fmt: str) -> None:
    # state_dict() OrderedDicts carry `_metadata`, pickled with BUILD.
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2), nn.BatchNorm1d(2))
    sd = model.state_dict()
    path = save(sd, tmp_path / "sd.bin", fmt)
    tf = read_torch_file(path)
    assert list(tf.tensors) == list(sd)
    assert tf.tensors["2.num_batches_tracked"].dtype == "I64"
    assert_matches_torch(tf, path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("protocol", [1, 3, 4, 5])
def test_other_pickle_protocols(tmp_path: Path, fmt: str, protocol: int) -> None:
    path = save(sample_state(), tmp_path / "p.bin", fmt, pickle_protocol=protocol)
    tf = read_torch_file(path)
    assert list(tf.tensors) == EXPECTED_NAMES
    assert_matches_torch(tf, path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_protocol_0_is_unloadable(tmp_path: Path, fmt: str) -> None:
    # Protocol 0 writes the persistent id as str(tuple); torch.load cannot read it either.
    path = save({"a": torch.ones(2)}, tmp_path / "p0.bin", fmt, pickle_protocol=0)
    with pytest.raises(FileCorruptError) as err:
        read_torch_file(path)
    assert err.value.rule == "bad-persistent-id"


def test_dtypes_without_legacy_storage_class(tmp_path: Path) -> None:
    # float8 and uint16 are written with _rebuild_tensor_v3 over an UntypedStorage.
    sd = {"f8": torch.zeros(3, dtype=torch.float8_e4m3fn),
          "u16": torch.zeros(4, dtype=torch.uint16),
          "c128": torch.zeros(2, dtype=torch.complex128)}
    tf = read_torch_file(save(sd, tmp_path / "v3.pt", "zip"))
    assert {n: (i.dtype, i.shape, i.nbytes) for n, i in tf.tensors.items()} == {
        "f8": ("F8_E4M3", (3,), 3), "u16": ("U16", (4,), 8), "c128": ("complex128", (2,), 32)}
    assert tf.tensors["c128"].torch_dtype_name == "complex128"
    assert tf.tensors["f8"].torch_dtype_name == "float8_e4m3fn"


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_and_parameter_with_python_attributes(tmp_path: Path, fmt: str) -> None:
    t = torch.ones(3)
    t.note = "x"  # pickled via torch._tensor._rebuild_from_type_v2
    p = nn.Parameter(torch.zeros(2))
    p.note = "y"  # pickled via _rebuild_parameter_with_state
    path = save({"t": t, "p": p}, tmp_path / "attrs.pt", fmt)
    tf = read_torch_file(path)
    assert list(tf.tensors) == ["t", "p"]
    assert_matches_torch(tf, path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_top_level_bare_tensor_and_list(tmp_path: Path, fmt: str) -> None:
    tf = read_torch_file(save(torch.ones(2, 2), tmp_path / "bare.pt", fmt))
    assert list(tf.tensors) == [""] and tf.other == {}
    tf = read_torch_file(save([torch.ones(1), torch.zeros(2), 7], tmp_path / "list.pt", fmt))
    assert list(tf.tensors) == ["0", "1"] and tf.other == {"2": "int"}
    values = load_torch_tensors(tmp_path / "list.pt")
    assert torch.equal(values["1"], torch.zeros(2))


def test_naming_rules(tmp_path: Path) -> None:
    obj = {
        "layers": [torch.ones(1), {"w": torch.ones(2)}],
        "shape": [1, 2, 3],
        "size": torch.Size([4, 5]),
        "state": {0: {"exp_avg": torch.zeros(1)}},
        "empty": {},
        "none": None,
        "blob": b"abc",
    }
    tf = read_torch_file(save(obj, tmp_path / "names.pt", "zip"))
    assert list(tf.tensors) == ["layers.0", "layers.1.w", "state.0.exp_avg"]
    assert tf.other == {"shape": "list[3]", "size": "tuple[2]", "empty": "dict[0]",
                        "none": "None", "blob": "bytes[3]"}
    assert list(load_torch_tensors(tmp_path / "names.pt")) == list(tf.tensors)


def test_empty_top_level_dict(tmp_path: Path) -> None:
    tf = read_torch_file(save({}, tmp_path / "e.pt", "zip"))
    assert tf.tensors == {} and tf.other == {}


def test_duplicate_flattened_name(tmp_path: Path) -> None:
    path = save({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, tmp_path / "dup.pt", "zip")
    with pytest.raises(FileCorruptError) as err:
        read_torch_file(path)
    assert err.value.rule == "duplicate-name"
    assert err.value.tensor == "a.b"


def test_tensor_data_that_starts_like_a_pickle(tmp_path: Path) -> None:
    # Storage bytes and bytes values may begin with \x80\x02 without being pickles.
    data = torch.tensor([0x80, 0x02, 0xFF, 0x00], dtype=torch.uint8)
    path = save({"u8": data, "blob": b"\x80\x02not a pickle"}, tmp_path / "u8.pt", "zip")
    tf = read_torch_file(path)
    assert list(tf.tensors) == ["u8"]
    assert torch.equal(load_torch_tensors(path)["u8"], data)


def test_read_does_not_import_torch(tmp_path: Path) -> None:
    path = save(sample_state(), tmp_path / "m.bin", "zip")
    legacy = save(sample_state(), tmp_path / "l.bin", "legacy")
    code = (
        "import sys\n"
        "from llava_doctor.artifacts.torchfile import read_torch_file\n"
        f"assert len(read_torch_file({str(path)!r}).tensors) == 13\n"
        f"assert len(read_torch_file({str(legacy)!r}).tensors) == 13\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(SRC)}, timeout=60)
    assert result.returncode == 0, result.stderr


def test_walk_imports_nothing(tmp_path: Path) -> None:
    path = save(sample_state(), tmp_path / "m.bin", "zip")
    legacy = save(sample_state(), tmp_path / "l.bin", "legacy")
    read_torch_file(path)  # warm up lazily imported stdlib parts
    before = set(sys.modules)
    read_torch_file(path)
    read_torch_file(legacy)
    assert set(sys.modules) == before


# ------------------------------------------------------------------ structural damage
def _rewrite_member(path: Path, member_suffix: str, data: bytes) -> None:
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, data if name.endswith(member_suffix) else raw)


def test_storage_record_shorter_than_declared(tmp_path: Path) -> None:
    path = save({"w": torch.ones(8)}, tmp_path / "short.pt", "zip")
    _rewrite_member(path, "/data/0", bytes(12))
    with pytest.raises(FileCorruptError) as err:
        read_torch_file(path)
    assert err.value.rule == "storage-out-of-bounds"
    assert str(err.value) == (f"{path}: storage '0' declares 32 bytes but its record holds 12")


def test_storage_record_missing(tmp_path: Path) -> None:
    path = save({"w": torch.ones(8)}, tmp_path / "missing.pt", "zip")
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()
                   if not i.filename.endswith("/data/0")}
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    with pytest.raises(FileCorruptError) as err:
        read_torch_file(path)
    assert err.value.rule == "storage-missing"


def test_legacy_storage_count_mismatch(tmp_path: Path) -> None:
    path = save({"w": torch.ones(4)}, tmp_path / "count.bin", "legacy")
    raw = bytearray(path.read_bytes())
    start = len(raw) - 16 - 8
    assert struct.unpack_from("<q", raw, start)[0] == 4
    struct.pack_into("<q", raw, start, 3)
    path.write_bytes(bytes(raw))
    with pytest.raises(FileCorruptError) as err:
        read_torch_file(path)
    assert err.value.rule == "storage-size-mismatch"


@pytest.mark.parametrize(("content", "rule"), [
    (b"", "truncated"),
    (b"hello, not a checkpoint\n", "not-a-torch-file"),
    (b"PK\x03\x04" + bytes(40), "bad-zip"),
])
def test_not_a_torch_file(tmp_path: Path, content: bytes, rule: str) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(content)
    with pytest.raises(FileCorruptError) as err:
        read_torch_file(path)
    assert err.value.rule == rule


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("folder/readme.txt", "hi")
    with pytest.raises(FileCorruptError) as err:
        read_torch_file(path)
    assert err.value.rule == "missing-data-pkl"


def _small_file(tmp_path: Path, fmt: str) -> bytes:
    obj = {"a": torch.arange(3, dtype=torch.int16), "b": {"c": torch.ones(2, dtype=torch.bfloat16)}}
    return save(obj, tmp_path / f"small.{fmt}", fmt).read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_truncation_point(tmp_path: Path, fmt: str) -> None:
    data = _small_file(tmp_path, fmt)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data)
    for n in reversed(range(len(data))):
        os.truncate(cut, n)  # cheaper than rewriting the prefix each time
        try:
            read_torch_file(cut)
        except (FileCorruptError, UnsafePickleError):
            continue
        # A zip keeps its central directory at the end and a legacy file its records: no
        # proper prefix of either is a complete file.
        pytest.fail(f"prefix of {n}/{len(data)} bytes was accepted")


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_byte_damage(tmp_path: Path, fmt: str) -> None:
    data = _small_file(tmp_path, fmt)
    rng = random.Random(1234)
    bad = tmp_path / "bad.bin"
    for _ in range(400):
        raw = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        bad.write_bytes(bytes(raw))
        try:
            read_torch_file(bad)
        except (FileCorruptError, UnsafePickleError):
            pass


def test_random_damage_inside_data_pkl(tmp_path: Path) -> None:
    # Flipping bytes of the whole zip mostly trips CRCs; this reaches the pickle walker.
    src = save({"a": torch.arange(3, dtype=torch.int16), "p": nn.Parameter(torch.ones(2)),
                "n": {"x": [1, 2.5, "s", None, True]}}, tmp_path / "src.pt", "zip")
    with zipfile.ZipFile(src) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    rng = random.Random(99)
    bad = tmp_path / "bad.pt"
    for _ in range(400):
        raw = bytearray(members[pkl])
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(raw))
            action = rng.randrange(3)
            if action == 0:
                raw[i] = rng.randrange(256)
            elif action == 1:
                del raw[i]
            else:
                raw.insert(i, rng.randrange(256))
        with zipfile.ZipFile(bad, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, bytes(raw) if name == pkl else data)
        try:
            read_torch_file(bad)
        except (FileCorruptError, UnsafePickleError):
            pass


def test_legacy_storage_view(tmp_path: Path) -> None:
    # Pre-1.0 torch wrote storage views as a sixth persistent-id item (view_key, offset, size);
    # the tensor's byte offset is then the view's start plus its own offset.
    import malicious_pickles as mp

    view = mp.MARK + mp.ustr("v") + mp.num(2) + mp.num(4) + mp.TUPLE
    main = mp.state_dict(("w", mp.tensor_v2("1", 8, (3,), (1,), extra_pid=view)))
    main = main.replace(mp.BINPERSID + mp.num(0), mp.BINPERSID + mp.num(1))  # offset 1
    path = mp.legacy_file(tmp_path / "view.bin", main, keys=["1"],
                          records=struct.pack("<q", 8) + struct.pack("<8f", *range(8)))
    info = read_torch_file(path).tensors["w"]
    assert (info.storage_key, info.offset, info.nbytes) == ("1", 12, 12)
    assert torch.equal(load_torch_tensors(path)["w"], torch.tensor([3.0, 4.0, 5.0]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_pickle_size_cap(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from llava_doctor.artifacts import pickle_walk, torchfile

    path = save({"s": "x" * 5000, "w": torch.ones(2)}, tmp_path / "big.bin", fmt)
    monkeypatch.setattr(pickle_walk, "MAX_PICKLE_BYTES", 1000)
    monkeypatch.setattr(torchfile, "MAX_PICKLE_BYTES", 1000)
    with pytest.raises(FileCorruptError) as err:
        read_torch_file(path)
    assert err.value.rule == "pickle-too-large"


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_sub_dict_is_named_on_every_path(tmp_path: Path, fmt: str) -> None:
    shared = {"w": torch.ones(2)}
    path = save({"a": shared, "b": shared}, tmp_path / "shared.pt", fmt)
    tf = read_torch_file(path)
    assert list(tf.tensors) == ["a.w", "b.w"]
    assert tf.tensors["a.w"].storage_key == tf.tensors["b.w"].storage_key
    assert list(load_torch_tensors(path)) == ["a.w", "b.w"]
