"""Plan an original-LLaVA model as a canonical llava-hf checkpoint, from headers alone.

Input is a `MergePlan` in LLaVA's names: the plan of a LoRA merge (`plan.build_plan`) or of an
already merged / fully fine-tuned checkpoint (`plan_model_dir`). Output is another `MergePlan`
that the same streaming executor writes and the same verifier checks: every tensor renamed by
the `hf_keys` table, the vocabulary rows padded, the vision tower's tensors added from the CLIP
directory unless the checkpoint carries its own (those are the model's weights: fine-tuned when
``unfreeze_mm_vision_tower`` was set, so they win).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from pathlib import Path

from llava_doctor.artifacts.hf_convert import Tower
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.artifacts.tensors import FLOAT_DTYPES, TORCH_TO_ST, dtype_size
from llava_doctor.errors import MergeError, UsageError
from llava_doctor.merge.hf_keys import EMBEDDINGS, LM_HEAD, to_canonical
from llava_doctor.merge.plan import (
    _DROP,
    DTYPES,
    MergePlan,
    PlannedTensor,
    Source,
    _dominant_float,
    _ordered_base,
    _shard,
)

PAD_MULTIPLE = 64  # the conversion scripts' `pad_to_multiple_of`


@dataclass(frozen=True)
class Vocab:
    """Ids of the two added tokens and the padded row count."""

    rows: int               # rows of the original embeddings (== tokenizer length)
    image_token_index: int  # <image>
    pad_token_id: int       # <pad>
    padded_rows: int        # rows + 2, rounded up to a multiple of 64

    @classmethod
    def after(cls, rows: int) -> Vocab:
        padded = -(-(rows + 2) // PAD_MULTIPLE) * PAD_MULTIPLE
        return cls(rows=rows, image_token_index=rows, pad_token_id=rows + 1, padded_rows=padded)


def plan_model_dir(md: ModelDir, *, dtype: str = "float16", max_shard_size: int = 5 * 10**9,
                   ) -> MergePlan:
    """A copy plan of a full model directory in its own names (no LoRA): what `convert` starts
    from. ``dtype`` "auto" keeps each tensor's dtype."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'", hint=f"choose one of: {', '.join(DTYPES)}")
    items = _ordered_base(md)
    files = {}
    dropped: dict[str, str] = {}
    planned: list[PlannedTensor] = []
    for wf, info in items:
        if _DROP.search(info.name):
            dropped[f"{wf.path.name}:{info.name}"] = "a buffer transformers recomputes at load"
            continue
        files[wf.path] = wf
        if info.dtype not in FLOAT_DTYPES or dtype == "auto":
            out_dt = info.dtype
        else:
            out_dt = TORCH_TO_ST[dtype]
        planned.append(PlannedTensor(name=info.name, dtype=out_dt, shape=info.shape,
                                     source=Source(wf.path, info.name, info, "base"),
                                     end=info.numel * dtype_size(out_dt)))
    if not planned:
        raise MergeError("holds no tensors", path=md.path, hint="pass the model directory")
    embed = next((t for t in planned if t.name == "model.embed_tokens.weight"), None)
    # No adapter: the executor only opens `adapter_path` for LoRA tensors, of which there are none.
    return MergePlan(shards=tuple(_shard(planned, max_shard_size)), out_dtype=dtype, files=files,
                     adapter_path=planned[0].source.file, lora_modules=0, replaced={},
                     projector_source=f"the checkpoint ({md.path})", dropped=dropped,
                     vocab_rows=embed.shape[0] if embed is not None else None)


def plan_llava_hf(plan: MergePlan, tower: Tower, vocab: Vocab, *, next_: bool,
                  max_shard_size: int = 5 * 10**9) -> MergePlan:
    """``plan`` (LLaVA names) rewritten as the canonical llava-hf checkpoint.

    Raises MergeError for a tensor with no llava-hf name (the LD8xx checks report those first).
    """
    out: list[PlannedTensor] = []
    dropped = dict(plan.dropped)
    notes = list(plan.notes)
    files = dict(plan.files)
    tensors = plan.tensors
    float_out = _dominant_float([replace(t.source.info, dtype=t.dtype) for t in tensors])
    own_tower = False
    for t in tensors:
        name = to_canonical(t.name)
        if name is None:
            raise MergeError(f"tensor '{t.name}' has no place in the llava-hf layout",
                             path=t.source.file, hint="check --to llava-hf explains (LD807)")
        if name == "image_newline" and not next_:
            dropped[f"{t.source.file.name}:{t.source.key}"] = \
                "image_newline, which a flat (LLaVA-1.5) llava-hf model does not use"
            continue
        if name.startswith("vision_tower."):
            own_tower = True
        if name in (EMBEDDINGS, LM_HEAD):
            if t.lora is not None or t.lora_bias is not None:
                raise MergeError(f"'{t.name}' gets a LoRA delta and new vocabulary rows; the "
                                 "streaming conversion cannot do both", path=plan.adapter_path,
                                 hint="merge with `llava-doctor merge` first, then `convert` "
                                      "the merged directory")
            if len(t.shape) != 2 or t.shape[0] != vocab.rows:
                raise MergeError(f"'{t.name}' has shape {list(t.shape)}, expected {vocab.rows} "
                                 "rows (the tokenizer's length)", path=t.source.file,
                                 hint="see LD806")
            shape = (vocab.padded_rows, t.shape[1])
            t = replace(t, shape=shape, pad_rows=vocab.padded_rows - vocab.rows, begin=0,
                        end=prod(shape) * dtype_size(t.dtype))
        out.append(replace(t, name=name, begin=0, end=t.nbytes))  # offsets: re-sharded below
    if own_tower:
        notes.append("vision tower: the weights saved in the checkpoint (LLaVA's merged "
                     f"output), not a fresh copy of {tower.path}")
    else:
        if not tower.tensors:
            raise MergeError("the vision tower directory holds no vision_model weights",
                             path=tower.path, hint="pass a CLIP checkpoint with its weights "
                                                   "(LD803)")
        for name, (wf, info) in tower.tensors.items():
            files[wf.path] = wf
            out_dt = info.dtype
            if info.dtype in FLOAT_DTYPES:
                # "auto" gives the tower the model's dtype, as LLaVA's builder casts it: a
                # float32 tower beside a float16 LLM loads in transformers 4.46 with a float16
                # projector behind a float32 tower, and the forward pass fails (measured).
                out_dt = float_out if plan.out_dtype == "auto" else TORCH_TO_ST[plan.out_dtype]
            out.append(PlannedTensor(name=name, dtype=out_dt, shape=info.shape,
                                     source=Source(wf.path, info.name, info, "vision_tower"),
                                     end=info.numel * dtype_size(out_dt)))
        notes.append(f"vision tower: {len(tower.tensors)} tensors from {tower.path}")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MergeError(f"two inputs land on '{dup}'", path=plan.adapter_path,
                         hint="this is a bug in the key map; please report it")
    notes.append(f"vocabulary: <image> = {vocab.image_token_index}, <pad> = "
                 f"{vocab.pad_token_id}; embeddings and lm_head padded from {vocab.rows} to "
                 f"{vocab.padded_rows} rows, each new row the mean of the existing rows")
    return replace(plan, shards=tuple(_shard(out, max_shard_size)), files=files,
                   dropped=dropped, notes=tuple(notes), vocab_rows=vocab.padded_rows)


def tower_file_paths(tower: Tower) -> list[Path]:
    """The tower's weight files (for messages and overlap checks)."""
    return sorted({wf.path for wf, _ in tower.tensors.values()})
