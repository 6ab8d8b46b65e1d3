"""Importing this module registers every check (one module per concern)."""

from llava_doctor.checks import (  # noqa: F401
    adapter,
    base_model,
    environment,
    files,
    hf,
    internal,
    layout,
    preflight,
    projector,
    to_hf,
)
