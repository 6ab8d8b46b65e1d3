"""`llava-doctor inspect`: what a weight file or directory holds, from headers alone."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from llava_doctor.artifacts.discovery import classify
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.artifacts.weights import read_weight_file
from llava_doctor.errors import DoctorError, UsageError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class TensorRow(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    dtype: str
    shape: list[int]
    bytes: int


class FileReport(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str
    format: str | None = None
    error: str | None = None
    tensors: list[TensorRow] = []
    tensor_count: int = 0
    total_bytes: int = 0
    params: int = 0


class InspectReport(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str
    kind: str
    family: str | None = None   # llava | llava-hf | llm (directories the family applies to)
    layout: str | None = None   # llava-hf key layout of the weights (artifacts.hf_layout)
    files: list[FileReport]
    tensor_count: int
    total_bytes: int
    params: int


def _file(path: Path) -> FileReport:
    try:
        wf = read_weight_file(path)
    except DoctorError as e:
        return FileReport(path=str(path), error=e.one_line())
    rows = [TensorRow(name=t.name, dtype=t.dtype, shape=list(t.shape), bytes=t.nbytes)
            for t in wf.tensors.values()]
    return FileReport(path=str(path), format=wf.format, tensors=rows, tensor_count=len(rows),
                      total_bytes=sum(r.bytes for r in rows),
                      params=sum(t.numel for t in wf.tensors.values()))


def inspect_path(path: Path | str) -> InspectReport:
    """Headers of a weight file, or of every weight file in a directory (shards in index order)."""
    path = Path(path)
    if not path.exists():
        raise UsageError("does not exist", path=path, hint="check the path")
    kind = classify(path) if path.is_dir() else "file"
    if path.is_file():
        files = [_file(path)]
    else:
        names: list[Path] = []
        try:
            md = ModelDir.find(path)
        except DoctorError:
            md = None
        if md is not None:
            names += [path / s for s in md.shard_names if (path / s).is_file()]
        names += sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                        and p not in names)
        files = [_file(p) for p in names]
    family, layout = _family(path, kind, files) if path.is_dir() else (None, None)
    return InspectReport(path=str(path), kind=getattr(kind, "value", kind), family=family,
                         layout=layout, files=files,
                         tensor_count=sum(f.tensor_count for f in files),
                         total_bytes=sum(f.total_bytes for f in files),
                         params=sum(f.params for f in files))


def _family(path: Path, kind: object, files: list[FileReport]) -> tuple[str | None, str | None]:
    """The run's or model's family, and for llava-hf the key layout, from the files."""
    from llava_doctor.artifacts import hf_layout
    from llava_doctor.artifacts.configs import read_json
    from llava_doctor.artifacts.discovery import (
        LORA_KINDS,
        DirKind,
        Family,
        base_family,
        lora_family,
    )

    keys = [t.name for f in files for t in f.tensors]
    fam: Family | None
    if kind in LORA_KINDS:
        fam = lora_family(path, keys)
        lay = hf_layout.detect_adapter_layout(keys) if fam == Family.llava_hf else None
    elif kind == DirKind.model and (path / "config.json").is_file():
        try:
            fam = base_family(read_json(path / "config.json"), keys)
        except DoctorError:
            return None, None
        lay = hf_layout.detect_layout(keys) if fam == Family.llava_hf else None
    else:
        return None, None
    return (fam.value if fam is not None else None), (lay.value if lay is not None else None)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def render_inspect_text(rep: InspectReport, max_rows: int = 50) -> str:
    what = ", ".join(x for x in (rep.kind, rep.family,
                                 f"{rep.layout} key layout" if rep.layout else None) if x)
    lines = [f"{rep.path}  ({what})"]
    for f in rep.files:
        if f.error:
            lines.append(f"  {f.path}: ERROR {f.error}")
            continue
        lines.append(f"  {f.path}  [{f.format}]  {f.tensor_count} tensors, {f.params:,} params, "
                     f"{_human(f.total_bytes)}")
        w = max((len(t.name) for t in f.tensors[:max_rows]), default=0)
        for t in f.tensors[:max_rows]:
            lines.append(f"    {t.name:<{w}}  {t.dtype:<5} {str(t.shape):<20} {_human(t.bytes)}")
        if len(f.tensors) > max_rows:
            lines.append(f"    … {len(f.tensors) - max_rows} more (use --all or --format json)")
    lines.append(f"total: {rep.tensor_count} tensors, {rep.params:,} params, "
                 f"{_human(rep.total_bytes)}")
    return "\n".join(lines) + "\n"
