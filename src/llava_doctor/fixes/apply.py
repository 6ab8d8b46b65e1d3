"""Apply a `FixPlan`: backups first, then one atomic replacement per file, never a torn file.

Order of durable writes, each one fsync'ed (file and directory):

1. `LORA_DIR/.llava-doctor/backups/<UTC timestamp>/manifest.json` with state `preparing`;
2. a copy of every file about to be replaced, under its relative path in that folder;
3. the manifest again, state `applying` (from here on, originals may change);
4. each new file: a temp file in the same folder, fsync, `os.replace`, fsync of the folder;
5. the manifest, state `complete`.

A kill at any point leaves every original either untouched or completely replaced, with its
backup already on disk. The next `fix` run finds a manifest still `preparing` (nothing was
changed: the folder is removed) or `applying` (the run is rolled back from its backup, so the
new plan starts from the real originals), and removes stale temp files.

Two environment switches exist for the kill tests only: `LLAVA_DOCTOR_TEST_ABORT_AFTER_WRITES=N`
makes the process `os._exit(86)` right after its N-th durable write, and
`LLAVA_DOCTOR_TEST_WRITE_DELAY=SECONDS` sleeps before each write to widen the window.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from llava_doctor import __version__
from llava_doctor.artifacts.discovery import STATE_DIR
from llava_doctor.errors import DoctorError, FixError
from llava_doctor.fixes.plan import FileChange, FileOp, FixPlan
from llava_doctor.fixes.workspace import sha256_file
from llava_doctor.fsutil import fsync_dir

Observer = Callable[[str], None]

BACKUPS = "backups"
MANIFEST = "manifest.json"
LOCK = "lock"
TMP_PREFIX = ".llava-doctor-tmp-"
MANIFEST_FORMAT = 1

ABORT_ENV = "LLAVA_DOCTOR_TEST_ABORT_AFTER_WRITES"
DELAY_ENV = "LLAVA_DOCTOR_TEST_WRITE_DELAY"
ABORT_EXIT = 86


class ApplyResult(BaseModel):
    """What `apply_plan` did."""

    model_config = ConfigDict(frozen=True)

    lora_dir: str
    backup_dir: str
    written: tuple[str, ...]   # relative paths, in order
    codes: tuple[str, ...]


class RecoveryResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    rolled_back: tuple[str, ...] = ()        # backup dirs of interrupted runs, now undone
    removed_unstarted: tuple[str, ...] = ()  # backup dirs of runs killed before any change
    removed_temp: tuple[str, ...] = ()       # stale temp files

    @property
    def did_anything(self) -> bool:
        return bool(self.rolled_back or self.removed_unstarted or self.removed_temp)


# ------------------------------------------------------------------------------------------
# Durable writes
# ------------------------------------------------------------------------------------------

class _Writes:
    """Counts durable writes; the test switches hook in here."""

    def __init__(self) -> None:
        self.count = 0
        abort = os.environ.get(ABORT_ENV)
        self.abort_after = int(abort) if abort and abort.strip().isdigit() else None
        delay = os.environ.get(DELAY_ENV)
        try:
            self.delay = float(delay) if delay else 0.0
        except ValueError:
            self.delay = 0.0

    def before(self) -> None:
        if self.delay:
            time.sleep(self.delay)

    def after(self) -> None:
        self.count += 1
        if self.abort_after is not None and self.count >= self.abort_after:
            os._exit(ABORT_EXIT)  # a crash, not an exit: no cleanup handlers run


def _tmp_path(final: Path) -> Path:
    # The real name stays at the end so that the suffix (.bin/.json) still tells readers the type.
    return final.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}-{final.name}"


@contextlib.contextmanager
def _staged(final: Path, writes: _Writes | None) -> Iterator[Path]:
    """The one way this module replaces a path: the caller fills a temp path in the same
    folder; on success it replaces `final` atomically and the folder entry is made durable, on
    any failure (or kill signal turned exception) the temp path is removed."""
    writes = writes or _Writes()
    writes.before()
    tmp = _tmp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
    writes.after()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final: Path, data: bytes, *, writes: _Writes | None = None,
                 mode: int | None = None, verify: Callable[[Path], None] | None = None) -> None:
    """Write `data` to `final` through a temp file in the same folder and `os.replace`.

    `final` itself may be a symlink: the link is replaced, its target is never written.
    `verify(temp_path)` runs on the complete temp file before it replaces anything.
    """
    with _staged(final, writes) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        if verify is not None:
            verify(tmp)


def atomic_copy(source: Path, final: Path, *, writes: _Writes | None = None) -> None:
    """Copy a file (bytes, mode and mtime) or a symlink (as a link) onto `final` atomically."""
    with _staged(final, writes) as tmp:
        if source.is_symlink():
            os.symlink(os.readlink(source), tmp)
        else:
            shutil.copy2(source, tmp, follow_symlinks=False)
            _fsync_file(tmp)


def atomic_symlink(final: Path, target: str, *, writes: _Writes | None = None) -> None:
    """Create the symlink `final -> target` (fails if `final` appeared meanwhile)."""
    if os.path.lexists(final):
        raise FixError("appeared after the plan was made; nothing more was changed", path=final,
                       hint="run `llava-doctor fix` again")
    with _staged(final, writes) as tmp:
        os.symlink(target, tmp)


def _remove(path: Path, *, writes: _Writes) -> None:
    writes.before()
    os.unlink(path)
    fsync_dir(path.parent)
    writes.after()


# ------------------------------------------------------------------------------------------
# Guards
# ------------------------------------------------------------------------------------------

def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_not_protected(path: Path, protected: Sequence[Path]) -> None:
    """Refuse any write to the base model dir or the stage-1 projector file."""
    real = os.path.realpath(path)
    parent_real = os.path.realpath(path.parent)
    for prot in protected:
        pr = os.path.realpath(prot)
        if _within(real, pr) or _within(os.path.join(parent_real, path.name), pr):
            raise FixError(f"refusing to write {path}: it is inside {prot}, which fix never "
                           "modifies", path=path, hint="report this as a bug")


def _check_target(fc: FileChange, lora_dir: Path) -> None:
    """Nothing is written outside the LoRA dir, or through a symlink leading outside it."""
    p = Path(fc.path)
    real_lora = os.path.realpath(lora_dir)
    parent_real = os.path.realpath(p.parent)
    beside = os.path.realpath(Path(os.path.abspath(lora_dir)).parent)
    if fc.op == FileOp.symlink and parent_real == beside:
        return  # LD106's sibling link: a new link beside the dir, nothing overwritten
    if not _within(parent_real, real_lora):
        raise FixError(f"refusing to write {p}: its folder resolves to {parent_real}, outside "
                       f"{lora_dir}", path=p, hint="a symlinked folder leads outside the LoRA "
                       "dir; copy the files into the LoRA dir first")


def _check_unchanged(fc: FileChange) -> None:
    p = Path(fc.path)
    if fc.op in (FileOp.create, FileOp.symlink):
        if os.path.lexists(p):
            raise FixError("appeared after the plan was made; nothing was changed", path=p,
                           hint="run `llava-doctor fix` again")
        return
    if not os.path.lexists(p):
        raise FixError("disappeared after the plan was made; nothing was changed", path=p,
                       hint="run `llava-doctor fix` again")
    link = os.readlink(p) if p.is_symlink() else None
    if link != fc.was_symlink or not p.is_file() or sha256_file(p) != fc.sha256_before:
        raise FixError("changed after the plan was made; nothing was changed", path=p,
                       hint="run `llava-doctor fix` again")


def _verify_weights(fc: FileChange) -> Callable[[Path], None] | None:
    """A check of a written weight file with our own (non-executing) reader."""
    if fc.tensors is None:
        return None
    expected = {k: tuple(v) for k, v in fc.tensors.items()}

    def verify(tmp: Path) -> None:
        from llava_doctor.artifacts.torchfile import read_torch_file

        try:
            got = read_torch_file(tmp)
        except DoctorError as e:
            raise FixError(f"the file we wrote for {fc.rel} fails our own pickle check "
                           f"({e.message}); nothing was replaced", path=fc.path,
                           hint="report this as a bug") from None
        shapes = {k: tuple(t.shape) for k, t in got.tensors.items()}
        if shapes != expected or got.other:
            raise FixError(f"the file we wrote for {fc.rel} does not hold exactly the planned "
                           "tensors; nothing was replaced", path=fc.path,
                           hint="report this as a bug")

    return verify


# ------------------------------------------------------------------------------------------
# State folder, lock, manifest
# ------------------------------------------------------------------------------------------

def state_dir(lora_dir: Path) -> Path:
    return Path(lora_dir) / STATE_DIR


def backups_dir(lora_dir: Path) -> Path:
    return state_dir(lora_dir) / BACKUPS


@contextlib.contextmanager
def dir_lock(lora_dir: Path) -> Iterator[None]:
    """One fix/undo at a time per LoRA dir (advisory lock on `.llava-doctor/lock`)."""
    sd = state_dir(lora_dir)
    try:
        sd.mkdir(exist_ok=True)
        fd = os.open(sd / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FixError(f"cannot write in this directory ({e.strerror}); nothing was changed",
                       path=lora_dir, hint="make it writable, or copy the run and fix the copy"
                       ) from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): run unlocked
            pass
        except OSError:
            raise FixError("another `llava-doctor fix` is running on this directory",
                           path=lora_dir, hint="wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _new_backup_dir(lora_dir: Path) -> Path:
    root = backups_dir(lora_dir)
    root.mkdir(parents=True, exist_ok=True)
    stamp = _utc_stamp()
    for n in range(1000):
        d = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(root)
        return d
    raise FixError("cannot create a backup folder", path=root)


def write_manifest(backup_dir: Path, manifest: dict[str, Any], writes: _Writes) -> None:
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    atomic_write(backup_dir / MANIFEST, data, writes=writes)


def read_manifest(backup_dir: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads((backup_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def list_backups(lora_dir: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Every backup folder (oldest first) with its manifest (None when it has none)."""
    root = backups_dir(lora_dir)
    if not root.is_dir():
        return []
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(d, read_manifest(d)) for d in dirs]


