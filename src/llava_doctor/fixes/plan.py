"""The fix plan: frozen data describing every change before anything is written.

`build_plan` (registry.py) turns a check report into a `FixPlan`; `apply_plan` (apply.py) writes
exactly the bytes the plan holds, nothing else. A plan is a value: it can be printed, diffed,
dumped to JSON and thrown away (`--dry-run`) without any side effect.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from llava_doctor.models import FixSafety


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileOp(str, Enum):
    """What happens to one path."""

    create = "create"    # a new regular file
    replace = "replace"  # type: ignore[assignment]  # an existing file (or symlink) is replaced by a regular file
    symlink = "symlink"  # a new symbolic link


class FileChange(_Frozen):
    """The final state of one path after the whole plan (several fixes may edit one file)."""

    path: str = Field(description="Absolute path of the file or link written")
    rel: str = Field(description="The path relative to the LoRA dir (`../x` for a sibling)")
    op: FileOp
    content: bytes | None = Field(default=None, exclude=True, repr=False,
                                  description="The exact bytes written (regular files)")
    link_target: str | None = Field(default=None, description="Target of a new symlink")
    sha256_before: str | None = Field(default=None, description="None when the path is new")
    sha256_after: str | None = Field(default=None, description="None for a symlink")
    was_symlink: str | None = Field(default=None, description="Target of the link replaced")
    is_json: bool = False
    tensors: dict[str, tuple[int, ...]] | None = Field(
        default=None, description="name -> shape of a weight file we write (verified after "
        "writing by the safe pickle walker)")
    diff: str | None = Field(default=None, description="Unified diff for text (JSON) files")
    summary: str = Field(default="", description="One line on the content (binary files)")
    codes: tuple[str, ...] = Field(default=(), description="The fixes that shape this file")


class PlannedChange(_Frozen):
    """One fix for one finding code: what it changes, where, and how safe it is."""

    code: str
    name: str
    safety: FixSafety
    title: str = Field(description="What changes, in one sentence")
    files: tuple[str, ...] = Field(description="Paths touched, relative to the LoRA dir")
    unsafe_reason: str | None = Field(default=None, description="Why the fix is unsafe")
    notes: tuple[str, ...] = Field(default=(), description="Commands or hints to print")
    apply: bool = Field(description="False when it is unsafe and --unsafe was not given")


class Unfixable(_Frozen):
    """A finding the fix step could not repair, and why: a value, not an exception."""

    code: str
    name: str
    path: str | None = None
    reason: str


class Satisfied(_Frozen):
    """A finding whose fix is already in place (e.g. the LD106 link exists); nothing to write."""

    code: str
    name: str
    reason: str
    notes: tuple[str, ...] = ()


class FixPlan(_Frozen):
    """Everything `fix` would do to one LoRA dir."""

    lora_dir: str
    changes: tuple[PlannedChange, ...] = ()
    unfixable: tuple[Unfixable, ...] = ()
    satisfied: tuple[Satisfied, ...] = ()
    files: tuple[FileChange, ...] = Field(default=(), description="Final writes, in order")
    protected: tuple[str, ...] = Field(default=(), description="Paths never to be written "
                                       "(base model dir, stage-1 projector)")

    @property
    def to_apply(self) -> tuple[PlannedChange, ...]:
        return tuple(c for c in self.changes if c.apply)

    @property
    def held_back(self) -> tuple[PlannedChange, ...]:
        """Unsafe changes left out because --unsafe was not given."""
        return tuple(c for c in self.changes if not c.apply)

    @property
    def is_empty(self) -> bool:
        """True when applying would write nothing."""
        return not self.files
