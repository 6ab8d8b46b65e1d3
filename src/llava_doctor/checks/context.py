"""Everything the checks of one target may look at, read lazily and once.

Reading a file that turns out broken records the error (LD501/LD502/LD504 report it) and gives
the other checks `None`, so one broken file never stops the rest of the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_doctor.artifacts import configs
from llava_doctor.artifacts.configs import AdapterConfig, GenerationConfig, ModelConfig
from llava_doctor.artifacts.discovery import (
    ADAPTER_WEIGHTS,
    LORA_KINDS,
    NON_LORA,
    PROJECTOR,
    STATE_DIR,
    DirKind,
    Family,
    base_family,
    classify,
    lora_family,
)
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.artifacts.tensor_stats import TensorStats
from llava_doctor.artifacts.weights import WeightFile, load_tensors, read_weight_file
from llava_doctor.errors import DoctorError
from llava_doctor.models import Consumer

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class Options:
    """What the user told us beyond the LoRA dir."""

    base: Path | None = None
    projector: Path | None = None
    peft_version: str | None = None
    # The transformers that will load the adapter or the merged model (None: unknown).
    transformers_version: str | None = None
    fast: bool = False        # headers only: no tensor values read
    scan_base: bool = False   # also read base tensor values
    out: Path | None = None   # merge target, for the preflight checks
    to: str | None = None     # "llava-hf": also check what a conversion would need (LD8xx)
    vision_tower: Path | None = None  # the CLIP dir for --to llava-hf
    # Whose merge the severities are for (`check --merge-with`); None: `default_consumer` of
    # each target. Inside a check run it is always resolved (see `Context.consumer`).
    consumer: Consumer | None = None


def default_consumer(kind_or_family: object = None) -> Consumer:
    """The consumer a target's severities are for when the user names none.

    Every target today is an original-LLaVA run (or a piece of one): its merge is LLaVA's own
    `merge_lora_weights.py`. A llava-hf family (merged with peft's `merge_and_unload` on
    transformers' class) maps to `Consumer.peft` here, in this one place.
    """
    value = getattr(kind_or_family, "value", kind_or_family)
    if isinstance(value, str) and value in ("llava-hf", "llava_hf"):
        return Consumer.peft
    return Consumer.llava


@dataclass(frozen=True)
class CheckEvent:
    """Progress of a `check` run, sent to the observer the caller passes (the CLI draws it).

    ``phase`` is "target" (a target starts), "check" (check ``code`` starts) or "read"
    (``bytes_done`` of the ``bytes_total`` value bytes of ``file`` are read).
    """

    target: Path
    phase: str
    code: str | None = None
    file: Path | None = None
    bytes_done: int = 0
    bytes_total: int = 0


Observer = Callable[[CheckEvent], None]


@dataclass
class Resolved:
    """A path we found on our own, and how (reported so the user knows what was used)."""

    path: Path | None
    source: str  # "--base", "adapter_config.json", "hf-cache", "sibling *-pretrain", "none", ...
    note: str = ""


@dataclass
class Context:
    path: Path
    options: Options = field(default_factory=Options)
    file_errors: dict[Path, DoctorError] = field(default_factory=dict)
    observer: Observer | None = field(default=None, repr=False)
    _tensor_cache: dict[tuple[Path, str], Any] = field(default_factory=dict, repr=False)
    _stats_cache: dict[Path, dict[str, TensorStats]] = field(default_factory=dict, repr=False)
    # Results several checks share that are costly or bounded in time (e.g. the evaluation of
    # the config's regex patterns, which may take a budget): computed once per target.
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    # --- the target -------------------------------------------------------------------------
    @cached_property
    def kind(self) -> DirKind:
        return classify(self.path)

    @property
    def consumer(self) -> Consumer:
        """Whose merge this run's severities (and consumer-specific wording) are for."""
        if self.options.consumer is not None:
            return self.options.consumer
        return default_consumer(self.family if self.kind in LORA_KINDS else None)

    @cached_property
    def family(self) -> Family:
        """Original LLaVA or llava-hf, from this dir's files (`discovery.lora_family`)."""
        keys = list(self.adapter.tensors) if self.adapter_path is not None and \
            self.adapter is not None else []
        return lora_family(self.path, keys)

    @cached_property
    def base_family(self) -> Family | None:
        """llava-hf, original LLaVA or plain LLM for the resolved base (None: no base config)."""
        cfg = self.base_config
        if cfg is None:
            return None
        names = self.base.tensor_names if self.base is not None else ()
        return base_family(cfg.raw(), names)

    @cached_property
    def names(self) -> set[str]:
        try:
            return {e.name for e in os.scandir(self.path) if e.name != STATE_DIR}
        except OSError:
            return set()

    def file(self, name: str) -> Path | None:
        return self.path / name if name in self.names else None

    def _read(self, path: Path | None, reader: Any) -> Any:
        if path is None:
            return None
        if path in self.file_errors:
            return None
        try:
            return reader(path)
        except DoctorError as e:
            self.file_errors[path] = e
            return None

    # --- configs -----------------------------------------------------------------------------
    @cached_property
    def config(self) -> ModelConfig | None:
        return self._read(self.file("config.json"), configs.load_model_config)

    @cached_property
    def adapter_config(self) -> AdapterConfig | None:
        return self._read(self.file("adapter_config.json"), configs.load_adapter_config)

    @cached_property
    def adapter_config_raw(self) -> dict[str, Any] | None:
        return self._read(self.file("adapter_config.json"), configs.read_json)

    # --- weights in the LoRA dir ---------------------------------------------------------------
    @cached_property
    def adapter_paths(self) -> list[Path]:
        return [self.path / n for n in ADAPTER_WEIGHTS if n in self.names]

    @cached_property
    def adapter_path(self) -> Path | None:
        """The adapter file peft would load (safetensors first, as peft >= 0.4 does)."""
        return self.adapter_paths[0] if self.adapter_paths else None

    @cached_property
    def adapter(self) -> WeightFile | None:
        return self.weight(self.adapter_path)

    @cached_property
    def non_lora_path(self) -> Path | None:
        return self.file(NON_LORA)

    @cached_property
    def non_lora(self) -> WeightFile | None:
        return self.weight(self.non_lora_path)

    def weight(self, path: Path | None) -> WeightFile | None:
        """Header of a weight file, or None (the error is recorded for LD501/502/504)."""
        return self._read(path, read_weight_file)

    def tensors(self, wf: WeightFile, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Values as torch tensors, cached per file; only after the header (and pickle walk)
        passed. For `fix`, which writes with torch; the checks read values with numpy
        (`all_stats`, `paired_values`) and never import torch."""
        wanted = list(wf.tensors) if names is None else names
        missing = [n for n in wanted if (wf.path, n) not in self._tensor_cache]
        if missing:
            for k, v in load_tensors(wf, missing).items():
                self._tensor_cache[(wf.path, k)] = v
        return {n: self._tensor_cache[(wf.path, n)] for n in wanted}

    def all_stats(self, wf: WeightFile) -> dict[str, TensorStats]:
        """NaN/Inf count, largest finite magnitude and all-zero flag of every tensor of a file.

        Computed in one streaming pass per file, in bounded chunks with numpy (tensor values
        are not kept), and shared by every value check (LD204, LD205, LD503).
        """
        if wf.path not in self._stats_cache:
            from llava_doctor.artifacts.values import file_stats

            self._stats_cache[wf.path] = file_stats(wf, progress=self._reading(wf.path))
        return self._stats_cache[wf.path]

    def paired_values(self, a: WeightFile, name_a: str, b: WeightFile, name_b: str,
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decoded values of two same-shaped tensors side by side, a bounded chunk at a time."""
        from llava_doctor.artifacts.values import paired_values

        total = a.tensors[name_a].nbytes + b.tensors[name_b].nbytes
        report = self._reading(a.path)
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if report is not None:
                report(min(done, total), total)

        return paired_values(a, name_a, b, name_b, progress=step)

    def _reading(self, path: Path) -> Callable[[int, int], None] | None:
        observer = self.observer
        if observer is None:
            return None
        return lambda done, total: observer(CheckEvent(self.path, "read", file=path,
                                                       bytes_done=done, bytes_total=total))

    @property
    def read_values(self) -> bool:
        return not self.options.fast

    # --- the base model ----------------------------------------------------------------------
    @cached_property
    def base_resolved(self) -> Resolved:
        if self.options.base is not None:
            return Resolved(self.options.base, "--base")
        recorded = self.adapter_config.base_model_name_or_path if self.adapter_config else None
        if recorded:
            p = Path(recorded).expanduser()
            if not p.is_absolute():
                p = (self.path / p) if (self.path / p).is_dir() else p
            if p.is_dir():
                return Resolved(p, "adapter_config.json")
            cached = _hf_cache_lookup(recorded)
            if cached is not None:
                return Resolved(cached, "hf-cache", f"{recorded} from the local Hugging Face cache")
            return Resolved(None, "none", f"adapter_config.json names '{recorded}', which is "
                            "neither a local directory nor in the local Hugging Face cache")
        return Resolved(None, "none", "adapter_config.json records no base model")

    @cached_property
    def base_path(self) -> Path | None:
        return self.base_resolved.path

    @cached_property
    def base_config(self) -> ModelConfig | None:
        if self.base_path is None:
            return None
        return self._read(self.base_path / "config.json", configs.load_model_config) \
            if (self.base_path / "config.json").is_file() else None

    @cached_property
    def base(self) -> ModelDir | None:
        if self.base_path is None or not self.base_path.is_dir():
            return None
        try:
            return ModelDir.find(self.base_path)
        except DoctorError as e:
            self.file_errors[Path(e.path or self.base_path)] = e
            return None

    @cached_property
    def base_generation_config(self) -> GenerationConfig | None:
        if self.base_path is None:
            return None
        p = self.base_path / "generation_config.json"
        return self._read(p, configs.load_generation_config) if p.is_file() else None

    @cached_property
    def to_hf_problems(self) -> list[Any]:
        """What cannot map onto llava-hf (`artifacts.hf_convert.Problem`s), computed once."""
        from llava_doctor.checks.to_hf import problems_for

        return problems_for(self)

    # --- the stage-1 projector ---------------------------------------------------------------
    @cached_property
    def projector_resolved(self) -> Resolved:
        if self.options.projector is not None:
            return Resolved(self.options.projector, "--projector")
        run_dir = self.path.parent if self.kind == DirKind.checkpoint else self.path
        for parent in (run_dir.parent,):
            try:
                cands = sorted(p for p in parent.glob(f"*-pretrain/{PROJECTOR}") if p.is_file())
            except OSError:
                cands = []
            if len(cands) == 1:
                return Resolved(cands[0], "sibling *-pretrain",
                                f"using the stage-1 projector {cands[0]} found beside the run")
            if len(cands) > 1:
                return Resolved(None, "ambiguous", "several *-pretrain/mm_projector.bin beside "
                                "the run: pass --projector")
        return Resolved(None, "none", "no --projector given and no *-pretrain/mm_projector.bin "
                        "beside the run")

    @cached_property
    def projector(self) -> WeightFile | None:
        return self.weight(self.projector_resolved.path)


def _hf_cache_lookup(repo_id: str) -> Path | None:
    """A hub id's snapshot dir in the local Hugging Face cache, offline, via huggingface_hub."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return None
    try:
        # Read the cache location at call time (HF_HUB_CACHE / HF_HOME may be set after import).
        info = scan_cache_dir(os.environ.get("HF_HUB_CACHE") or None)
    except Exception:  # no cache dir, unreadable cache: nothing cached
        return None
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            revs = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
            for rev in revs:
                if (Path(rev.snapshot_path) / "config.json").is_file():
                    return Path(rev.snapshot_path)
    return None
