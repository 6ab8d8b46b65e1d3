"""SARIF 2.1.0 for GitHub code scanning, built with the `sarif-pydantic` models.

GitHub's requirements (peers §6): `tool.driver.rules` with id, shortDescription, fullDescription
and help; results with `message.text`, one location with a repository-relative
`artifactLocation.uri` and a region, and `partialFingerprints` so that the same problem keeps the
same alert from run to run. Weight files have no lines: a finding points at line 1 of its file,
or at the line of the JSON key it is about when the caller found it (`lines=`, see `locate.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any
from urllib.parse import quote

from llava_doctor.models import Consumer, Finding, Report, Severity
from llava_doctor.report.locate import Lines, Span, relative_to_root, span_of

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
FINGERPRINT_KEY = "llavaDoctor/v1"
# Evidence that says *which* thing is wrong (stable across runs), as opposed to measurements
# (counts, sizes, lists of examples) that may change while the problem stays the same.
STABLE_EVIDENCE = ("key", "field", "tensor", "module", "global", "rule", "check", "kind")
MAX_DESCRIPTION = 1024  # GitHub's limit for short/full descriptions

_LEVEL = {Severity.error: "error", Severity.warning: "warning", Severity.info: "note"}
_PROBLEM = {Severity.error: "error", Severity.warning: "warning",
            Severity.info: "recommendation"}


def _clip(text: str, limit: int = MAX_DESCRIPTION) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _uri(p: str, root: str | os.PathLike[str] | None) -> str:
    rel = relative_to_root(p, root)
    if rel is not None:
        return quote(rel)
    # Outside --root: an absolute file URI still locates it for a human reading the log.
    from pathlib import Path

    return Path(os.path.abspath(p)).as_uri()


def _stable(value: Any, root: str | os.PathLike[str] | None) -> Any:
    if isinstance(value, str) and os.path.isabs(value):
        rel = relative_to_root(value, root)
        return rel if rel is not None else value
    return value


def fingerprint(f: Finding, root: str | os.PathLike[str] | None = None) -> str:
    """Hash of the code, the path relative to `root` and the identifying evidence.

    Not the message: wording changes between versions must not re-open alerts.
    """
    path = f.path if f.path is not None else f.target
    rel = relative_to_root(path, root) or os.path.abspath(path)
    ev = {k: _stable(f.evidence[k], root) for k in STABLE_EVIDENCE if k in f.evidence}
    blob = "\0".join([f.code, rel, json.dumps(ev, sort_keys=True, default=str)])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _rules(consumer: Consumer | None = Consumer.llava) -> tuple[list[Any], dict[str, int]]:
    from sarif_pydantic import Message, ReportingConfiguration, ReportingDescriptor

    from llava_doctor.checks.base import all_checks

    rules = []
    index: dict[str, int] = {}
    for i, (code, spec) in enumerate(all_checks().items()):
        what = spec.section("What it does")
        # The default level is the one for this report's consumer (llava when targets differ).
        sev = spec.severity_for(consumer or Consumer.llava)
        rules.append(ReportingDescriptor(
            id=code,
            name=spec.name,
            short_description=Message(text=_clip(spec.summary)),
            full_description=Message(text=_clip(f"{spec.summary} {what}" if what
                                                else spec.summary)),
            help=Message(text=spec.doc + f"\n\nMore: llava-doctor explain {code}",
                         markdown=f"# {code} {spec.name}\n\n{spec.doc}\n\n"
                                  f"More: `llava-doctor explain {code}`"),
            default_configuration=ReportingConfiguration(level=_LEVEL[sev]),
            properties={"problem.severity": _PROBLEM[sev], "fix": spec.fix.value,
                        "tags": ["llava", "lora"],
                        "severityByConsumer": {c.value: spec.severity_for(c).value
                                               for c in Consumer}},
        ))
        index[code] = i
    return rules, index


def build_sarif(report: Report, *, root: str | os.PathLike[str] | None = None,
                lines: Lines | None = None) -> dict[str, Any]:
    """The SARIF log as a JSON-ready dict (one run, every registered check as a rule)."""
    from sarif_pydantic import (
        ArtifactLocation,
        Location,
        Message,
        PhysicalLocation,
        Region,
        Result,
        Run,
        Sarif,
        Tool,
        ToolDriver,
    )

    rules, index = _rules(report.consumer)
    results = []
    seen: dict[str, int] = {}
    for f in report.findings:
        path = f.path if f.path is not None else f.target
        # No known key: the first character of the file (weight files have no lines).
        span = span_of(f, lines) or Span(1, 1, 2)
        fp = fingerprint(f, root)
        # Two findings with the same identity in one run stay two alerts (GitHub's own
        # primaryLocationLineHash uses the same ":occurrence" suffix).
        seen[fp] = seen.get(fp, 0) + 1
        results.append(Result(
            rule_id=f.code,
            rule_index=index.get(f.code),
            level=_LEVEL[f.severity],
            message=Message(text=f.message),
            locations=[Location(physical_location=PhysicalLocation(
                artifact_location=ArtifactLocation(uri=_uri(path, root)),
                region=Region(start_line=span.line, start_column=span.column,
                              end_line=span.line, end_column=span.end_column)))],
            partial_fingerprints={FINGERPRINT_KEY: f"{fp}:{seen[fp]}"},
            properties={"target": _uri(f.target, root), "fix": f.fix.value},
        ))
    log = Sarif(
        schema_uri=SARIF_SCHEMA,
        version="2.1.0",
        runs=[Run(
            tool=Tool(driver=ToolDriver(name=report.tool, version=report.tool_version,
                                        semantic_version=report.tool_version, rules=rules)),
            results=results,
            properties={"schemaVersion": report.schema_version,
                        "consumer": report.consumer.value if report.consumer else None,
                        "severitiesFor": report.consumer_label(),
                        "targets": [_uri(t.path, root) for t in report.targets],
                        "targetConsumers": {_uri(t.path, root): t.consumer.value
                                            for t in report.targets}},
        )],
    )
    return log.model_dump(mode="json", by_alias=True, exclude_none=True)


def render_sarif(report: Report, *, root: str | os.PathLike[str] | None = None,
                 lines: Lines | None = None, **_: object) -> str:
    """SARIF 2.1.0 JSON text; `root` makes the URIs relative (default: working directory)."""
    return json.dumps(build_sarif(report, root=root, lines=lines), indent=2,
                      ensure_ascii=False) + "\n"