# ------------------------------------------------------------------------------------------
# Apply
# ------------------------------------------------------------------------------------------

def apply_plan(plan: FixPlan, *, observer: Observer | None = None) -> ApplyResult:
    """Write the plan's files, with backups and a manifest. Raises FixError before any change
    if a file changed since planning or a write would leave the LoRA dir."""
    say = observer or (lambda _msg: None)
    lora = Path(plan.lora_dir)
    if plan.is_empty:
        raise FixError("the plan is empty: nothing to apply", path=lora)
    protected = [Path(p) for p in plan.protected]
    for fc in plan.files:
        check_not_protected(Path(fc.path), protected)
        _check_target(fc, lora)
        _check_unchanged(fc)
    try:
        return _apply_locked(plan, lora, say)
    except OSError as e:
        # Disk full, a file we may not replace, ...: put back what was already written (the
        # manifest says 'applying'), then report one line. A kill cannot get here; the next
        # run's recovery handles that case the same way.
        where = e.filename or lora
        try:
            rolled = recover(lora).rolled_back
        except (OSError, FixError):
            rolled = ()
        done = ("the files written so far were restored from the backup" if rolled
                else "nothing was changed")
        raise FixError(f"could not write {where} ({e.strerror}); {done}", path=lora,
                       hint="free space or fix permissions, then run `llava-doctor fix` again"
                       ) from None


