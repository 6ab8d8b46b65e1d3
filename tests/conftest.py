"""Shared fixtures: the standard scenario set is built once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`llava_doctor.fixtures.build_all` written once into a session temp dir."""
    from llava_doctor.fixtures import build_all

    return build_all(tmp_path_factory.mktemp("scenarios"))



# --- llava-hf worlds (tests/hf_support.py): built once, only when a test asks ------------------

@pytest.fixture(scope="session")
def hf_proc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Processor + tokenizer files written by transformers 4.46.3 ({} without that venv)."""
    from hf_support import build_processors, hf446_python

    py = hf446_python()
    return build_processors(py, tmp_path_factory.mktemp("hf-proc")) if py else {}


@pytest.fixture(scope="session")
def hf5(tmp_path_factory: pytest.TempPathFactory, hf_proc: dict[str, Path]):  # noqa: ANN201
    """Bases and adapters written by this venv's transformers 5.x + peft."""
    from hf_support import build_world, installed_transformers, python_here

    return build_world(python_here(), installed_transformers(),
                       tmp_path_factory.mktemp("hf5"), hf_proc)


@pytest.fixture(scope="session")
def hf4(tmp_path_factory: pytest.TempPathFactory, hf_proc: dict[str, Path]):  # noqa: ANN201
    """Bases and adapters written by transformers 4.46.3 + peft 0.13.2 (skips without them)."""
    from hf_support import build_world, hf446_version, need_hf446

    return build_world(need_hf446(), hf446_version(), tmp_path_factory.mktemp("hf4"), hf_proc)


@pytest.fixture(scope="session")
def hf457(tmp_path_factory: pytest.TempPathFactory, hf_proc: dict[str, Path]):  # noqa: ANN201
    """Bases and adapters written by transformers 4.57.6 + peft 0.17.1 (skips without them)."""
    from hf_support import build_world, hf457_version, need_hf457

    return build_world(need_hf457(), hf457_version(), tmp_path_factory.mktemp("hf457"),
                       hf_proc)


@pytest.fixture()
def needs_processors() -> None:
    """For tests whose runs must carry processor/tokenizer files: those are written by
    transformers 4.46.3 (this venv's 5.x image processors need PIL and torchvision), so without
    that venv the test skips (and fails under CI=true, as every 4.46 test does)."""
    from hf_support import need_hf446

    need_hf446()
