"""Every third-party module the package imports at run time is a declared runtime dependency.

A bare `pip install .` (no extras) must run every command: a green suite with `.[test]` once hid
an undeclared numpy that crashed `llava-doctor demo` for every newcomer. This test walks the
package's imports with `ast` and compares them with pyproject.toml. A module that only an extra
declares must be imported inside `try: ... except ImportError` (or ModuleNotFoundError), so a
bare install runs on without it.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "llava_doctor"
# Modules that torch and safetensors need only for some calls, named by what calls them:
# `Tensor.numpy()` and `safetensors.torch.save_file` need numpy, which torch does not depend on.
IMPLICIT = [
    (re.compile(r"\.numpy\(\)"), "numpy"),
    (re.compile(r"\bsafetensors\.torch\b"), "numpy"),
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_norm(Requirement(r).name) for r in project["dependencies"]}
    extras = {extra: {_norm(Requirement(r).name) for r in reqs}
              for extra, reqs in project.get("optional-dependencies", {}).items()}
    return runtime, extras


def _guarded_lines(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside a `try` whose handlers catch ImportError."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for h in node.handlers:
            types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            caught |= {t.id for t in types if isinstance(t, ast.Name)}
        if caught & {"ImportError", "ModuleNotFoundError"}:
            for stmt in node.body:
                out |= {n.lineno for n in ast.walk(stmt) if isinstance(n, (ast.Import,
                                                                              ast.ImportFrom))}
    return out


def _imports() -> list[tuple[str, str, int, bool]]:
    """(top-level module, file, line, guarded) for every absolute import in the package."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        guarded = _guarded_lines(tree)
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.append((n.split(".")[0], rel, node.lineno, node.lineno in guarded))
        for pattern, module in IMPLICIT:
            for m in pattern.finditer(text):
                found.append((module, rel, text.count("\n", 0, m.start()) + 1, False))
    return found


def _distribution(module: str) -> str:
    """The distribution that provides `module`; for one not installed here (tomli on Python
    >= 3.11, declared with a version marker), the module's own name."""
    dists = packages_distributions().get(module)
    return _norm(dists[0]) if dists else _norm(module)


def test_runtime_imports_are_declared_dependencies() -> None:
    runtime, extras = _declared()
    in_extras = {d: e for e, ds in extras.items() for d in ds}
    problems = []
    for module, where, line, guarded in _imports():
        if module in sys.stdlib_module_names or module == "llava_doctor":
            continue
        dist = _distribution(module)
        if dist in runtime:
            continue
        if dist in in_extras and guarded:
            continue
        if dist in in_extras:
            problems.append(f"{where}:{line}: {module} ({dist}) is only in the "
                            f"[{in_extras[dist]}] extra but is imported without an ImportError "
                            "guard")
        else:
            problems.append(f"{where}:{line}: {module} ({dist}) is not a declared dependency")
    assert problems == []


def test_the_walk_sees_what_it_must() -> None:
    """The walk itself works: it finds the runtime libraries, an optional guarded import, and
    numpy through `Tensor.numpy()` (the undeclared dependency that once crashed the demo)."""
    seen = {(m, guarded) for m, _, _, guarded in _imports()}
    assert {("torch", False), ("typer", False), ("safetensors", False)} <= seen
    assert ("huggingface_hub", True) in seen
    assert ("numpy", False) in seen
    runtime, _ = _declared()
    assert "numpy" in runtime
