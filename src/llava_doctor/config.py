"""Project configuration: `[tool.llava-doctor]` in pyproject.toml or a `.llava-doctor.toml`.

The file is found upward from the working directory, as ruff finds its own. In each directory a
`.llava-doctor.toml` (keys at top level) wins over a `pyproject.toml`; a pyproject.toml without
a `[tool.llava-doctor]` table is passed over, so a nested Python project does not hide the
configuration of the repository around it. Paths in the file are relative to the file's folder.

```toml
[tool.llava-doctor]
select = ["LD1", "LD2"]          # codes or prefixes; default: every check
ignore = ["LD106"]
base = "models/vicuna-7b-v1.5"   # default --base
projector = "checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin"
peft-version = "0.10.0"

[tool.llava-doctor.severity]     # per code or prefix; the longest prefix wins
LD503 = "error"

[tool.llava-doctor.per-path-ignores]
"runs/*/checkpoint-*" = ["LD101", "LD104"]
```

Every key and code is checked: a typo is a usage error (exit 2) naming the key, never a setting
silently ignored. Severity overrides and per-path ignores are applied after the checks ran, by
`Config.apply`, a pure function of the `Report`.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from llava_doctor.errors import UsageError
from llava_doctor.models import (
    CheckOutcome,
    CheckStatus,
    Consumer,
    Finding,
    Report,
    Severity,
)
from llava_doctor.report.locate import outcome_code

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_FILE = ".llava-doctor.toml"
PYPROJECT = "pyproject.toml"
TABLE = "tool.llava-doctor"

KNOWN_KEYS = ("select", "ignore", "severity", "per-path-ignores", "base", "projector",
              "peft-version", "merge-with")


@dataclass(frozen=True)
class Config:
    """What a configuration file says; an empty `Config()` when there is none."""

    path: Path | None = None
    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    severity: Mapping[str, Severity] = field(default_factory=dict)
    per_path_ignores: tuple[tuple[str, tuple[str, ...]], ...] = ()
    base: Path | None = None
    projector: Path | None = None
    peft_version: str | None = None
    merge_with: Consumer | None = None  # default --merge-with

    @property
    def root(self) -> Path:
        """The folder relative paths and per-path patterns are taken from."""
        return self.path.parent if self.path is not None else Path.cwd()

    def selection(self, cli_select: Iterable[str] | None, cli_ignore: Iterable[str] | None
                  ) -> tuple[list[str] | None, list[str]]:
        """(select, ignore) for `doctor.run_checks`, ruff's layering of config and flags.

        `--select` on the command line replaces the configured selection *and* its ignores (the
        user named exactly what to run); `--ignore` alone narrows the configured selection.
        """
        cli_select = list(cli_select or [])
        cli_ignore = list(cli_ignore or [])
        if cli_select:
            return cli_select, cli_ignore
        return (list(self.select) if self.select is not None else None,
                [*self.ignore, *cli_ignore])

    def severity_of(self, code: str) -> Severity | None:
        """The configured severity for `code` (longest matching prefix), or None."""
        best = max((p for p in self.severity if code.startswith(p)), key=len, default=None)
        return self.severity[best] if best is not None else None

    def ignored_at(self, finding: Finding, cwd: Path | None = None) -> str | None:
        """The per-path-ignores pattern that silences `finding`, or None."""
        if not self.per_path_ignores:
            return None
        cwd = cwd or Path.cwd()
        rels = [r for r in (_rel_posix(finding.path, self.root, cwd),
                            _rel_posix(finding.target, self.root, cwd)) if r is not None]
        for pattern, codes in self.per_path_ignores:
            if not any(finding.code.startswith(c) for c in codes):
                continue
            for rel in rels:
                if _matches(rel, pattern):
                    return pattern
        return None

    def apply(self, report: Report, cwd: Path | None = None) -> Report:
        """The report after severity overrides and per-path ignores (pure: a new Report).

        A check whose every finding on a target was ignored by path is reported as skipped
        with the pattern as the reason, so JUnit and the text report agree with the gate.
        """
        if not self.severity and not self.per_path_ignores and not self.ignore:
            return report
        kept: list[Finding] = []
        silenced: dict[tuple[str, str], str] = {}
        for f in report.findings:
            if any(f.code.startswith(c) for c in self.ignore):
                continue  # only LD000 gets here: the other ignored checks never ran
            pattern = self.ignored_at(f, cwd)
            if pattern is not None:
                silenced.setdefault((f.target, outcome_code(f)), pattern)
                continue
            sev = self.severity_of(f.code)
            kept.append(f if sev is None or sev == f.severity
                        else f.model_copy(update={"severity": sev}))
        remaining = {(f.target, outcome_code(f)) for f in kept}
        targets = []
        for t in report.targets:
            outcomes = []
            for o in t.checks:
                key = (t.path, o.code)
                if o.status in (CheckStatus.failed, CheckStatus.crashed) and key in silenced \
                        and key not in remaining:
                    o = CheckOutcome(code=o.code, name=o.name, status=CheckStatus.skipped,
                                     reason=f"findings ignored by per-path-ignores "
                                            f"'{silenced[key]}' in {self.path}")
                outcomes.append(o)
            # model_copy keeps the rest of the target (its consumer, the inputs it used)
            targets.append(t.model_copy(update={"checks": outcomes}))
        return report.model_copy(update={"targets": targets, "findings": kept})


def _rel_posix(p: str | None, root: Path, cwd: Path) -> str | None:
    if p is None:
        return None
    full = Path(p) if Path(p).is_absolute() else cwd / p
    try:
        rel = os.path.relpath(os.path.normpath(full), os.path.normpath(root.absolute()))
    except ValueError:  # another drive on Windows
        return None
    return PurePosixPath(Path(rel)).as_posix()


def _matches(rel: str, pattern: str) -> bool:
    """fnmatch on the path or any folder above it, so a pattern naming a run covers its files."""
    pattern = pattern.rstrip("/")
    parts = rel.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


# --- finding and reading the file ----------------------------------------------------------------

def _is_file(p: Path) -> bool:
    # A folder we may not search (another user's home, a locked-down CI workspace) cannot hold
    # a config we could read: treat it as absent instead of failing the whole run.
    try:
        return p.is_file()
    except OSError:
        return False


def find_config_file(start: Path | None = None) -> Path | None:
    """The nearest `.llava-doctor.toml`, or pyproject.toml with `[tool.llava-doctor]`, upward."""
    d = (start or Path.cwd()).absolute()
    for folder in (d, *d.parents):
        own = folder / CONFIG_FILE
        if _is_file(own):
            return own
        py = folder / PYPROJECT
        if _is_file(py):
            try:
                data = _parse(py)
            except UsageError:
                # A broken pyproject.toml that may not even concern us: only ours must parse.
                continue
            if "llava-doctor" in data.get("tool", {}):
                return py
    return None


def load_config(path: Path) -> Config:
    """Read and validate one configuration file (every key and code is checked)."""
    data = _parse(path)
    if path.name == PYPROJECT:
        table = data.get("tool", {}).get("llava-doctor")
        if table is None:
            raise UsageError(f"has no [{TABLE}] table", path=path,
                             hint=f"add one, or point --config at a {CONFIG_FILE}")
        prefix = f"{TABLE}."
    else:
        table = data
        prefix = ""
    if not isinstance(table, dict):
        raise UsageError(f"'{TABLE}' must be a table", path=path)
    return _from_table(table, path, prefix)


def discover(start: Path | None = None) -> Config:
    """The configuration in effect for `start` (default: the working directory)."""
    found = find_config_file(start)
    return load_config(found) if found is not None else Config()


def _parse(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read configuration ({e.strerror})", path=path) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError("is not UTF-8 text", path=path, hint="save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"invalid TOML: {e}", path=path, hint="fix the syntax") from None


def _from_table(table: dict[str, Any], path: Path, prefix: str) -> Config:
    from llava_doctor.checks.base import all_checks

    codes = list(all_checks())
    for key in table:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            raise UsageError(f"unknown key '{prefix}{key}'", path=path,
                             hint=(f"did you mean '{prefix}{close[0]}'? " if close else "")
                             + f"known keys: {', '.join(KNOWN_KEYS)}")

    def code_list(key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"'{prefix}{key}' must be a list of codes, e.g. [\"LD101\", \"LD2\"]",
                             path=path)
        return tuple(validate_code(v, f"'{prefix}{key}'", codes, path) for v in value)

    def a_path(key: str) -> Path | None:
        v = table.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise UsageError(f"'{prefix}{key}' must be a path string", path=path)
        p = Path(v).expanduser()
        return p if p.is_absolute() else path.parent / p

    select = code_list("select", table["select"]) if "select" in table else None
    ignore = code_list("ignore", table.get("ignore", []))

    sev_table = table.get("severity", {})
    if not isinstance(sev_table, dict):
        raise UsageError(f"'{prefix}severity' must be a table of CODE = \"error|warning|info\"",
                         path=path)
    severity: dict[str, Severity] = {}
    for code, level in sev_table.items():
        key = f"'{prefix}severity.{code}'"
        c = validate_code(code, key, codes, path)
        if level not in {s.value for s in Severity}:
            raise UsageError(f"{key} = {level!r} is not a severity", path=path,
                             hint="use \"error\", \"warning\" or \"info\"")
        severity[c] = Severity(level)

    ppi_table = table.get("per-path-ignores", {})
    if not isinstance(ppi_table, dict):
        raise UsageError(f"'{prefix}per-path-ignores' must be a table of \"glob\" = [codes]",
                         path=path)
    ppi = tuple((pattern, code_list(f"per-path-ignores.\"{pattern}\"", cs))
                for pattern, cs in ppi_table.items())

    peft = table.get("peft-version")
    if peft is not None and (not isinstance(peft, str) or not peft):
        raise UsageError(f"'{prefix}peft-version' must be a version string like \"0.10.0\"",
                         path=path)
    merge_with = table.get("merge-with")
    if merge_with is not None and merge_with not in {c.value for c in Consumer}:
        raise UsageError(f"'{prefix}merge-with' = {merge_with!r} is not a consumer", path=path,
                         hint="use " + ", ".join(f'"{c.value}"' for c in Consumer))
    return Config(path=path, select=select, ignore=ignore, severity=severity,
                  per_path_ignores=ppi, base=a_path("base"), projector=a_path("projector"),
                  peft_version=peft,
                  merge_with=Consumer(merge_with) if merge_with is not None else None)


def validate_code(code: str, where: str, known: Iterable[str] | None = None,
                  path: Path | None = None) -> str:
    """`code` upper-cased if it is a check code or the prefix of one; else a UsageError."""
    if known is None:
        from llava_doctor.checks.base import all_checks

        known = list(all_checks())
    known = list(known)
    c = code.strip().upper()
    if c and any(k.startswith(c) for k in known):
        return c
    close = difflib.get_close_matches(c, known, n=1)
    raise UsageError(f"unknown code '{code}' in {where}", path=path,
                     hint=(f"did you mean {close[0]}? " if close else "")
                     + "`llava-doctor explain --all` lists the codes")
