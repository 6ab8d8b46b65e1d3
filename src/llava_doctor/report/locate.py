"""Where in a file a finding points: paths relative to a root, and JSON key lines.

Renderers stay pure functions of the `Report`: the one thing that needs the disk (the line of a
JSON key) is looked up here, once, by the caller, and handed to the renderers as `lines=`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from llava_doctor.models import Finding, Report

# Evidence entries that name the JSON key a finding is about (dotted for nested keys).
KEY_EVIDENCE = ("key", "field")
# Configs are small; a "config" this big is not worth scanning for a line number.
MAX_SCAN_BYTES = 1024 * 1024



class Span(NamedTuple):
    """Where a JSON key sits: 1-based line, first column and one past the last (SARIF's)."""

    line: int
    column: int
    end_column: int


Lines = Mapping[tuple[str, str], Span]


def finding_key(f: Finding) -> str | None:
    """The JSON key a finding names in its evidence, when its file is a JSON file."""
    if f.path is None or not f.path.endswith(".json"):
        return None
    for k in KEY_EVIDENCE:
        v = f.evidence.get(k)
        if isinstance(v, str) and v:
            return v
    return None


def json_key_lines(report: Report) -> dict[tuple[str, str], Span]:
    """{(path, key): span of the key} for every finding about a key of a readable JSON file."""
    wanted: dict[str, set[str]] = {}
    for f in report.findings:
        key = finding_key(f)
        if key is not None and f.path is not None:
            wanted.setdefault(f.path, set()).add(key)
    out: dict[tuple[str, str], Span] = {}
    for path, keys in wanted.items():
        try:
            if os.path.getsize(path) > MAX_SCAN_BYTES:
                continue
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # the file is missing or unreadable: the finding says so; line 1 it is
        for key in keys:
            span = key_span(text, key)
            if span is not None:
                out[(path, key)] = span
    return out


def key_span(text: str, key: str) -> Span | None:
    """Where `"key":` is in JSON text; a dotted key is found part by part, in order.

    A textual search, not a parse: cheap, and good enough to land a reader on the right line
    of a config written by `json.dump(indent=2)`. None when a part is not found.
    """
    pos = 0
    m = None
    for part in key.split("."):
        m = re.compile(r'"' + re.escape(part) + r'"\s*:').search(text, pos)
        if m is None:
            return None
        pos = m.start()
    assert m is not None
    line_start = text.rfind("\n", 0, pos) + 1
    column = pos - line_start + 1
    return Span(text.count("\n", 0, pos) + 1, column, column + len(m.group(0).rstrip(":").rstrip()))


def span_of(f: Finding, lines: Lines | None) -> Span | None:
    """The known span of a finding's key, or None (callers fall back to line 1)."""
    key = finding_key(f)
    if lines is None or key is None or f.path is None:
        return None
    return lines.get((f.path, key))


def outcome_code(f: Finding) -> str:
    """The code of the check outcome a finding belongs to.

    An LD000 finding stands for the check that crashed, named in its evidence.
    """
    if f.code == "LD000" and isinstance(f.evidence.get("check"), str):
        return f.evidence["check"]
    return f.code


def relative_to_root(p: str, root: str | os.PathLike[str] | None = None) -> str | None:
    """`p` as a POSIX path relative to `root` (default: the working directory), or None when
    it lies outside it."""
    base = os.path.abspath(root if root is not None else os.getcwd())
    full = os.path.abspath(p)
    try:
        rel = os.path.relpath(full, base)
    except ValueError:  # another drive on Windows
        return None
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return PurePosixPath(Path(rel)).as_posix()


def display_path(p: str, root: str | os.PathLike[str] | None = None) -> str:
    """Relative to root when inside it, else absolute; POSIX separators."""
    rel = relative_to_root(p, root)
    return rel if rel is not None else PurePosixPath(Path(os.path.abspath(p))).as_posix()
