"""Value checks read with numpy, in bounded chunks, against torch as the reference.

The reference is what the checks computed before they streamed with numpy: torch tensors from
safetensors' and torch's own loaders, the torch `tensor_stats`, torch equality (LD108) and torch
norms (LD303). Both paths run on the standard fixture set and on files written here with every
dtype, legacy and zip `torch.save`, strided views and NaN/Inf on chunk edges.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import llava_doctor.artifacts.values as values
from llava_doctor.artifacts.tensor_stats import TensorStats, tensor_stats
from llava_doctor.artifacts.values import file_stats, read_array
from llava_doctor.artifacts.weights import WeightFile, read_weight_file
from llava_doctor.checks import projector as projector_checks
from llava_doctor.checks.context import Context, Options
from llava_doctor.doctor import run_checks
from llava_doctor.models import Report

VALUE_CODES = ("LD108", "LD204", "LD205", "LD303", "LD503")


# --- the torch reference -----------------------------------------------------------------------
def torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor as the real libraries load it (flattened like the torch-file reader)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    from llava_doctor.artifacts.torchfile import flatten_tree

    flat, _ = flatten_tree(obj, lambda v: isinstance(v, torch.Tensor), path=path)
    return flat


def reference_stats(wf: WeightFile, **_: object) -> dict[str, TensorStats]:
    ts = torch_tensors(wf.path)
    return {name: tensor_stats(ts[name]) for name in _numpy_order(wf)}


def _numpy_order(wf: WeightFile) -> list[str]:
    # The order the checks saw before: safetensors by data offset, torch files in pickle order.
    if wf.is_safetensors:
        return [t.name for t in sorted(wf.tensors.values(), key=lambda t: t.offset or 0)]
    return list(wf.tensors)


def reference_pairs(self: Context, a: WeightFile, name_a: str, b: WeightFile, name_b: str,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield torch_tensors(a.path)[name_a], torch_tensors(b.path)[name_b]


def reference_distance(ctx: Context, a: WeightFile, name_a: str, b: WeightFile, name_b: str,
                       ) -> tuple[float, float]:
    ft = torch_tensors(a.path)[name_a].double()
    ref = torch_tensors(b.path)[name_b].double()
    return float((ft - ref).norm()) ** 2, float(ref.norm()) ** 2


def use_torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(values, "file_stats", reference_stats)
    monkeypatch.setattr(Context, "paired_values", reference_pairs)
    monkeypatch.setattr(projector_checks, "_squared_distance", reference_distance)


def weight_files(root: Path) -> list[Path]:
    broken = ("LD501-", "LD502-", "LD504-")  # unreadable on purpose
    return sorted(p for p in root.rglob("*") if p.suffix in (".bin", ".safetensors")
                  and p.is_file() and not any(b in str(p) for b in broken))


def assert_same_values(path: Path, chunk_bytes: int | None) -> None:
    wf = read_weight_file(path)
    ref = torch_tensors(path)
    got = file_stats(wf, chunk_bytes=chunk_bytes)
    want = reference_stats(wf)
    assert list(got) == list(want), path
    for name in want:
        assert got[name] == want[name], (path, name)
        arr = read_array(wf, name, chunk_bytes=chunk_bytes)
        t = ref[name]
        expect = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        assert arr.shape == expect.shape and arr.dtype == expect.dtype, (path, name)
        np.testing.assert_array_equal(arr, expect, err_msg=f"{path}:{name}")


# --- files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [None, 64, 6])
def test_every_fixture_file_reads_like_torch(scenarios: dict[str, Path], chunk_bytes) -> None:
    files = weight_files(next(iter(scenarios.values())).parent)
    formats = {read_weight_file(p).format for p in files}
    assert formats == {"safetensors", "torch-zip"}
    for p in files:
        assert_same_values(p, chunk_bytes)


def _edge_values(n: int, dtype: torch.dtype, chunk_elems: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * 3).to(dtype)
    if dtype.is_floating_point:
        # NaN/Inf on both sides of every chunk edge, at the very start and at the very end.
        for i, v in ((0, float("nan")), (chunk_elems - 1, float("inf")),
                     (chunk_elems, -float("inf")), (2 * chunk_elems - 1, float("nan")),
                     (n - 1, -float("inf"))):
            if i < n:
                t[i] = v
    return t


def dtype_zoo(chunk_elems: int) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        t[f"nan-{dt}"] = _edge_values(5 * chunk_elems + 3, dt, chunk_elems)
        finite = (torch.randn(3, chunk_elems + 1, generator=torch.Generator().manual_seed(1))
                  * 1e4).to(dt)
        t[f"finite-{dt}"] = finite
        t[f"zero-{dt}"] = -torch.zeros(2, chunk_elems, dtype=dt)
        t[f"empty-{dt}"] = torch.zeros(0, 4, dtype=dt)
    t["big-bf16"] = torch.tensor([7.0e4, -1.0e5, 3.0], dtype=torch.bfloat16)
    t["inf-only"] = torch.tensor([float("inf"), float("nan")], dtype=torch.float16)
    t["tiny-f16"] = torch.tensor([6e-8, -5.9e-8], dtype=torch.float16)  # subnormals
    t["scalar"] = torch.tensor(-2.5, dtype=torch.float32)
    for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        t[f"int-{dt}"] = torch.arange(-7, 9, dtype=torch.int64).clamp(min=0 if dt == torch.uint8
                                                                      else -7).to(dt)
    t["int8-min"] = torch.tensor([-128, 5], dtype=torch.int8)
    t["zeros-int"] = torch.zeros(5, dtype=torch.int32)
    t["complex"] = torch.tensor([1 + 2j, float("nan"), 0], dtype=torch.complex64)
    return t


def strided_zoo() -> dict[str, torch.Tensor]:
    """Views that torch.save stores as strided tensors of a shared storage."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 40, generator=g).bfloat16()
    base[2, 7] = float("nan")
    big = torch.randn(12, 9, generator=g)
    big[5, 3] = float("inf")
    return {"base": base, "transposed": base.t(), "rows": base[1:4], "cols": base[:, 5:31:3],
            "f32-t": big.t(), "f32-step": big[::5, ::2], "f32-scalar": big[3, 4],
            "expanded": torch.tensor([1.5, float("nan")]).expand(7, 2),
            "expanded-rows": big[4:6, :3].unsqueeze(1).expand(2, 5, 3),
            "f16-view": big.half()[2:9].t()}


