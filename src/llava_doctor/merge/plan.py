"""Plan a merge from headers alone: every output tensor, where its bytes come from, what LoRA
maths it gets, which shard it lands in and at which offset.

No tensor data is read here. The plan is a frozen value the executor streams through, the
verifier checks against, and tests can inspect.

Where an output tensor comes from, in LLaVA's own order of precedence (its builder loads the
base, then ``non_lora_trainables.bin`` over it, then the PEFT adapter, whose
``modules_to_save`` copies replace and whose LoRA deltas add to whatever is there by then):

1. the base model's tensor of that name;
2. replaced by the non-LoRA trainable LLaVA's builder (plus our key normalisations) puts there;
3. replaced by the adapter's full copy (``modules_to_save``, trained biases, saved embeddings);
4. plus the LoRA delta of the module, if the adapter has one.

New tensors the base lacks (the projector of a LoRA trained from vicuna, ``image_newline``)
come after the base's, from non_lora_trainables, or from the stage-1 projector when neither
the base nor non_lora_trainables has a projector.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from llava_doctor.artifacts.bounded_re import (
    Evaluation,
    config_patterns,
    evaluate,
    with_ancestors,
)
from llava_doctor.artifacts.discovery import Family
from llava_doctor.artifacts.llava import projector_keys
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.artifacts.peft_match import (
    PEFT_PREFIX,
    effective_r_alpha,
    module_scaling,
    parse_adapter_keys,
)
from llava_doctor.artifacts.peft_versions import FIELDS, non_default_math_fields, parse_version
from llava_doctor.artifacts.tensors import FLOAT_DTYPES, TORCH_TO_ST, TensorInfo, dtype_size
from llava_doctor.artifacts.weights import WeightFile
from llava_doctor.errors import DoctorError, MergeError, UsageError
from llava_doctor.merge.llava_parts import place_non_lora
from llava_doctor.merge.lora_math import LoraSpec
from llava_doctor.merge.writer import HeaderEntry, build_header

DTYPES = ("float16", "bfloat16", "float32", "auto")
# adapter_config.json fields whose non-default values the merge reproduces exactly.
SUPPORTED_MATH = frozenset({"fan_in_fan_out", "bias", "modules_to_save", "rank_pattern",
                            "alpha_pattern", "use_rslora", "use_dora", "lora_bias"})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE]\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
# Model types whose linear layers are transformers' Conv1D, stored (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2"})
FLOAT32_MAX = 3.4028234663852886e38
# Buffers transformers never saves (non-persistent since 4.3x) and recomputes at load.
_DROP = re.compile(r"\.rotary_emb\.inv_freq$")


def parse_size(text: str | int | float) -> int:
    """Bytes from '5GB', '500MB', '2GiB', '5e9' or a number (decimal units, like HF's)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _SIZE.match(str(text))
        if m is None:
            raise UsageError(f"cannot read size '{text}'", hint="write it like 5GB, 500MB or 2GiB")
        unit = (m.group(2) or "").upper().rstrip("B")
        value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise UsageError(f"size '{text}' is not positive", hint="write it like 5GB or 500MB")
    return int(value)


@dataclass(frozen=True)
class Source:
    """Where an output tensor's input bytes are: a tensor of one input file."""

    file: Path
    key: str
    info: TensorInfo
    origin: str  # "base" | "non_lora" | "projector" | "adapter" | "vision_tower"


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor."""

    name: str
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    source: Source
    lora: LoraSpec | None = None
    lora_bias: str | None = None     # adapter key of lora_B.bias
    bias_scaling: float = 0.0
    begin: int = 0                   # data offsets inside the shard's data region
    end: int = 0
    # Rows appended after the source's, each the mean of the source rows (computed in float64,
    # rounded once): the llava-hf conversion's new <image>/<pad> embedding and lm_head rows.
    pad_rows: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def needs_compute(self) -> bool:
        """Anything but a byte-for-byte copy (LoRA, a bias delta or a dtype change)."""
        return (self.lora is not None or self.lora_bias is not None or self.pad_rows > 0
                or self.dtype != self.source.info.dtype)


@dataclass(frozen=True)
class PlannedShard:
    filename: str
    header: bytes
    tensors: tuple[PlannedTensor, ...]

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def size(self) -> int:
        return len(self.header) + self.data_size


@dataclass(frozen=True)
class MergePlan:
    """Everything the executor needs, decided from headers only."""

    shards: tuple[PlannedShard, ...]
    out_dtype: str                    # "float16" | "bfloat16" | "float32" | "auto"
    files: dict[Path, WeightFile]     # every input file a tensor is read from
    adapter_path: Path
    lora_modules: int                 # LoRA modules applied (linear + embedding)
    replaced: dict[str, str]          # output name -> origin of a full replacement
    projector_source: str
    dropped: dict[str, str] = field(default_factory=dict)  # input key -> why it lands nowhere
    notes: tuple[str, ...] = ()
    vocab_rows: int | None = None
    renamed: dict[str, str] = field(default_factory=dict)  # non_lora key -> output name

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (what `total_size` in the index counts)."""
        return sum(s.data_size for s in self.shards)

    @property
    def file_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.filename for s in self.shards for t in s.tensors}


