"""An in-memory overlay of the LoRA dir that fixers read from and write to while planning.

Several fixes can touch one file (LD208, LD301 and LD406 all edit `config.json`; LD104 creates
`non_lora_trainables.bin` and LD305 may then rename its keys). Each planner reads the file as the
earlier fixes left it and records its edit here; nothing reaches the disk. At the end,
`finalize()` turns every entry into one `FileChange` holding the exact bytes to write.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_doctor.artifacts import configs
from llava_doctor.errors import DoctorError
from llava_doctor.fixes.jsonedit import TRANSFORMERS_STYLE, dump_json, edit_json_text
from llava_doctor.fixes.plan import FileChange, FileOp

if TYPE_CHECKING:
    import torch

    from llava_doctor.checks.context import Context


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's content (following a symlink), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """`torch.save` of a plain `{str: Tensor}` dict: the only pickle content we ever write.

    Each tensor is detached and cloned into its own contiguous storage, so that a view into a
    larger (possibly memory-mapped) storage does not drag the whole storage into the file, and
    no `Parameter` or subclass reaches the pickle.
    """
    import torch

    plain: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"only str -> Tensor entries may be saved, got {type(k).__name__} -> "
                            f"{type(t).__name__}")
        plain[k] = t.detach().as_subclass(torch.Tensor).clone(
            memory_format=torch.contiguous_format)
    buf = io.BytesIO()
    torch.save(plain, buf)
    return buf.getvalue()


@dataclass
class _Entry:
    path: Path
    kind: str                     # "json" | "bytes" | "tensors" | "symlink"
    codes: list[str] = field(default_factory=list)
    text: str | None = None       # json
    data: bytes | None = None     # bytes
    tensors: dict[str, Any] | None = None
    link_target: str | None = None
    summary: str = ""


class Workspace:
    """The LoRA dir as the fixes planned so far would leave it."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        # Absolute, so that a plan made for "." still names the right files when applied.
        self.root = Path(os.path.abspath(ctx.path))
        self._entries: dict[Path, _Entry] = {}
        self.code = ""  # the fix currently planning; recorded on every entry it touches

    # --- paths -------------------------------------------------------------------------------
    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    def changed(self) -> set[str]:
        """Relative paths with a pending change."""
        return {self.rel(p) for p in self._entries}

    # --- reading -------------------------------------------------------------------------------
    def exists(self, rel: str | Path) -> bool:
        p = self.path(rel)
        return p in self._entries or p.exists()

    def is_pending(self, rel: str | Path) -> bool:
        return self.path(rel) in self._entries

    def json_text(self, rel: str | Path) -> str | None:
        """The text of a JSON file as planned so far (None if absent or unreadable)."""
        p = self.path(rel)
        e = self._entries.get(p)
        if e is not None:
            if e.kind == "json":
                return e.text
            if e.kind == "bytes" and e.data is not None:
                return e.data.decode("utf-8")
            return None
        if not p.is_file():
            return None
        try:
            configs.read_json(p)  # validates: readable, UTF-8, an object, not an LFS pointer
            return p.read_bytes().decode("utf-8")
        except (DoctorError, OSError, UnicodeDecodeError):
            return None

    def json(self, rel: str | Path) -> dict[str, Any] | None:
        """A fresh copy of a JSON object file as planned so far."""
        import json

        text = self.json_text(rel)
        if text is None:
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def tensors(self, rel: str | Path) -> dict[str, torch.Tensor] | None:
        """All tensors of a weight file as planned so far (None if absent or unreadable)."""
        p = self.path(rel)
        e = self._entries.get(p)
        if e is not None:
            return dict(e.tensors) if e.kind == "tensors" and e.tensors is not None else None
        return self.read_tensors(p)

    def read_tensors(self, path: Path | None) -> dict[str, torch.Tensor] | None:
        """Tensors of any weight file on disk, through the safe reader (None if unreadable)."""
        if path is None or not Path(path).is_file():
            return None
        wf = self.ctx.weight(Path(path))
        if wf is None:
            return None
        try:
            return dict(self.ctx.tensors(wf))
        except (DoctorError, KeyError, OSError, RuntimeError):
            return None

    def tensor_names(self, rel: str | Path) -> list[str] | None:
        """Tensor names without reading values when the file is untouched."""
        p = self.path(rel)
        e = self._entries.get(p)
        if e is not None:
            return list(e.tensors) if e.kind == "tensors" and e.tensors is not None else None
        if not p.is_file():
            return None
        wf = self.ctx.weight(p)
        return list(wf.tensors) if wf is not None else None

    def tensor_shapes(self, rel: str | Path) -> dict[str, tuple[int, ...]] | None:
        """name -> shape of a weight file as planned so far, from its header when untouched."""
        p = self.path(rel)
        e = self._entries.get(p)
        if e is not None:
            if e.kind != "tensors" or e.tensors is None:
                return None
            return {k: tuple(v.shape) for k, v in e.tensors.items()}
        if not p.is_file():
            return None
        wf = self.ctx.weight(p)
        return {k: tuple(t.shape) for k, t in wf.tensors.items()} if wf is not None else None

    # --- writing (in memory) ---------------------------------------------------------------
    def _entry(self, p: Path, kind: str) -> _Entry:
        e = self._entries.get(p)
        if e is None or e.kind != kind:
            prev_codes = e.codes if e is not None else []
            e = _Entry(path=p, kind=kind, codes=list(prev_codes))
            self._entries[p] = e
        if self.code and self.code not in e.codes:
            e.codes.append(self.code)
        return e

    def edit_json(self, rel: str | Path, edits: dict[str, Any]) -> None:
        """Set/delete top-level keys of an existing (or planned) JSON file, keeping its style."""
        text = self.json_text(rel)
        if text is None:
            raise ValueError(f"{self.path(rel)} is not a readable JSON object")
        new = edit_json_text(text, edits)
        e = self._entry(self.path(rel), "json")
        e.text = new

    def create_json(self, rel: str | Path, obj: dict[str, Any]) -> None:
        """A new JSON file in transformers' layout (indent 2, sorted keys, trailing newline)."""
        e = self._entry(self.path(rel), "json")
        e.text = dump_json(obj, TRANSFORMERS_STYLE)

    def copy_file(self, rel: str | Path, source: Path, *, json_file: bool = False) -> None:
        """Plan a byte-exact copy of `source` to `rel`."""
        data = Path(source).read_bytes()
        if json_file:
            e = self._entry(self.path(rel), "json")
            e.text = data.decode("utf-8")
        else:
            e = self._entry(self.path(rel), "bytes")
            e.data = data
        e.summary = f"copy of {source}"

    def put_bytes(self, rel: str | Path, data: bytes, summary: str = "") -> None:
        """Plan writing exactly ``data`` to `rel` (a file we built byte for byte)."""
        e = self._entry(self.path(rel), "bytes")
        e.data = data
        e.summary = summary

    def set_tensors(self, rel: str | Path, tensors: dict[str, torch.Tensor], summary: str = ""
                    ) -> None:
        """Plan a `torch.save` of exactly these tensors to `rel`."""
        e = self._entry(self.path(rel), "tensors")
        e.tensors = dict(tensors)
        if summary:
            e.summary = summary

    def symlink(self, path: Path, target: str) -> None:
        """Plan a new symlink at `path` (may be a sibling of the LoRA dir) pointing at `target`."""
        e = self._entry(path, "symlink")
        e.link_target = target

    # --- the end ---------------------------------------------------------------------------
    def finalize(self) -> list[FileChange]:
        """One FileChange per pending path whose final state differs from the disk."""
        out: list[FileChange] = []
        for p, e in self._entries.items():
            rel = self.rel(p)
            if e.kind == "symlink":
                if p.is_symlink() and os.readlink(p) == e.link_target:
                    continue
                out.append(FileChange(path=str(p), rel=rel, op=FileOp.symlink,
                                      link_target=e.link_target, codes=tuple(e.codes),
                                      summary=f"symlink -> {e.link_target}"))
                continue
            if e.kind == "json":
                assert e.text is not None
                content = e.text.encode("utf-8")
            elif e.kind == "bytes":
                assert e.data is not None
                content = e.data
            else:
                assert e.tensors is not None
                content = tensors_to_bytes(e.tensors)
            exists = p.exists() or p.is_symlink()
            before = p.read_bytes() if p.is_file() else None
            if before is not None and before == content and not p.is_symlink():
                continue
            diff = None
            if e.kind == "json":
                old = before.decode("utf-8", "replace") if before is not None else ""
                diff = "".join(difflib.unified_diff(
                    _ensure_nl(old), _ensure_nl(e.text or ""),
                    fromfile=f"a/{rel}" if before is not None else "/dev/null",
                    tofile=f"b/{rel}"))
            summary = e.summary
            if e.kind == "tensors" and e.tensors is not None:
                summary = (summary + "; " if summary else "") + _describe_tensors(e.tensors)
            out.append(FileChange(
                path=str(p), rel=rel, op=FileOp.replace if exists else FileOp.create,
                content=content, sha256_before=sha256_bytes(before) if before is not None else None,
                sha256_after=sha256_bytes(content),
                was_symlink=os.readlink(p) if p.is_symlink() else None,
                is_json=e.kind == "json", diff=diff, summary=summary, codes=tuple(e.codes),
                tensors={k: tuple(v.shape) for k, v in e.tensors.items()}
                if e.kind == "tensors" and e.tensors is not None else None))
        return out


def _ensure_nl(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def _describe_tensors(tensors: dict[str, Any]) -> str:
    names = list(tensors)
    shown = ", ".join(f"{n} {list(tensors[n].shape)} {str(tensors[n].dtype).removeprefix('torch.')}"
                      for n in names[:4])
    more = f", ... ({len(names)} tensors)" if len(names) > 4 else ""
    return f"torch.save of {len(names)} plain tensor(s): {shown}{more}"