@pytest.mark.parametrize("chunk_bytes", [None, 64, 10])
def test_written_files_of_every_dtype_and_layout(tmp_path: Path, chunk_bytes) -> None:
    zoo = dtype_zoo(chunk_elems=32)
    save_file({k: v for k, v in zoo.items() if k != "complex"}, str(tmp_path / "zoo.safetensors"))
    torch.save(zoo, tmp_path / "zoo.bin")
    torch.save(zoo, tmp_path / "zoo-legacy.bin", _use_new_zipfile_serialization=False)
    torch.save(strided_zoo(), tmp_path / "strided.bin")
    torch.save(strided_zoo(), tmp_path / "strided-legacy.bin",
               _use_new_zipfile_serialization=False)
    assert read_weight_file(tmp_path / "zoo-legacy.bin").format == "torch-legacy"
    wf = read_weight_file(tmp_path / "strided.bin")
    assert wf.tensors["transposed"].stride == (1, 40)
    for p in sorted(tmp_path.iterdir()):
        assert_same_values(p, chunk_bytes)


def test_big_endian_zip_records_are_byte_swapped(tmp_path: Path) -> None:
    """A torch zip whose `byteorder` record says big (written on a big-endian machine): every
    storage's bytes are swapped, and torch.load swaps them back; so must we."""
    import zipfile

    from llava_doctor.artifacts.pickle_walk import ITEMSIZE

    zoo = {k: v for k, v in dtype_zoo(chunk_elems=8).items() if k != "complex"}
    torch.save({**zoo, **strided_zoo()}, tmp_path / "little.bin")
    wf = read_weight_file(tmp_path / "little.bin")
    sizes = {t.storage_key: ITEMSIZE[t.dtype] for t in wf.tensors.values()}
    big = tmp_path / "big.bin"
    with zipfile.ZipFile(tmp_path / "little.bin") as src, \
            zipfile.ZipFile(big, "w", compression=zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            parts = info.filename.split("/")
            if parts[-1] == "byteorder":
                data = b"big"
            elif len(parts) == 3 and parts[1] == "data" and sizes.get(parts[2], 1) > 1:
                n = sizes[parts[2]]
                data = np.frombuffer(data, dtype=f"<u{n}").byteswap().tobytes()
            out.writestr(info, data)
    wf = read_weight_file(big)
    assert wf.byteorder == "big"
    for chunk_bytes in (None, 64):
        assert_same_values(big, chunk_bytes)
    ref = torch_tensors(big)
    for name, t in zoo.items():  # torch.load swapped them back to the values saved
        assert torch.equal(ref[name].nan_to_num(), t.nan_to_num()), name


def test_two_reader_threads_give_the_same_results(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(values, "PARALLEL_BYTES", 0)  # every file is "large"
    zoo = dtype_zoo(chunk_elems=16)
    save_file({k: v for k, v in zoo.items() if k != "complex"}, str(tmp_path / "zoo.safetensors"))
    torch.save(zoo, tmp_path / "zoo.bin")
    torch.save(strided_zoo(), tmp_path / "strided-legacy.bin",
               _use_new_zipfile_serialization=False)
    for p in sorted(tmp_path.iterdir()):
        assert_same_values(p, 64)
        wf = read_weight_file(p)
        seen: list[int] = []
        file_stats(wf, chunk_bytes=64, progress=lambda d, t, seen=seen: seen.append(d))
        assert seen == sorted(seen) and seen[-1] == sum(
            t.nbytes for t in wf.tensors.values() if values.numpy_readable(t.dtype))


def test_an_expanded_tensor_is_read_once_not_once_per_repeat(tmp_path: Path) -> None:
    # 2**40 elements that are one stored value and one NaN (a hostile or odd file): the stats
    # come from the two stored values, the NaN counted once per repeat.
    t = torch.tensor([[-3.0], [float("nan")]]).expand(2, 2**39)
    torch.save({"t": t}, tmp_path / "x.bin")
    wf = read_weight_file(tmp_path / "x.bin")
    assert wf.tensors["t"].stride == (1, 0)
    s = file_stats(wf)["t"]
    assert (s.numel, s.nonfinite, s.max_abs, s.all_zero) == (2**40, 2**39, 3.0, False)


def test_chunks_stay_bounded(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(1000, 33).bfloat16(), "b": torch.randn(5000)}, str(p))
    wf = read_weight_file(p)
    with values.ValueReader(wf, chunk_bytes=1000) as r:
        sizes = [a.nbytes for a in r.raw_chunks(wf.tensors["a"])]
        assert max(sizes) <= 1000 and sum(sizes) == wf.tensors["a"].nbytes
    torch.save({"t": torch.randn(300, 200).t()}, tmp_path / "s.bin")
    wf = read_weight_file(tmp_path / "s.bin")
    with values.ValueReader(wf, chunk_bytes=4000) as r:
        sizes = [a.nbytes for a in r.raw_chunks(wf.tensors["t"])]
        assert max(sizes) <= 4000 and sum(sizes) == 300 * 200 * 4


def test_progress_counts_every_byte(scenarios: dict[str, Path]) -> None:
    wf = read_weight_file(scenarios["lora"] / "adapter_model.safetensors")
    seen: list[tuple[int, int]] = []
    file_stats(wf, chunk_bytes=512, progress=lambda d, t: seen.append((d, t)))
    assert len(seen) > 10 and seen[-1] == (wf.total_bytes, wf.total_bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# --- whole check runs: numpy path == torch path --------------------------------------------------
def _nan_run(scenarios: dict[str, Path], root: Path) -> Path:
    """A LoRA whose bf16 adapter holds NaN/Inf on 64-byte chunk edges and whose projector
    (now a legacy-format .bin) starts with a NaN."""
    d = shutil.copytree(scenarios["lora"], root / "llava-v1.5-tiny-lora")
    ad = load_file(str(d / "adapter_model.safetensors"))
    key = sorted(k for k in ad if "lora_B" in k)[0]
    flat = ad[key].view(-1)
    for i, v in ((31, float("nan")), (32, float("inf")), (flat.numel() - 1, -float("inf"))):
        flat[i] = v
    save_file(ad, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    nl = torch.load(d / "non_lora_trainables.bin", weights_only=True)
    k = sorted(nl)[0]
    nl[k].view(-1)[0] = float("nan")
    torch.save(nl, d / "non_lora_trainables.bin", _use_new_zipfile_serialization=False)
    return d


def _comparable(rep: Report) -> list[tuple]:
    out = [(f.code, f.severity, f.path, f.message, json.dumps(f.evidence, sort_keys=True))
           for f in rep.findings]
    out += [(t.path, o.code, o.status, o.reason) for t in rep.targets for o in t.checks]
    return out


@pytest.mark.parametrize("chunk_bytes", [None, 64])
def test_check_reports_equal_the_torch_path(scenarios: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, chunk_bytes) -> None:
    if chunk_bytes is not None:
        monkeypatch.setattr(values, "CHUNK_BYTES", chunk_bytes)
    pre = scenarios["pretrain"] / "mm_projector.bin"
    runs = [(scenarios[n], Options(projector=pre)) for n in (
        "lora", "lora-bin", "lora-untrained", "lora-dora-rslora", "lora-ddp-keys",
        "LD105-zero3-shapes", "LD108-bin-and-safetensors", "LD503-fp16-overflow")]
    runs.append((scenarios["task-lora"], Options(scan_base=True)))
    runs.append((scenarios["lora-qlora"],
                 Options(projector=scenarios["pretrain-linear"] / "mm_projector.bin")))
    runs.append((_nan_run(scenarios, tmp_path), Options(projector=pre)))
    got = [run_checks([p], o, select=list(VALUE_CODES)) for p, o in runs]
    with monkeypatch.context() as m:
        use_torch_reference(m)
        want = [run_checks([p], o, select=list(VALUE_CODES)) for p, o in runs]
    for (p, _), g, w in zip(runs, got, want, strict=True):
        assert _comparable(g) == _comparable(w), p
    # The comparison is not vacuous: every value check found something somewhere.
    fired = {f.code for r in got for f in r.findings}
    assert fired == set(VALUE_CODES)
    nan = got[-1].findings
    assert [(f.code, Path(f.path).name) for f in nan if f.code == "LD205"] == [
        ("LD205", "adapter_model.safetensors"), ("LD205", "non_lora_trainables.bin")]


# --- no torch on the check path -------------------------------------------------------------------
NO_TORCH = r"""
import json, sys
import llava_doctor.cli
assert "torch" not in sys.modules, "import llava_doctor.cli imported torch"
from llava_doctor.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": sorted(m for m in sys.modules
                                                 if m == "torch" or m.startswith("torch."))}),
      file=sys.stderr)
"""


@pytest.mark.parametrize("name,extra", [
    ("lora", ["--projector", "{pretrain}/mm_projector.bin"]),
    ("lora-bin", []),
    ("LD108-bin-and-safetensors", []),
    ("LD503-fp16-overflow", ["--projector", "{pretrain}/mm_projector.bin"]),
    ("task-lora", ["--scan-base"]),
])
def test_default_check_never_imports_torch(scenarios: dict[str, Path], name: str,
                                           extra: list[str]) -> None:
    args = [a.format(pretrain=scenarios["pretrain"]) for a in extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "check", str(scenarios[name]),
                           "--format", "json", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    assert status["torch"] == [], proc.stderr
    assert status["code"] in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    ran = {c["code"]: c["status"] for t in report["targets"] for c in t["checks"]}
    # the value checks really read values (none skipped for lack of them)
    assert ran["LD205"] in ("passed", "failed") and ran["LD503"] in ("passed", "failed")
    assert ran["LD204"] in ("passed", "failed")
    if name in ("lora", "task-lora", "LD503-fp16-overflow"):
        assert ran["LD303"] in ("passed", "failed"), ran["LD303"]
    if name == "LD108-bin-and-safetensors":
        assert ran["LD108"] == "failed"
