"""What is installed, from package metadata only: nothing here imports the packages it reads.

`importlib.metadata` reads the `*.dist-info` / `*.egg-info` folders on a path list (default
`sys.path`); torch's build (CUDA, ROCm or CPU) comes from `torch/version.py` parsed as text with
`ast`, never executed. Importing torch or transformers takes seconds and can fail; reading their
metadata takes milliseconds and cannot.
"""

from __future__ import annotations

import ast
import importlib.machinery
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from llava_doctor.artifacts.peft_versions import parse_version
from llava_doctor.models import PackageStatus, TorchBuild

# What a merge of a LLaVA LoRA touches, in the order `env` lists them.
PACKAGES = ("torch", "transformers", "peft", "safetensors", "accelerate", "bitsandbytes",
            "tokenizers", "sentencepiece", "llava")


def find_distribution(name: str, path: Sequence[str] | None = None) -> metadata.Distribution | None:
    """The first distribution called `name` on `path` (default `sys.path`), as the importer
    would pick it; None when there is none or its metadata is unreadable."""
    search = list(sys.path if path is None else path)
    try:
        # Finding by name matches the normalised folder names (fast: no METADATA parsed).
        for dist in metadata.distributions(name=name, path=search):
            try:
                if dist.metadata["Name"]:
                    return dist
            except Exception:  # a dist-info without a readable METADATA: not a usable install
                continue
    except OSError:
        return None
    return None


def _location(dist: metadata.Distribution, top: str) -> str | None:
    try:
        where = Path(str(dist.locate_file(top)))
    except Exception:
        return None
    return str(where) if where.exists() else str(Path(str(dist.locate_file(""))))


def package_status(name: str, path: Sequence[str] | None = None) -> PackageStatus:
    """Version and location of one distribution; `version=None` when it is not installed."""
    dist = find_distribution(name, path)
    if dist is None:
        return PackageStatus(name=name, version=None)
    return PackageStatus(name=name, version=dist.version, location=_location(dist, name))


def module_location(top: str, path: Sequence[str] | None = None) -> str | None:
    """Where a top-level package would be imported from, found without importing it (a LLaVA
    checkout on PYTHONPATH has no metadata)."""
    search = list(sys.path if path is None else path)
    spec = importlib.machinery.PathFinder.find_spec(top, search)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return str(list(spec.submodule_search_locations)[0])
    return spec.origin


def _version_py_values(text: str) -> dict[str, str | None]:
    """Top-level `name = 'literal'` / `name: T = 'literal'` assignments of a version.py."""
    out: dict[str, str | None] = {}
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return out
    for node in tree.body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and (
                value.value is None or isinstance(value.value, str)):
            out[target.id] = value.value
    return out


def torch_build(path: Sequence[str] | None = None) -> TorchBuild:
    """torch's version and CUDA/ROCm build from its metadata and `torch/version.py` (as text)."""
    dist = find_distribution("torch", path)
    if dist is None:
        return TorchBuild(version=None, build="not installed")
    values: dict[str, str | None] = {}
    text: str | None = None
    try:
        vp = Path(str(dist.locate_file("torch/version.py")))
        text = vp.read_text(encoding="utf-8") if vp.is_file() else None
    except (OSError, UnicodeDecodeError):
        text = None
    if text is not None:
        values = _version_py_values(text)
    cuda, hip = values.get("cuda"), values.get("hip")
    local = dist.version.partition("+")[2]
    if hip:
        build = f"rocm {hip}"
    elif cuda:
        build = f"cuda {cuda}"
    elif text is not None or local == "cpu":
        build = "cpu"
    else:
        build = "unknown"
    return TorchBuild(version=dist.version, cuda=cuda, hip=hip, build=build)


# --- requirements -------------------------------------------------------------------------------

_REQ = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
                  r"(?:\((?P<paren>[^)]*)\)|(?P<spec>[^;]*))?\s*(?:;(?P<marker>.*))?$")
_CLAUSE = re.compile(r"^\s*(?P<op>~=|===|==|!=|<=|>=|<|>)\s*(?P<ver>[^\s,]+)\s*$")


@dataclass(frozen=True)
class Requirement:
    """One `Requires-Dist` line: a name and its version clauses (markers other than extras are
    kept as text and not evaluated)."""

    name: str
    clauses: tuple[tuple[str, str], ...]
    marker: str | None

    @property
    def text(self) -> str:
        return self.name + ",".join(f"{op}{v}" for op, v in self.clauses)

    @property
    def for_extra(self) -> bool:
        return self.marker is not None and "extra" in self.marker


def parse_requirement(line: str) -> Requirement | None:
    """A `Requires-Dist` value, or None when it is not one this parser understands."""
    m = _REQ.match(line)
    if m is None:
        return None
    spec = (m.group("paren") or m.group("spec") or "").strip()
    clauses = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        c = _CLAUSE.match(part)
        if c is None:
            return None
        clauses.append((c.group("op"), c.group("ver")))
    marker = m.group("marker")
    return Requirement(name=m.group("name"), clauses=tuple(clauses),
                       marker=marker.strip() if marker else None)


def _release(v: str) -> tuple[int, ...]:
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", v)
    if m is None:
        raise ValueError(f"not a version: {v!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def satisfies(version: str, clauses: Sequence[tuple[str, str]]) -> bool:
    """Whether `version` meets every clause (release numbers only: local and pre-release tags
    are ignored, which is what matters for "is this the pinned transformers")."""
    have = _release(version)
    for op, want_text in clauses:
        if want_text.endswith(".*"):
            prefix = _release(want_text[:-2])
            same = have[:len(prefix)] + (0,) * max(0, len(prefix) - len(have)) == prefix
            if (op == "==" and not same) or (op == "!=" and same):
                return False
            continue
        want = _release(want_text)
        c = _cmp(have, want)
        ok = {"==": c == 0, "===": c == 0, "!=": c != 0, "<": c < 0, "<=": c <= 0, ">": c > 0,
              ">=": c >= 0}.get(op)
        if op == "~=":
            upper = list(want[:-1]) if len(want) > 1 else list(want)
            upper[-1] += 1
            ok = c >= 0 and _cmp(have, tuple(upper)) < 0
        if not ok:
            return False
    return True


def requirements(name: str, path: Sequence[str] | None = None) -> list[Requirement]:
    """The parsed `Requires-Dist` lines of a distribution (empty when it is not installed)."""
    dist = find_distribution(name, path)
    if dist is None:
        return []
    out = []
    for line in dist.requires or []:
        req = parse_requirement(line)
        if req is not None:
            out.append(req)
    return out


def version_at_least(version: str | None, minimum: str) -> bool | None:
    """`version >= minimum` on release numbers; None when `version` is unknown or unparsable."""
    if version is None:
        return None
    try:
        return parse_version(version) >= parse_version(minimum)
    except ValueError:
        return None
