"""One exception family. Every user-facing failure is a subclass carrying a one-line hint.

Expected failures found while *checking* become findings (values), not exceptions; these
classes are what the artifact layer raises so that the check layer can turn them into findings,
and what the CLI maps to a one-line message and an exit code.
"""

from __future__ import annotations

from pathlib import Path


class DoctorError(Exception):
    """Base class. ``str(err)`` is one line naming the file; ``hint`` is the remedy."""

    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, *, path: Path | str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:  # one line: "<path>: <message>"
        return f"{self.path}: {self.message}" if self.path else self.message

    def one_line(self) -> str:
        """The message and the remedy, for a CLI's single error line."""
        return f"{self}; {self.hint}" if self.hint else str(self)


class UsageError(DoctorError):
    """Bad command line or configuration: exit 2."""

    exit_code = 2


class FileCorruptError(DoctorError):
    """A weight file or JSON file breaks a structural rule of its format (LD501)."""

    default_hint = "re-copy or re-download the file; it cannot be repaired in place"

    def __init__(self, message: str, *, path: Path | str, rule: str, tensor: str | None = None,
                 hint: str | None = None):
        super().__init__(message, path=path, hint=hint)
        self.rule = rule
        self.tensor = tensor


class UnsafePickleError(DoctorError):
    """A pickle references a global outside the allowlist (LD502). Nothing was executed."""

    default_hint = ("do not load this file with torch.load(weights_only=False); obtain the weights "
                    "from a trusted source, preferably as .safetensors")

    def __init__(self, message: str, *, path: Path | str, global_name: str,
                 hint: str | None = None):
        super().__init__(message, path=path, hint=hint)
        self.global_name = global_name


class LfsPointerError(DoctorError):
    """A weight file is a Git LFS pointer, not the weights (LD504)."""

    default_hint = "run `git lfs pull` in the repository the file came from"


class MergeError(DoctorError):
    """The merge could not complete; the output directory was not created."""


class FixError(DoctorError):
    """A repair could not be applied; nothing was changed."""
