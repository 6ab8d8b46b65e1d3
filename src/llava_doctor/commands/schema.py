"""The `schema` command (thin typer layer over the library)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the command to the app (not implemented yet)."""