def _apply_locked(plan: FixPlan, lora: Path, say: Callable[[str], None]) -> ApplyResult:
    writes = _Writes()
    with dir_lock(lora):
        backup = _new_backup_dir(lora)
        manifest = _manifest(plan, backup)
        write_manifest(backup, manifest, writes)
        for entry, fc in zip(manifest["files"], plan.files, strict=True):
            if entry["backup"] is None:
                continue
            say(f"backing up {fc.rel}")
            dest = backup / entry["backup"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(Path(fc.path), dest, writes=writes)
            if fc.was_symlink is None and sha256_file(dest) != fc.sha256_before:
                raise FixError(f"the backup of {fc.rel} does not match the original; nothing "
                               "was changed", path=dest, hint="check the disk and retry")
        manifest["state"] = "applying"
        write_manifest(backup, manifest, writes)
        written = []
        for fc in plan.files:
            p = Path(fc.path)
            say(f"writing {fc.rel}")
            if fc.op == FileOp.symlink:
                assert fc.link_target is not None
                atomic_symlink(p, fc.link_target, writes=writes)
            else:
                assert fc.content is not None
                mode = None
                if fc.op == FileOp.replace and fc.was_symlink is None:
                    mode = p.stat().st_mode & 0o7777
                atomic_write(p, fc.content, writes=writes, mode=mode, verify=_verify_weights(fc))
            written.append(fc.rel)
        manifest["state"] = "complete"
        manifest["completed_utc"] = _utc_stamp()
        write_manifest(backup, manifest, writes)
    return ApplyResult(lora_dir=str(lora), backup_dir=str(backup), written=tuple(written),
                       codes=tuple(c.code for c in plan.to_apply))


def _manifest(plan: FixPlan, backup: Path) -> dict[str, Any]:
    files: list[dict[str, Any]] = []
    for fc in plan.files:
        files.append({
            "rel": fc.rel, "path": os.path.abspath(fc.path), "op": fc.op.value,
            "backup": fc.rel if fc.op == FileOp.replace else None,
            "sha256_before": fc.sha256_before, "sha256_after": fc.sha256_after,
            "was_symlink": fc.was_symlink, "link_target": fc.link_target,
            "codes": list(fc.codes),
        })
    by_rel = {f["rel"]: f for f in files}
    changes = []
    for c in plan.to_apply:
        touched = [f for f in files if c.code in f["codes"]]
        changes.append({
            "code": c.code, "name": c.name, "safety": c.safety.value, "title": c.title,
            "unsafe_reason": c.unsafe_reason,
            "files": [{"rel": f["rel"], "sha256_before": by_rel[f["rel"]]["sha256_before"],
                       "sha256_after": by_rel[f["rel"]]["sha256_after"]} for f in touched],
        })
    return {"tool": "llava-doctor", "tool_version": __version__, "format": MANIFEST_FORMAT,
            "created_utc": backup.name, "lora_dir": os.path.abspath(plan.lora_dir),
            "state": "preparing",
            "changes": changes, "files": files}


# ------------------------------------------------------------------------------------------
# Restore (shared by undo and by the recovery of interrupted runs)
# ------------------------------------------------------------------------------------------

def _entry_path(lora_dir: Path, entry: dict[str, Any]) -> Path:
    # Relative to the LoRA dir as it is now, so a moved or renamed dir can still be restored.
    return Path(os.path.normpath(Path(lora_dir) / entry["rel"]))


def _state_of(p: Path, entry: dict[str, Any]) -> str:
    """'before', 'after', 'absent' or 'other' for one manifest file entry, as the disk is now."""
    if entry["op"] == "symlink":
        if not os.path.lexists(p):
            return "before"
        if p.is_symlink() and os.readlink(p) == entry["link_target"]:
            return "after"
        return "other"
    if not os.path.lexists(p):
        return "before" if entry["op"] == "create" else "absent"
    link = os.readlink(p) if p.is_symlink() else None
    if entry["op"] == "replace" and entry.get("was_symlink") is not None:
        if link == entry["was_symlink"]:
            return "before"
    if link is not None or not p.is_file():
        return "other"
    digest = sha256_file(p)
    if digest == entry["sha256_after"]:
        return "after"
    if entry["op"] == "replace" and digest == entry["sha256_before"]:
        return "before"
    return "other"


def restore(lora_dir: Path, backup: Path, manifest: dict[str, Any], *, new_state: str,
            observer: Observer | None = None) -> list[str]:
    """Put every file of a backup set back exactly as it was; remove what the fix created.

    Refuses (FixError, nothing changed) when a file was modified after the fix. Returns the
    relative paths restored or removed. The caller holds the directory lock.
    """
    say = observer or (lambda _msg: None)
    entries = manifest.get("files") or []
    states = [(e, _state_of(_entry_path(lora_dir, e), e)) for e in entries]
    conflicts = [e["rel"] for e, s in states if s == "other"]
    for e, s in states:
        if s == "absent" and e.get("backup") and not (backup / e["backup"]).exists():
            conflicts.append(e["rel"])
    if conflicts:
        raise FixError(f"{', '.join(conflicts)} changed after the fix of {backup.name}; nothing "
                       "was restored", path=lora_dir,
                       hint=f"restore them by hand from {backup}")
    writes = _Writes()
    done = []
    for e, s in reversed(states):
        if s == "before":
            continue
        p = _entry_path(lora_dir, e)
        if e["op"] in ("create", "symlink"):
            if os.path.lexists(p):
                say(f"removing {e['rel']}")
                _remove(p, writes=writes)
                done.append(e["rel"])
            continue
        src = backup / e["backup"]
        say(f"restoring {e['rel']}")
        atomic_copy(src, p, writes=writes)
        done.append(e["rel"])
    manifest = dict(manifest)
    manifest["state"] = new_state
    manifest[f"{new_state.replace('-', '_')}_utc"] = _utc_stamp()
    write_manifest(backup, manifest, writes)
    return done


# ------------------------------------------------------------------------------------------
# Recovery of interrupted runs
# ------------------------------------------------------------------------------------------

def _stale_temps(lora_dir: Path) -> list[Path]:
    out: list[Path] = []
    dirs = [lora_dir, lora_dir.parent]
    for _, _m in list_backups(lora_dir):
        dirs.append(_)
    for d in dirs:
        try:
            out.extend(d / n for n in os.listdir(d) if n.startswith(TMP_PREFIX))
        except OSError:
            continue
    root = backups_dir(lora_dir)
    if root.is_dir():  # temp files inside nested backup folders (checkpoint-N/... paths)
        out.extend(p for p in root.rglob(f"{TMP_PREFIX}*") if p.parent not in dirs)
    return sorted(set(out))


def needs_recovery(lora_dir: Path) -> list[str]:
    """What an interrupted run left behind (descriptions; empty when nothing). Reads only."""
    lora_dir = Path(lora_dir)
    found = [f"stale temp file {p}" for p in _stale_temps(lora_dir)]
    for d, m in list_backups(lora_dir):
        if m is None:
            found.append(f"backup folder {d} without a manifest (a run killed before any change)")
        elif m.get("state") == "preparing":
            found.append(f"backup folder {d} of a run killed before any change")
        elif m.get("state") == "applying":
            found.append(f"backup folder {d} of a run killed while applying; it will be rolled "
                         "back")
    return found


def recover(lora_dir: Path, *, observer: Observer | None = None,
            roll_back: bool = True) -> RecoveryResult:
    """Roll back runs killed while applying, drop runs killed before changing anything, and
    remove stale temp files. A no-op (no write at all) when nothing was interrupted.

    `roll_back=False` leaves interrupted runs for `fix --undo` to restore as the latest fix.
    """
    lora_dir = Path(lora_dir)
    if not needs_recovery(lora_dir):
        return RecoveryResult()
    say = observer or (lambda _msg: None)
    rolled, removed, temps = [], [], []
    with dir_lock(lora_dir):
        for p in _stale_temps(lora_dir):
            with contextlib.suppress(OSError):
                os.unlink(p)
                temps.append(str(p))
        for d, m in list_backups(lora_dir):
            state = m.get("state") if m is not None else None
            if m is None or state == "preparing":
                say(f"removing {d} (a run killed before it changed anything)")
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
            elif state == "applying" and roll_back:
                say(f"rolling back the interrupted run {d.name}")
                restore(lora_dir, d, m, new_state="rolled-back", observer=observer)
                rolled.append(str(d))
    return RecoveryResult(rolled_back=tuple(rolled), removed_unstarted=tuple(removed),
                          removed_temp=tuple(temps))
