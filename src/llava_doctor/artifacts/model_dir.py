"""Hugging Face model directories: sharded or single-file, safetensors or torch `.bin`.

The index is read first; each shard's header is read on demand and cached. Problems (a shard
the index names but the disk lacks, a tensor the index promises that its shard does not hold,
an unreadable shard) are values, so one bad shard never stops the others from being checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from llava_doctor.artifacts.configs import read_json
from llava_doctor.artifacts.tensors import TensorInfo
from llava_doctor.artifacts.weights import WeightFile, read_weight_file
from llava_doctor.errors import DoctorError, FileCorruptError

# In transformers' order of preference.
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass(frozen=True)
class DirProblem:
    """Something wrong with a model directory's weights."""

    kind: str  # missing-shard | missing-tensor | unreadable-shard | bad-index
    path: Path
    detail: str
    error: DoctorError | None = None
    tensors: tuple[str, ...] = ()


@dataclass
class ModelDir:
    """Weights of one model directory, headers only."""

    path: Path
    index_path: Path | None
    shard_names: list[str]
    weight_map: dict[str, str] | None  # tensor -> shard (None without an index)
    index_total_size: int | None = None
    _headers: dict[str, WeightFile | DoctorError] = field(default_factory=dict, repr=False)

    @classmethod
    def find(cls, path: Path | str) -> ModelDir | None:
        """The directory's weights per transformers' preference, or None when it has none."""
        path = Path(path)
        for index_name, single in WEIGHT_LAYOUTS:
            index = path / index_name
            if index.is_file():
                data = read_json(index)
                wm = data.get("weight_map")
                if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                    raise FileCorruptError("has no valid weight_map", path=index,
                                           rule="invalid-index",
                                           hint="restore the index file from the model's source")
                shards = sorted(set(wm.values()))
                meta = data.get("metadata") or {}
                total = meta.get("total_size") if isinstance(meta, dict) else None
                return cls(path=path, index_path=index, shard_names=shards, weight_map=dict(wm),
                           index_total_size=total if isinstance(total, int) else None)
            if (path / single).is_file():
                return cls(path=path, index_path=None, shard_names=[single], weight_map=None)
        return None

    @property
    def is_safetensors(self) -> bool:
        return bool(self.shard_names) and self.shard_names[0].endswith(".safetensors")

    def shard(self, name: str) -> WeightFile | DoctorError:
        """Header of one shard, or the error that reading it raised."""
        if name not in self._headers:
            p = self.path / name
            if not p.is_file():
                self._headers[name] = FileCorruptError(
                    "is named by the index but does not exist", path=p, rule="missing-shard",
                    hint="copy or download the missing shard")
            else:
                try:
                    self._headers[name] = read_weight_file(p)
                except DoctorError as e:
                    self._headers[name] = e
        return self._headers[name]

    @cached_property
    def tensors(self) -> dict[str, tuple[WeightFile, TensorInfo]]:
        """Every readable tensor, mapped to its file and header entry."""
        out: dict[str, tuple[WeightFile, TensorInfo]] = {}
        for name in self.shard_names:
            wf = self.shard(name)
            if isinstance(wf, WeightFile):
                for tname, info in wf.tensors.items():
                    out[tname] = (wf, info)
        return out

    @cached_property
    def tensor_names(self) -> set[str]:
        """Names this model promises: the index's keys, else the single file's tensors."""
        if self.weight_map is not None:
            return set(self.weight_map)
        return set(self.tensors)

    def info(self, name: str) -> TensorInfo | None:
        hit = self.tensors.get(name)
        return hit[1] if hit else None

    @cached_property
    def problems(self) -> list[DirProblem]:
        probs: list[DirProblem] = []
        for name in self.shard_names:
            wf = self.shard(name)
            if isinstance(wf, DoctorError):
                kind = "missing-shard" if getattr(wf, "rule", "") == "missing-shard" \
                    else "unreadable-shard"
                promised = tuple(sorted(k for k, v in (self.weight_map or {}).items() if v == name))
                probs.append(DirProblem(kind, self.path / name, str(wf.message), wf, promised))
                continue
            if self.weight_map is not None:
                missing = sorted(k for k, v in self.weight_map.items()
                                 if v == name and k not in wf.tensors)
                if missing:
                    probs.append(DirProblem(
                        "missing-tensor", wf.path,
                        f"lacks {len(missing)} tensor(s) the index promises, e.g. '{missing[0]}'",
                        tensors=tuple(missing)))
        return probs

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())
