"""The `schema` command: the JSON Schemas of `check --format json` and `env --format json`, from
the pydantic models."""

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
    from llava_doctor.models import Report

    return _schema(Report, "JSON report")


def env_schema() -> dict[str, Any]:
    """The JSON Schema of `llava-doctor env --format json` (same rules as `report_schema`)."""
    from llava_doctor.models import EnvReport

    return _schema(EnvReport, "env report")


def _schema(model: Any, what: str) -> dict[str, Any]:
    from llava_doctor.models import SCHEMA_VERSION

    schema = model.model_json_schema(mode="serialization")
    # The JSON renderer writes every field, so a consumer may rely on each one being there.
    for obj in [schema, *schema.get("$defs", {}).values()]:
        if obj.get("type") == "object" and "properties" in obj:
            obj["required"] = sorted(obj["properties"])
    # The package version is not part of the contract: a release must not change the schema.
    schema["properties"]["tool_version"].pop("default", None)
    return {"$schema": SCHEMA_DIALECT,
            "$comment": f"llava-doctor {what}, schema_version {SCHEMA_VERSION}",
            **schema}


SCHEMAS = {"report": report_schema, "env": env_schema}


def render_schema(which: str = "report") -> str:
    """A schema as stable JSON text (sorted keys, two-space indent, final newline)."""
    return json.dumps(SCHEMAS[which](), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def register(app: typer.Typer) -> None:
    """Add `llava-doctor schema` to the app."""

    @app.command("schema")
    def schema(which: str = typer.Argument(
            "report", metavar="[report|env]",
            help="report: `check --format json`; env: `env --format json`.")) -> None:
        """Print the JSON Schema of the JSON report (`check --format json`) or of `env`."""
        if which not in SCHEMAS:
            print(f"llava-doctor: error: unknown schema '{which}'; choose report or env",
                  file=sys.stderr)
            raise typer.Exit(2)
        sys.stdout.write(render_schema(which))
        raise typer.Exit(0)