@dataclass
class MergeInputs:
    """The resolved inputs of a merge (headers read, nothing else)."""

    lora_dir: Path
    adapter: WeightFile
    adapter_config: dict[str, Any]
    lora_config: dict[str, Any] | None
    base_path: Path
    base: ModelDir
    base_config: dict[str, Any] | None = None
    non_lora: WeightFile | None = None
    projector: WeightFile | None = None
    projector_label: str = ""
    family: Family = Family.llava


def _refuse(message: str, *, path: Path | str | None = None, hint: str = "") -> MergeError:
    return MergeError(message, path=path, hint=hint)


def check_adapter_config(cfg: dict[str, Any], path: Path) -> None:
    """Refuse adapter variants whose merge this code cannot reproduce exactly (cf. LD206)."""
    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise _refuse(f"peft_type {peft_type} is not LoRA; only LoRA adapters can be merged",
                      path=path, hint="merge it with peft's own merge_and_unload")
    if cfg.get("r") is None or cfg.get("lora_alpha") is None:
        raise _refuse("adapter_config.json lacks r or lora_alpha, so the LoRA scaling is unknown",
                      path=path, hint="restore adapter_config.json from the training output")
    bad = {k: v for k, v in non_default_math_fields(cfg).items() if k not in SUPPORTED_MATH}
    unknown = {k: v for k, v in cfg.items()
               if k not in FIELDS and v not in (None, False, {}, [], "", 0)}
    if bad or unknown:
        shown = ", ".join(f"{k}={v!r}" for k, v in {**bad, **unknown}.items())
        raise _refuse(f"adapter uses {shown}, which the streaming merge cannot reproduce exactly "
                      "(LD206)", path=path,
                      hint="merge with peft's merge_and_unload on the exact training base, or "
                           "retrain without it")
    if cfg.get("use_dora") and cfg.get("lora_bias"):
        raise _refuse("adapter combines use_dora and lora_bias, which peft itself rejects",
                      path=path, hint="restore adapter_config.json from the training output")


def _ordered_base(md: ModelDir) -> list[tuple[WeightFile, TensorInfo]]:
    """Base tensors shard by shard, each shard in file order (sequential reads)."""
    probs = [p for p in md.problems]
    if probs:
        p = probs[0]
        raise _refuse(f"base model is incomplete: {p.detail}", path=p.path,
                      hint="copy or download the complete base model (LD401)")
    out: list[tuple[WeightFile, TensorInfo]] = []
    seen: set[str] = set()
    for name in md.shard_names:
        wf = md.shard(name)
        if isinstance(wf, DoctorError):
            raise MergeError(wf.message, path=wf.path, hint=wf.hint)
        infos = list(wf.tensors.values())
        if wf.is_safetensors:
            infos.sort(key=lambda i: i.offset or 0)
        for info in infos:
            if md.weight_map is not None and md.weight_map.get(info.name) != name:
                continue  # the index assigns this name to another shard: use that one
            if info.name in seen:
                continue
            seen.add(info.name)
            out.append((wf, info))
    return out


