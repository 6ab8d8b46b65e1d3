"""Damaged inputs: every mutated file yields findings, never an uncaught exception or a hang.

Mutations of real files written by the libraries: truncation at every byte (small files), byte
flips, random bytes, huge declared lengths, deep JSON nesting. A crash inside a check would show
up as LD000 (`internal-error`), so the property is: no LD000, no exception, each input < 2 s.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
BUDGET_S = 2.0


@pytest.fixture(scope="module")
def victim(scenarios: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("victim") / "llava-v1.5-victim-lora"
    shutil.copytree(scenarios["lora"], d)
    return d


def assert_survives(target: Path, base: Path) -> None:
    t0 = time.perf_counter()
    rep = run_checks([target], Options(base=base))
    took = time.perf_counter() - t0
    crashed = [f for f in rep.findings if f.code == "LD000"]
    assert not crashed, crashed[0].message
    assert took < BUDGET_S, f"{took:.2f}s"


def _mutate(path: Path, original: bytes, data: bytes, fn) -> None:
    try:
        path.write_bytes(data)
        fn()
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("fname", ["adapter_model.safetensors", "non_lora_trainables.bin",
                                   "config.json", "adapter_config.json"])
@SETTINGS
@given(data=st.data())
def test_mutated_files(victim: Path, scenarios: dict[str, Path], fname: str, data) -> None:
    path = victim / fname
    original = path.read_bytes()
    kind = data.draw(st.sampled_from(["flip", "truncate", "random", "splice"]))
    blob = bytearray(original)
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "random":
        blob = bytearray(data.draw(st.binary(min_size=0, max_size=4096)))
    else:
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    _mutate(path, original, bytes(blob), lambda: assert_survives(victim, scenarios["base-vicuna"]))


def test_every_truncation_of_configs_and_bins(victim: Path, scenarios: dict[str, Path]) -> None:
    for fname in ("config.json", "adapter_config.json", "non_lora_trainables.bin"):
        path = victim / fname
        original = path.read_bytes()
        step = max(1, len(original) // 300)
        for cut in range(0, len(original), step):
            _mutate(path, original, original[:cut],
                    lambda: assert_survives(victim, scenarios["base-vicuna"]))


@pytest.mark.parametrize("payload", [
    struct.pack("<Q", 2**63) + b"{}",                 # header length past any file
    struct.pack("<Q", 99_999_999) + b"{" + b" " * 64,  # just under the cap, file far shorter
    b"",
])
def test_huge_declared_lengths(victim: Path, scenarios: dict[str, Path], payload: bytes) -> None:
    path = victim / "adapter_model.safetensors"
    original = path.read_bytes()
    _mutate(path, original, payload, lambda: assert_survives(victim, scenarios["base-vicuna"]))


@pytest.mark.parametrize("fname", ["config.json", "adapter_config.json"])
def test_deep_json_nesting_and_wrong_types(victim: Path, scenarios: dict[str, Path],
                                           fname: str) -> None:
    path = victim / fname
    original = path.read_bytes()
    for text in ["[" * 200_000 + "]" * 200_000,
                 json.dumps({"r": "eight", "lora_alpha": [1], "target_modules": 5,
                             "hidden_size": "big", "mm_projector_type": 3}),
                 json.dumps({"a": {"b": {"c": [None] * 10}}}),
                 "null"]:
        _mutate(path, original, text.encode(),
                lambda: assert_survives(victim, scenarios["base-vicuna"]))


def test_symlink_loop_and_outside_links(victim: Path, scenarios: dict[str, Path],
                                        tmp_path: Path) -> None:
    d = tmp_path / "llava-links-lora"
    shutil.copytree(victim, d)
    (d / "loop").symlink_to(d / "loop")
    (d / "outside").symlink_to("/")
    (d / "config.json").unlink()
    (d / "config.json").symlink_to(d / "config.json")  # self-loop where a file should be
    assert_survives(d, scenarios["base-vicuna"])


# --- extreme declared numbers (every numeric field the checks read) ----------------------------

def _extreme_cases() -> list[tuple[str, str, str]]:
    from hostile_numbers import every_case

    return every_case(core_only=True)


@pytest.mark.parametrize("fname,field,token", _extreme_cases(),
                         ids=[f"{f}:{k}={v[:12]}" for f, k, v in _extreme_cases()])
def test_extreme_numbers_in_configs(victim: Path, scenarios: dict[str, Path], fname: str,
                                    field: str, token: str) -> None:
    from hostile_numbers import with_number

    path = victim / fname
    original = path.read_bytes()
    _mutate(path, original, with_number(original.decode(), field, token).encode(),
            lambda: assert_survives(victim, scenarios["base-vicuna"]))


@SETTINGS
@given(data=st.data())
def test_extreme_numbers_drawn(victim: Path, scenarios: dict[str, Path], data) -> None:
    """Every extreme value, one or several fields at once, drawn by hypothesis."""
    from hostile_numbers import EXTREMES, NUMERIC_FIELDS, with_numbers

    fname = data.draw(st.sampled_from(sorted(NUMERIC_FIELDS)))
    path = victim / fname
    original = path.read_bytes()
    fields = data.draw(st.lists(st.sampled_from(NUMERIC_FIELDS[fname]), min_size=1,
                                max_size=3, unique=True))
    text = with_numbers(original.decode(), {f: data.draw(st.sampled_from(EXTREMES))
                                            for f in fields})
    _mutate(path, original, text.encode(),
            lambda: assert_survives(victim, scenarios["base-vicuna"]))


@pytest.mark.parametrize("template", ["mlp{n}x_gelu", "mlp{n}x_res{n}x_gelu"])
@pytest.mark.parametrize("depth", ["0", "3", "257", "100000000", "9" * 5000])
def test_extreme_projector_depths(victim: Path, scenarios: dict[str, Path], template: str,
                                  depth: str) -> None:
    from hostile_numbers import with_depth

    path = victim / "config.json"
    original = path.read_bytes()
    _mutate(path, original,
            with_depth(original.decode(), "mm_projector_type", template, depth).encode(),
            lambda: assert_survives(victim, scenarios["base-vicuna"]))
