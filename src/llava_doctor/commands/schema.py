"""The `schema` command: the JSON Schema of `check --format json`, from the pydantic models."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) a `--format json` report validates against.

    Generated in serialization mode so that computed fields (`counts`) are part of it. Any
    change here is a change of the JSON contract: bump `models.SCHEMA_VERSION` when it breaks
    consumers.
    """
    from llava_doctor.models import SCHEMA_VERSION, Report

    schema = Report.model_json_schema(mode="serialization")
    # The JSON renderer writes every field, so a consumer may rely on each one being there.
    for obj in [schema, *schema.get("$defs", {}).values()]:
        if obj.get("type") == "object" and "properties" in obj:
            obj["required"] = sorted(obj["properties"])
    # The package version is not part of the contract: a release must not change the schema.
    schema["properties"]["tool_version"].pop("default", None)
    return {"$schema": SCHEMA_DIALECT,
            "$comment": f"llava-doctor JSON report, schema_version {SCHEMA_VERSION}",
            **schema}


def render_schema() -> str:
    """`report_schema()` as stable JSON text (sorted keys, two-space indent, final newline)."""
    return json.dumps(report_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def register(app: typer.Typer) -> None:
    """Add `llava-doctor schema` to the app."""

    @app.command("schema")
    def schema() -> None:
        """Print the JSON Schema of the JSON report (`check --format json`)."""
        sys.stdout.write(render_schema())
        raise typer.Exit(0)
