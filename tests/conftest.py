"""Shared fixtures: the standard scenario set is built once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`llava_doctor.fixtures.build_all` written once into a session temp dir."""
    from llava_doctor.fixtures import build_all

    return build_all(tmp_path_factory.mktemp("scenarios"))