def _st(dtype_name: str) -> str:
    return TORCH_TO_ST[dtype_name]


def _dominant_float(infos: list[TensorInfo]) -> str:
    sizes: dict[str, int] = {}
    for i in infos:
        if i.dtype in FLOAT_DTYPES:
            sizes[i.dtype] = sizes.get(i.dtype, 0) + i.nbytes
    return max(sizes, key=lambda d: sizes[d]) if sizes else "F16"


@dataclass
class TargetTable:
    """The output tensors decided so far: name -> where the bytes come from. A family's planner
    fills it (base, then replacements, then LoRA) and `finish_plan` turns it into a MergePlan.
    """

    targets: dict[str, Source] = field(default_factory=dict)
    base_dtype: dict[str, str] = field(default_factory=dict)
    base_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    files: dict[Path, WeightFile] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    base_float: str = "F16"
    # embed_tokens / lm_head names: their rows may legitimately grow to `vocab` (added tokens).
    embed_names: tuple[str, str] = ("model.embed_tokens.weight", "lm_head.weight")
    vocab: int | None = None

    def may_resize(self, name: str, shape: tuple[int, ...]) -> bool:
        old = self.base_shape.get(name)
        return (name in self.embed_names and old is not None
                and len(shape) == 2 and len(old) == 2 and shape[1] == old[1]
                and self.vocab is not None and shape[0] == self.vocab)

    def put(self, name: str, src: Source) -> None:
        old = self.targets.get(name)
        if old is not None and old.info.shape != src.info.shape \
                and not self.may_resize(name, src.info.shape):
            raise _refuse(f"'{src.key}' has shape {list(src.info.shape)} but replaces '{name}' "
                          f"of shape {list(old.info.shape)}", path=src.file,
                          hint="this file was trained for another model; pass the base it was "
                               "trained on (LD402/LD403)")
        self.targets[name] = src
        if old is not None:
            self.replaced[name] = src.origin


def base_table(inputs: MergeInputs, rename: Callable[[str], str] = lambda n: n,
               **kw: Any) -> TargetTable:
    """Every base tensor, in read order, under its output name ``rename(name)``."""
    table = TargetTable(**kw)
    table.files[inputs.adapter.path] = inputs.adapter
    base_items = _ordered_base(inputs.base)
    for wf, info in base_items:
        if _DROP.search(info.name):
            table.dropped[f"{wf.path.name}:{info.name}"] = \
                "a buffer transformers recomputes at load"
            continue
        name = rename(info.name)
        table.files[wf.path] = wf
        table.targets[name] = Source(wf.path, info.name, info, "base")
        table.base_dtype[name] = info.dtype
        table.base_shape[name] = info.shape
    table.base_float = _dominant_float([i for _, i in base_items])
    return table


