"""LD8xx: can this original-LLaVA run or checkpoint be written as a llava-hf checkpoint?

Only with ``--to llava-hf`` (``check --to llava-hf``, and always in ``convert`` and
``merge --to llava-hf``, which refuse on any of them before writing anything). The analysis is
`artifacts.hf_convert.conversion_problems`, computed once per target; each check reports its
own code from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.configs import read_json
from llava_doctor.artifacts.discovery import LORA_KINDS, DirKind
from llava_doctor.artifacts.hf_convert import (
    Problem,
    Tower,
    conversion_problems,
    read_tower,
    resolve_tower,
)
from llava_doctor.artifacts.llava import builder_rewrite
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.checks.base import Hit, Skip, check
from llava_doctor.checks.context import Context
from llava_doctor.errors import DoctorError
from llava_doctor.models import Severity

TO_HF = "llava-hf"


def problems_for(ctx: Context) -> list[Problem]:
    """`conversion_problems` of a target: a full model dir, or a LoRA run with its base."""
    cfg_path = ctx.file("config.json")
    if cfg_path is None:
        return []  # LD101 / LD401 say so
    try:
        cfg = read_json(cfg_path)
    except DoctorError:
        return []  # LD501 reports the unreadable file
    shapes: dict[str, tuple[int, ...]] = {}
    if ctx.kind in LORA_KINDS:
        tok_dir = ctx.base_path
        if ctx.base is not None:
            shapes.update({n: i.shape for n, (_, i) in ctx.base.tensors.items()})
        if ctx.non_lora is not None:
            nl = ctx.non_lora.tensors
            shapes.update({v: nl[k].shape for k, v in builder_rewrite(nl).items()})
        if not any(n.startswith("model.mm_projector.") for n in shapes) and ctx.projector:
            shapes.update({k: i.shape for k, i in ctx.projector.tensors.items()
                           if k.startswith("model.mm_projector.")})
    else:
        tok_dir = ctx.path
        try:
            md = ModelDir.find(ctx.path)
        except DoctorError:
            md = None
        if md is not None:
            shapes.update({n: i.shape for n, (_, i) in md.tensors.items()})
    res = resolve_tower(ctx.options.vision_tower, cfg.get("mm_vision_tower"), ctx.path)
    tower: Tower | DoctorError | None = None
    if res.path is not None:
        try:
            tower = read_tower(res.path)
        except DoctorError as e:
            tower = e
    return conversion_problems(cfg, cfg_path, shapes, tok_dir, res, tower)


def _hits(ctx: Context, code: str) -> Iterable[Hit]:
    if ctx.options.to != TO_HF:
        raise Skip("only with --to llava-hf")
    if ctx.kind not in LORA_KINDS and ctx.kind != DirKind.model:
        raise Skip(f"not a LoRA run or a model directory (classified as {ctx.kind.value})")
    for p in ctx.to_hf_problems:
        if p.code == code:
            evidence: dict[str, Any] = {"hint": p.hint}
            yield Hit(f"{p.message}; {p.hint}" if p.hint else p.message,
                      path=Path(p.path) if p.path else None, evidence=evidence)


@check("LD801", "projector-not-llava-hf", Severity.error, needs_lora=False)
def projector_not_llava_hf(ctx: Context) -> Iterable[Hit]:
    """The projector type has no llava-hf equivalent (only `mlp2x_gelu` maps).

    ## What it does
    With `--to llava-hf`: reads `mm_projector_type` from config.json (LLaVA's default, when
    absent, is `linear`) and reports anything but `mlp2x_gelu`.

    ## Why is this bad?
    transformers' `LlavaMultiModalProjector` is exactly linear -> GELU -> linear
    (`linear_1`, `linear_2`). A `linear`, `mlp3x_gelu`, `identity`, `pooler` or residual
    projector has other tensors and other maths; renaming its keys would load with missing or
    unexpected keys, or load and compute something else.

    ## Example
    A run from the legacy `scripts/finetune_lora.sh` (no `--mm_projector_type`, so `linear`).

    ## Fix
    None: serve the model with LLaVA's own code. `convert` and `merge --to llava-hf` refuse it
    before writing anything.
    """
    return _hits(ctx, "LD801")


@check("LD802", "vision-tower-not-found", Severity.error, needs_lora=False)
def vision_tower_not_found(ctx: Context) -> Iterable[Hit]:
    """No vision tower directory to take the llava-hf `vision_tower` from.

    ## What it does
    With `--to llava-hf`: looks for the CLIP checkpoint three ways, offline: `--vision-tower
    DIR`, else config.json's `mm_vision_tower` when it is a local directory, else that hub id
    in the local Hugging Face cache.

    ## Why is this bad?
    Original LLaVA checkpoints do not contain the vision tower (LLaVA reloads it from
    `mm_vision_tower` at load time), but a llava-hf checkpoint must: its `vision_config` and
    weights come from the CLIP checkpoint. Even when LLaVA's merged output carries the tower's
    weights, the config and image processor come from the CLIP directory.

    ## Example
    `mm_vision_tower: "openai/clip-vit-large-patch14-336"` on a machine without network access
    and without that model in `~/.cache/huggingface/hub`.

    ## Fix
    None automatic: pass `--vision-tower CLIP_DIR`, or download the model into the cache
    (`huggingface-cli download openai/clip-vit-large-patch14-336`). `convert` exits 2.
    """
    return _hits(ctx, "LD802")


@check("LD803", "vision-tower-not-clip", Severity.error, needs_lora=False)
def vision_tower_not_clip(ctx: Context) -> Iterable[Hit]:
    """The vision tower directory is not a readable CLIP or SigLIP checkpoint.

    ## What it does
    With `--to llava-hf`: reads the tower directory's config.json (`model_type` `clip`,
    `clip_vision_model`, `siglip` or `siglip_vision_model`), its weight headers (some
    `vision_model.*` tensors), and checks that `image_size` is a multiple of `patch_size`.

    ## Why is this bad?
    LLaVA's builder only knows CLIP towers (LLaVA-NeXT adds SigLIP); llava-hf's `vision_config`
    must name a model transformers builds the same way. Another model type, a directory
    without weights, or unreadable weights give a checkpoint that does not load or loads a
    randomly initialised tower.

    ## Example
    `--vision-tower` pointing at the language model, or at a CLIP directory holding only
    config.json.

    ## Fix
    None automatic: pass the CLIP checkpoint the run was trained with
    (`--vision-tower CLIP_DIR`).
    """
    return _hits(ctx, "LD803")


@check("LD804", "vision-tower-width-mismatch", Severity.error, needs_lora=False)
def vision_tower_width_mismatch(ctx: Context) -> Iterable[Hit]:
    """The vision tower's width disagrees with the projector (`mm_hidden_size`).

    ## What it does
    With `--to llava-hf`: compares the tower's `hidden_size` with config.json's
    `mm_hidden_size` and with the input width of `model.mm_projector.0.weight`.

    ## Why is this bad?
    The projector was trained on features of one tower. A tower of another width does not
    load into llava-hf's `multi_modal_projector.linear_1` (size mismatch); one of the same width
    but another model loads and produces nonsense.

    ## Example
    A run trained with `openai/clip-vit-large-patch14-336` (1024 wide) converted with
    `--vision-tower clip-vit-base-patch16` (768 wide).

    ## Fix
    None automatic: pass the vision tower the run was trained with (`--vision-tower`).
    """
    return _hits(ctx, "LD804")


@check("LD805", "image-start-end-tokens", Severity.error, needs_lora=False)
def image_start_end_tokens(ctx: Context) -> Iterable[Hit]:
    """The model was trained with `<im_start>`/`<im_end>` around the image.

    ## What it does
    With `--to llava-hf`: reports `mm_use_im_start_end: true` in config.json.

    ## Why is this bad?
    llava-hf's processor expands `<image>` into patch tokens only; it never inserts LLaVA's
    image start/end tokens, so a converted model would see prompts unlike its training data.

    ## Example
    An early LLaVA v0/v1 run trained with `--mm_use_im_start_end True`.

    ## Fix
    None: serve the model with LLaVA's own code.
    """
    return _hits(ctx, "LD805")


@check("LD806", "tokenizer-rows-mismatch", Severity.error, needs_lora=False)
def tokenizer_rows_mismatch(ctx: Context) -> Iterable[Hit]:
    """The tokenizer's length differs from the embedding rows, or there is no tokenizer.

    ## What it does
    With `--to llava-hf`: counts the tokenizer's tokens (`tokenizer.model` pieces or
    `tokenizer.json`'s vocabulary, plus added tokens) and compares with the rows of
    `model.embed_tokens.weight`.

    ## Why is this bad?
    The conversion gives `<image>` and `<pad>` the two ids after the tokenizer's last and the
    two embedding rows after the last; both must be the same ids. A tokenizer longer than the
    embeddings gives index errors; a shorter one makes `<image>` an existing, trained token.

    ## Example
    A tokenizer saved after adding tokens for training, next to embeddings that were never
    resized (or ZeRO-3 placeholders).

    ## Fix
    None automatic: save the tokenizer the model was trained with next to its weights.
    """
    return _hits(ctx, "LD806")


@check("LD807", "image-features-not-llava-hf", Severity.error, needs_lora=False)
def image_features_not_llava_hf(ctx: Context) -> Iterable[Hit]:
    """How the run turns images into features has no llava-hf equivalent.

    ## What it does
    With `--to llava-hf`: `mm_vision_select_feature` must be `patch` (-> `default`) or
    `cls_patch` (-> `full`); `mm_vision_select_layer` must name a hidden state of the tower;
    `mm_patch_merge_type` must be `flat` (Llava), or `spatial_unpad` with `image_aspect_ratio:
    anyres` and `image_grid_pinpoints` (LlavaNext); every tensor must have a llava-hf name (a
    vision resampler has none).

    ## Why is this bad?
    transformers' Llava/LlavaNext implement exactly those feature paths. Anything else
    converts into a model that computes different image features than the one trained.

    ## Example
    A LLaVA-NeXT run with `mm_patch_merge_type: spatial` (no unpad) or a `vision_resampler`.

    ## Fix
    None: serve the model with LLaVA's own code.
    """
    return _hits(ctx, "LD807")


@check("LD808", "image-newline-missing", Severity.error, needs_lora=False)
def image_newline_missing(ctx: Context) -> Iterable[Hit]:
    """An anyres/unpad run has no `model.image_newline` to give LlavaNext.

    ## What it does
    With `--to llava-hf`, for a run with `mm_patch_merge_type` containing `unpad`: looks for
    `model.image_newline` in the checkpoint (or, for a LoRA run, the base and
    `non_lora_trainables.bin`).

    ## Why is this bad?
    LlavaNext appends the learnt `image_newline` vector after every row of image features;
    without the trained one, a converted model would load a random vector.

    ## Example
    A v1.6-style LoRA run whose `non_lora_trainables.bin` lost `image_newline` (see LD305).

    ## Fix
    None automatic: merge with the `non_lora_trainables.bin` that holds it
    (`llava-doctor fix` can often restore its keys).
    """
    return _hits(ctx, "LD808")


@check("LD809", "checkpoint-tower-mismatch", Severity.error, needs_lora=False)
def checkpoint_tower_mismatch(ctx: Context) -> Iterable[Hit]:
    """The vision tower saved in the checkpoint does not match the tower directory.

    ## What it does
    With `--to llava-hf`, for checkpoints that carry `model.vision_tower.vision_tower.*` (what
    LLaVA's own `save_pretrained` writes after loading the tower): compares those tensors' names
    and shapes with the tower directory's.

    ## Why is this bad?
    The checkpoint's tower weights are the model's (fine-tuned when `unfreeze_mm_vision_tower`
    was set) and are the ones converted; the `vision_config` comes from the tower directory.
    If the two disagree, the config describes another network than the weights.

    ## Example
    A v1.6 checkpoint converted with `--vision-tower` pointing at a 224 px CLIP.

    ## Fix
    None automatic: pass the CLIP checkpoint the run was trained with (`--vision-tower`).
    """
    return _hits(ctx, "LD809")
