"""Hostile torch files: every technique is refused, nothing runs, and it is refused fast."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from malicious_pickles import (
    FORBIDDEN_GLOBALS,
    TECHNIQUES,
    Technique,
    build_corpus,
    forbidden_global_file,
)

from llava_doctor.artifacts.torchfile import load_torch_tensors, read_torch_file
from llava_doctor.errors import FileCorruptError, UnsafePickleError

SRC = Path(__file__).resolve().parents[1] / "src"
TIME_LIMIT_S = 2.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("malicious")
    canary = root / "CANARY"
    return build_corpus(root / "files", canary), canary


def _detail(err: Exception) -> str:
    if isinstance(err, UnsafePickleError):
        return err.global_name
    assert isinstance(err, FileCorruptError)
    return err.rule


def test_corpus_has_enough_techniques() -> None:
    assert len(TECHNIQUES) >= 12
    assert len({t.name for t in TECHNIQUES}) == len(TECHNIQUES)


@pytest.mark.parametrize("technique", TECHNIQUES, ids=lambda t: t.name)
def test_technique_is_refused(corpus: tuple[dict[str, Path], Path], technique: Technique) -> None:
    files, canary = corpus
    start = time.perf_counter()
    with pytest.raises((UnsafePickleError, FileCorruptError)) as err:
        read_torch_file(files[technique.name])
    elapsed = time.perf_counter() - start
    assert type(err.value) is technique.error, str(err.value)
    assert _detail(err.value) == technique.detail, str(err.value)
    assert "\n" not in str(err.value)
    assert str(files[technique.name]) in str(err.value)
    assert elapsed < TIME_LIMIT_S, f"{technique.name} took {elapsed:.2f}s"
    assert not canary.exists()


@pytest.mark.parametrize("technique", TECHNIQUES, ids=lambda t: t.name)
def test_load_refuses_before_torch_load(corpus: tuple[dict[str, Path], Path],
                                        technique: Technique,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    files, canary = corpus

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was reached for a hostile file")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(technique.error):
        load_torch_tensors(files[technique.name])
    assert not canary.exists()


@pytest.mark.parametrize(("module", "name"), FORBIDDEN_GLOBALS,
                         ids=[f"{m}.{n}" for m, n in FORBIDDEN_GLOBALS])
def test_forbidden_global(tmp_path: Path, module: str, name: str) -> None:
    canary = tmp_path / "CANARY"
    path = forbidden_global_file(tmp_path, canary, module, name)
    with pytest.raises(UnsafePickleError) as err:
        read_torch_file(path)
    assert err.value.global_name == f"{module}.{name}"
    assert not canary.exists()


def test_message_text(corpus: tuple[dict[str, Path], Path]) -> None:
    files, _ = corpus
    path = files["global_posix_system"]
    with pytest.raises(UnsafePickleError) as err:
        read_torch_file(path)
    assert str(err.value) == (f"{path}: pickle 'archive/data.pkl' references forbidden global "
                              "'posix.system' (at byte 2); nothing was executed")
    assert err.value.one_line().endswith("preferably as .safetensors")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_hostile_walks_stay_small(corpus: tuple[dict[str, Path], Path]) -> None:
    # Peak resident memory (VmHWM: per process image, unlike ru_maxrss which a child inherits
    # from a large parent) of a fresh interpreter walking every resource-exhaustion file.
    files, _ = corpus
    heavy = [files[n] for n in ("too_many_opcodes", "billion_laughs", "deep_marks",
                                "deep_tuples", "deep_lists_outer_first", "zip_bomb_compressed",
                                "zip_bomb_declared_size", "storage_larger_than_file",
                                "legacy_storage_larger_than_file")]
    code = (
        "import sys\n"
        "from llava_doctor.artifacts.torchfile import read_torch_file\n"
        "from llava_doctor.errors import DoctorError\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        read_torch_file(p)\n"
        "    except DoctorError:\n"
        "        pass\n"
        "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "print(status.split()[0])\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *map(str, heavy)], capture_output=True,
                            text=True, env={"PYTHONPATH": str(SRC)}, timeout=120)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.strip())
    assert peak_kib < 500 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