def build_plan(inputs: MergeInputs, *, dtype: str = "float16", max_shard_size: int = 5 * 10**9,
               force: bool = False) -> MergePlan:
    """Decide every output tensor of an original-LLaVA merge from headers. Raises MergeError
    for what cannot be merged."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'", hint=f"choose one of: {', '.join(DTYPES)}")
    check_adapter_config(inputs.adapter_config, inputs.lora_dir / "adapter_config.json")
    lora_cfg = inputs.lora_config or {}
    cfg_vocab = lora_cfg.get("vocab_size") if isinstance(lora_cfg.get("vocab_size"), int) else None

    # 1. base tensors, in read order
    table = base_table(inputs, vocab=cfg_vocab)
    targets, files, notes, dropped = table.targets, table.files, table.notes, table.dropped
    put = table.put

    # 2. non_lora_trainables, as LLaVA's builder (plus fix's normalisations) places them
    renamed: dict[str, str] = {}
    if inputs.non_lora is not None:
        nl = inputs.non_lora
        files[nl.path] = nl
        try:
            placement = place_non_lora(nl.tensors, inputs.lora_config)
        except ValueError as e:
            raise _refuse(str(e), path=nl.path, hint="keep one copy of each key (LD305)") from None
        renamed = placement.renamed
        if placement.dropped and not force:
            key, why = next(iter(placement.dropped.items()))
            more = f" (and {len(placement.dropped) - 1} more)" if len(placement.dropped) > 1 else ""
            raise _refuse(f"key '{key}'{more} {why}; LLaVA's loader would drop it silently",
                          path=nl.path, hint="run `llava-doctor fix` (LD305), or pass --force "
                                             "to merge without it")
        for key, why in placement.dropped.items():
            dropped[f"{nl.path.name}:{key}"] = why
        for name, key in placement.placed.items():
            put(name, Source(nl.path, key, nl.tensors[key], "non_lora"))

    # 3. the projector
    proj_names = [n for n in targets if n.startswith("model.mm_projector.")]
    if any(targets[n].origin == "non_lora" for n in proj_names):
        projector_source = f"non_lora_trainables.bin ({inputs.non_lora.path})"  # type: ignore[union-attr]
        if any(k in renamed for k in (targets[n].key for n in proj_names)):
            projector_source += ", keys normalised to LLaVA's names"
    elif proj_names:
        projector_source = f"base model ({inputs.base_path}; task LoRA, projector not retrained)"
    elif inputs.projector is not None:
        pw = inputs.projector
        rel = projector_keys(pw.tensors)
        if not rel:
            raise _refuse("the stage-1 projector file has no mm_projector keys", path=pw.path,
                          hint="pass the mm_projector.bin of the pretrain run (LD306)")
        files[pw.path] = pw
        for key, sub in rel.items():
            targets[f"model.mm_projector.{sub}"] = Source(pw.path, key, pw.tensors[key],
                                                          "projector")
        projector_source = (f"stage-1 projector {pw.path} ({inputs.projector_label or 'given'}): "
                            "neither non_lora_trainables.bin nor the base has one")
        notes.append(f"projector taken from the stage-1 file {pw.path}: the LoRA run saved none "
                     "and the base has none, so the merged projector is the pretrain one")
    else:
        projector_source = "none"
        notes.append("no projector in non_lora_trainables.bin, the base or a stage-1 file: the "
                     "merged model has no mm_projector (LD302)")

    # 4. the adapter
    def unmatched_reason(key: str) -> str | None:
        if "vision_tower" in key:
            # LLaVA delay-loads the tower, so its merge drops these too (F30); the merged
            # checkpoint carries no tower weights either.
            return "LoRA on the vision tower, which LLaVA reloads from mm_vision_tower"
        return None

    specs, bias_deltas = plan_adapter(table, inputs, force=force,
                                      unmatched_reason=unmatched_reason)
    return finish_plan(table, specs, bias_deltas, dtype=dtype, max_shard_size=max_shard_size,
                       adapter_path=inputs.adapter.path, projector_source=projector_source,
                       renamed=renamed)


def plan_adapter(table: TargetTable, inputs: MergeInputs, *, force: bool,
                 module_name: Callable[[str], str] = lambda m: m,
                 unmatched_reason: Callable[[str], str | None] = lambda k: None,
                 ) -> tuple[dict[str, LoraSpec], dict[str, tuple[str, float]]]:
    """Put the adapter's full tensors into ``table`` and decide its LoRA deltas (peft's maths).

    ``module_name`` maps an adapter module path (the training model's naming, which rank and
    alpha patterns are matched against) to the output module name. Returns the LoRA spec and
    the `lora_B.bias` delta of every output tensor that gets one.
    """
    targets, notes, dropped = table.targets, table.notes, table.dropped
    acfg = inputs.adapter_config
    apath = inputs.adapter.path
    akeys = parse_adapter_keys(inputs.adapter.tensors)
    if akeys.unprefixed:
        raise _refuse(f"adapter key '{akeys.unprefixed[0]}' lacks peft's '{PEFT_PREFIX}' prefix, "
                      "so peft would ignore it", path=apath,
                      hint="re-save the adapter with PeftModel.save_pretrained (LD207)")
    specs: dict[str, LoraSpec] = {}
    bias_deltas: dict[str, tuple[str, float]] = {}
    unmatched: list[str] = []
    use_dora = bool(acfg.get("use_dora"))
    # peft honours fan_in_fan_out only for transformers' Conv1D (GPT-2); on nn.Linear it warns
    # and resets it to False, so a Llama LoRA saved with it set is a plain LoRA.
    fifo = bool(acfg.get("fan_in_fan_out"))
    if fifo and (inputs.base_config or {}).get("model_type") not in CONV1D_MODEL_TYPES:
        fifo = False
        notes.append("adapter_config.json sets fan_in_fan_out, which peft ignores for nn.Linear "
                     "layers (it applies to GPT-2's Conv1D only); merged as peft does, without it")
    version = acfg.get("peft_version") if isinstance(acfg.get("peft_version"), str) else None
    matcher = _rank_patterns(acfg, akeys.modules, version, apath)
    if matcher.peft_version is None:
        version = None  # unreadable: the newest rules, as the checks assume
    ainfo = inputs.adapter.tensors

    def full(key: str, name: str) -> None:
        if name not in targets:
            unmatched.append(key)
            return
        table.put(name, Source(apath, key, ainfo[key], "adapter"))

    for module, am in akeys.modules.items():
        out = module_name(module)
        for key in am.other:
            if key == f"{PEFT_PREFIX}{module}.base_layer.weight":
                full(key, f"{out}.weight")  # the saved copy of a (resized) embedding layer
            else:
                raise _refuse(f"adapter key '{key}' is not a tensor peft's LoRA loader places",
                              path=apath, hint="this adapter type or layout cannot be merged "
                                               "exactly (LD206)")
        if am.weight is not None:
            full(am.weight, f"{out}.weight")
        if am.bias is not None:
            full(am.bias, f"{out}.bias")
        if am.is_lora and am.is_embedding_lora:
            raise _refuse(f"module '{module}' has both Linear and Embedding LoRA tensors",
                          path=apath, hint="the adapter file is inconsistent")
        if am.is_lora or am.is_embedding_lora:
            a = am.A or am.embedding_A
            b = am.B or am.embedding_B
            if a is None or b is None:
                raise _refuse(f"module '{module}' has only one of its two LoRA matrices",
                              path=apath, hint="the adapter file is incomplete (LD105)")
            target = f"{out}.weight"
            if target not in targets:
                unmatched.append(a)
                continue
            kind: Literal["linear", "embedding"] = (
                "embedding" if am.is_embedding_lora else "linear")
            A, B = ainfo[a], ainfo[b]
            if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[0] != B.shape[1]:
                raise _refuse(f"LoRA matrices of '{module}' have shapes {list(A.shape)} and "
                              f"{list(B.shape)}, which do not multiply", path=apath,
                              hint="conv or otherwise reshaped LoRAs cannot be merged here (LD206)")
            r, alpha = effective_r_alpha(acfg, module, version, matcher=matcher)
            if A.shape[0] != r:
                raise _refuse(f"lora_A of '{module}' has rank {A.shape[0]} but adapter_config.json "
                              f"gives r={r} for it (r / rank_pattern), so peft would refuse to "
                              "load "
                              "it", path=apath, hint="restore the adapter_config.json of this run "
                                                     "(LD203)")
            spec = LoraSpec(module=module, kind=kind, a=a, b=b, r=r, alpha=float(alpha),
                            scaling=_scaling(acfg, module, version, matcher, apath),
                            fan_in_fan_out=fifo and kind == "linear",
                            magnitude=am.magnitude if use_dora else None)
            tshape = targets[target].info.shape
            want = (A.shape[1], B.shape[0]) if spec.transposed else (B.shape[0], A.shape[1])
            if tshape != want:
                raise _refuse(f"LoRA of '{module}' gives a delta of shape {list(want)} but "
                              f"'{target}' has shape {list(tshape)}", path=apath,
                              hint="pass the base the LoRA was trained on (LD203)")
            if targets[target].info.dtype not in FLOAT_DTYPES:
                raise _refuse(f"'{target}' is stored as {targets[target].info.dtype}, not a float "
                              "type; a quantized base cannot be merged into exactly", path=apath,
                              hint="merge into the unquantized fp16/bf16 base (LD208)")
            if use_dora:
                if am.magnitude is None:
                    raise _refuse(f"use_dora is set but module '{module}' has no "
                                  "lora_magnitude_vector", path=apath,
                                  hint="the adapter file is incomplete")
                m = ainfo[am.magnitude]
                if m.numel != B.shape[0]:
                    raise _refuse(f"lora_magnitude_vector of '{module}' has {m.numel} values for "
                                  f"{B.shape[0]} output features", path=apath,
                                  hint="the adapter file is inconsistent")
            elif am.magnitude is not None and not force:
                raise _refuse(f"module '{module}' has a lora_magnitude_vector but use_dora is "
                              "false; peft would merge it as plain LoRA", path=apath,
                              hint="restore adapter_config.json (use_dora), or --force to merge "
                                   "as plain LoRA like peft")
            specs[target] = spec
        elif am.magnitude is not None:
            raise _refuse(f"module '{module}' has a DoRA magnitude but no LoRA matrices",
                          path=apath, hint="the adapter file is incomplete")
        if am.lora_bias is not None:
            target = f"{out}.bias"
            if target not in targets:
                raise _refuse(f"'{am.lora_bias}' needs a base bias '{target}', which the base "
                              "lacks (peft raises the same)", path=apath,
                              hint="lora_bias adapters need a base with biases")
            scaling = _scaling(acfg, module, version, matcher, apath)
            if targets[target].info.shape != ainfo[am.lora_bias].shape:
                raise _refuse(f"'{am.lora_bias}' does not match '{target}' in shape", path=apath,
                              hint="pass the base the LoRA was trained on (LD203)")
            bias_deltas[target] = (am.lora_bias, scaling)

    for key in unmatched:
        why = unmatched_reason(key)
        if why is not None:
            dropped[f"{apath.name}:{key}"] = why
        elif force:
            dropped[f"{apath.name}:{key}"] = "adapter key with no base tensor"
        else:
            raise _refuse(f"adapter key '{key}' matches no tensor of the base (or "
                          f"{len(unmatched) - 1} others too); peft would drop it silently",
                          path=apath, hint="pass the base the LoRA was trained on (LD207), or "
                                           "--force to merge without them")
    if not specs and not bias_deltas:
        notes.append("the adapter holds no LoRA tensors: the merged model is the base plus the "
                     "LLaVA parts only (LD105)")
    return specs, bias_deltas


def finish_plan(table: TargetTable, specs: dict[str, LoraSpec],
                bias_deltas: dict[str, tuple[str, float]], *, dtype: str, max_shard_size: int,
                adapter_path: Path, projector_source: str,
                renamed: dict[str, str] | None = None) -> MergePlan:
    """Output dtypes, order and shards: the MergePlan the streaming writer and the verifier use,
    whichever family's planner filled the table."""
    dropped, notes = table.dropped, table.notes
    if dropped:
        notes.append(f"{len(dropped)} input tensor(s) not carried over: "
                     + "; ".join(f"{k} ({v})" for k, v in list(dropped.items())[:3])
                     + (" ..." if len(dropped) > 3 else ""))
    planned: list[PlannedTensor] = []
    for name, src in table.targets.items():
        info = src.info
        if info.dtype not in FLOAT_DTYPES:
            out_dt = info.dtype
        elif dtype == "auto":
            out_dt = table.base_dtype.get(name, table.base_float)
            if out_dt not in FLOAT_DTYPES:
                out_dt = table.base_float
        else:
            out_dt = _st(dtype)
        lb = bias_deltas.get(name)
        planned.append(PlannedTensor(name=name, dtype=out_dt, shape=info.shape, source=src,
                                     lora=specs.get(name), lora_bias=lb[0] if lb else None,
                                     bias_scaling=lb[1] if lb else 0.0,
                                     end=info.numel * dtype_size(out_dt)))
    shards = _shard(planned, max_shard_size)
    embed = table.targets.get(table.embed_names[0])
    return MergePlan(shards=tuple(shards), out_dtype=dtype, files=table.files,
                     adapter_path=adapter_path, lora_modules=len(specs),
                     replaced=table.replaced, projector_source=projector_source,
                     dropped=dropped, notes=tuple(notes),
                     vocab_rows=embed.info.shape[0] if embed is not None else None,
                     renamed=renamed or {})


