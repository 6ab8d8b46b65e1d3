"""`fix --undo`: put the LoRA dir back exactly as it was before the latest fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from llava_doctor.errors import FixError
from llava_doctor.fixes.apply import Observer, dir_lock, list_backups, recover, restore

#: Backup sets whose changes are (or may be) on disk.
_UNDOABLE = ("complete", "applying")


class UndoResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    lora_dir: str
    backup_dir: str
    restored: tuple[str, ...]   # relative paths restored or removed
    codes: tuple[str, ...]


def latest_undoable(lora_dir: Path) -> Path | None:
    """The newest backup folder whose fix is still in effect."""
    for d, m in reversed(list_backups(Path(lora_dir))):
        if m is not None and m.get("state") in _UNDOABLE:
            return d
    return None


def undo_latest(lora_dir: Path, *, observer: Observer | None = None) -> UndoResult:
    """Restore every file the latest fix changed (byte-identical, with its mtime and mode) and
    remove the files and links it created. Raises FixError when there is nothing to undo or a
    file was edited after the fix (then nothing is restored)."""
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise FixError("is not a directory", path=lora_dir, hint="pass the LoRA dir you fixed")
    # Stale temps and runs killed before any change are cleaned; a run killed while applying
    # is the latest fix and is restored below like a complete one.
    recover(lora_dir, observer=observer, roll_back=False)
    backup = latest_undoable(lora_dir)
    if backup is None:
        raise FixError("has no fix to undo (no backup under .llava-doctor/backups)",
                       path=lora_dir, hint="nothing was changed by `llava-doctor fix` here")
    with dir_lock(lora_dir):
        manifest = list_backups(lora_dir)
        entry: dict[str, Any] | None = next(mm for d, mm in manifest if d == backup)
        m: dict[str, Any] = dict(entry or {})
        done = restore(lora_dir, backup, m, new_state="undone", observer=observer)
    return UndoResult(lora_dir=str(lora_dir), backup_dir=str(backup), restored=tuple(done),
                      codes=tuple(c.get("code", "") for c in m.get("changes") or []))