@dataclass(frozen=True)
class _PatternMatcher:
    """The rank/alpha pattern keys evaluated with a time bound over the adapter's modules."""

    ev: Evaluation
    peft_version: tuple[int, int, int] | None

    def __call__(self, use: str, pattern: str, name: str) -> str | None:
        return self.ev(use, pattern, name)


def _rank_patterns(acfg: dict[str, Any], modules: Iterable[str], version: str | None,
                   apath: Path) -> _PatternMatcher:
    """Evaluate rank_pattern/alpha_pattern keys as peft would, refusing one over budget (LD210)
    or invalid (peft raises re.error) before any output is planned."""
    try:
        v = parse_version(version) if version else None
    except ValueError:
        v = None
    uses = [u for u in config_patterns(acfg, v) if u.field in ("rank_pattern", "alpha_pattern")]
    names = with_ancestors(modules)
    ev = evaluate(uses, names) if uses else Evaluation(names=frozenset(names))
    cfg_path = apath.parent / "adapter_config.json"
    for verdict in ev.verdicts.values():
        if verdict.status in ("over-budget", "not-evaluated"):
            raise _refuse(f"{verdict.describe()} (LD210)", path=cfg_path,
                          hint="replace the pattern with the module names it was meant to select")
        if verdict.status == "invalid":
            raise _refuse(f"{verdict.describe()}: peft fails with re.error", path=cfg_path,
                          hint="correct the pattern (LD203)")
    return _PatternMatcher(ev, v)


def _scaling(acfg: dict[str, Any], module: str, version: str | None, matcher: _PatternMatcher,
             apath: Path) -> float:
    """peft's scaling for ``module``, refused when a float32 delta cannot hold it (LD205)."""
    r, alpha = effective_r_alpha(acfg, module, version, matcher=matcher)
    try:
        scaling = module_scaling(acfg, module, version, matcher=matcher)
    except (ZeroDivisionError, ValueError, TypeError, OverflowError):
        scaling = math.nan
    if not math.isfinite(scaling) or abs(scaling) > FLOAT32_MAX:
        raise _refuse(f"the LoRA scaling of '{module}' (lora_alpha {alpha!r}, r {r!r}) is "
                      f"{scaling!r}, beyond float32's range: every nonzero delta would be inf or "
                      "NaN (LD205)", path=apath.parent / "adapter_config.json",
                      hint="restore adapter_config.json's r and lora_alpha from the training run")
    return scaling


def _shard(tensors: list[PlannedTensor], max_shard_size: int) -> list[PlannedShard]:
    """Roll shards by byte size (a tensor larger than the limit gets a shard of its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards: list[PlannedShard] = []
    for i, group in enumerate(groups, start=1):
        header, offsets = build_header(HeaderEntry(t.name, t.dtype, t.shape, t.nbytes)
                                       for t in group)
        placed = tuple(replace(t, begin=b, end=e) for t, (b, e) in zip(group, offsets, strict=True))
        shards.append(PlannedShard(f"model-{i:05d}-of-{n:05d}.safetensors", header, placed))
    return shards
