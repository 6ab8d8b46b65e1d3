"""Fixes that change single fields of the LoRA dir's `config.json` (LD208, LD301, LD307, LD406).

Each edits only its own top-level keys, in the file's own layout (`jsonedit`), and re-derives
from the config as the plan so far leaves it (a config that LD101 is about to copy in counts).
"""

from __future__ import annotations

import os
from pathlib import Path

from llava_doctor.artifacts.configs import tokenizer_length
from llava_doctor.artifacts.discovery import NON_LORA
from llava_doctor.artifacts.llava import expected_projector, projector_type_of
from llava_doctor.checks.base_model import (
    IM_END,
    IM_PATCH,
    IM_START,
    known_added_tokens,
    llava_model_type,
)
from llava_doctor.checks.projector import hub_id_for
from llava_doctor.fixes.derive import DEFAULT_PROJECTOR_TYPE, PROJ, landed_projector
from llava_doctor.fixes.jsonedit import DELETE
from llava_doctor.fixes.registry import (
    AlreadyDone,
    CannotFix,
    NothingToDo,
    Outcome,
    PlanInput,
    Proposal,
    planner,
)
from llava_doctor.models import FixSafety

CONFIG = "config.json"


def _no_config(pi: PlanInput) -> Outcome:
    return CannotFix(f"{pi.ctx.path / CONFIG} is missing or unreadable (LD101/LD501 first)")


@planner("LD208", watches=(CONFIG,))
def fix_quantization_config(pi: PlanInput) -> Outcome:
    """Drop QLoRA's `quantization_config` (and `load_in_4bit/8bit: true`) from config.json."""
    cfg = pi.ws.json(CONFIG)
    if cfg is None:
        return _no_config(pi)
    keys = [k for k in ("quantization_config",) if cfg.get(k)]
    keys += [k for k in ("load_in_4bit", "load_in_8bit") if cfg.get(k) is True]
    if not keys:
        return NothingToDo("config.json has no quantization settings")
    return Proposal(
        title=f"remove {', '.join(keys)} from {CONFIG} so the merge loads the base unquantized",
        safety=FixSafety.safe, files=(CONFIG,),
        edit=lambda w: w.edit_json(CONFIG, dict.fromkeys(keys, DELETE)))


@planner("LD301", watches=(CONFIG, NON_LORA))
def fix_projector_type(pi: PlanInput) -> Outcome:
    """Set `mm_projector_type` to the structure of the projector weights the merge loads."""
    ctx, ws = pi.ctx, pi.ws
    cfg = ws.json(CONFIG)
    if cfg is None:
        return _no_config(pi)
    declared = cfg.get("mm_projector_type") or DEFAULT_PROJECTOR_TYPE
    keys = landed_projector(ws.tensor_names(NON_LORA) or [], cfg)
    src = str(ctx.path / NON_LORA)
    if not keys and ctx.base_path is not None and ctx.base is not None:
        keys = {n[len(PROJ):]: n for n in ctx.base.tensor_names if n.startswith(PROJ)}
        src = str(ctx.base.path)
    if not keys:
        return NothingToDo("no projector weights land from non_lora_trainables.bin or the base")
    inferred = projector_type_of(keys)
    if inferred == declared:
        return NothingToDo(f"mm_projector_type is {declared!r}, as the weights are")
    want = expected_projector(declared, 1, 1)
    if want is not None and set(keys) < set(want):
        return NothingToDo(f"the weights are an incomplete {declared} projector (LD302's case)")
    if inferred is None:
        return CannotFix(f"the projector weights in {src} match no projector structure LLaVA "
                         f"builds ({', '.join(sorted(keys)[:4])}); find this run's projector")
    was = (repr(declared) if cfg.get("mm_projector_type")
           else f"absent (so LLaVA's default {declared!r})")
    return Proposal(
        title=f"set mm_projector_type in {CONFIG} (now {was}) to {inferred!r}, the structure "
              f"of the projector weights in {src}",
        safety=FixSafety.safe, files=(CONFIG,),
        edit=lambda w: w.edit_json(CONFIG, {"mm_projector_type": inferred}))


def _whitelisted(tower: str) -> bool:
    # haotian-liu/LLaVA multimodal_encoder/builder.py: build_vision_tower
    return tower.startswith("openai") or tower.startswith("laion") or "ShareGPT4V" in tower


@planner("LD307", watches=(CONFIG,))
def fix_vision_tower(pi: PlanInput) -> Outcome:
    """Rewrite an unresolvable `mm_vision_tower` path to the hub id its basename names."""
    cfg = pi.ws.json(CONFIG)
    if cfg is None:
        return _no_config(pi)
    tower = cfg.get("mm_vision_tower")
    if not isinstance(tower, str) or not tower:
        return NothingToDo("config.json has no mm_vision_tower")
    if os.path.exists(tower):
        return NothingToDo(f"mm_vision_tower {tower} exists here")
    local = tower.startswith(("/", "./", "../", "~")) or os.path.isabs(tower)
    if not local and _whitelisted(tower):
        return NothingToDo(f"mm_vision_tower {tower!r} is a name LLaVA accepts")
    hub = hub_id_for(tower)
    if hub is None:
        return CannotFix(f"mm_vision_tower {tower!r}: its basename '{Path(tower.rstrip('/')).name}'"
                         " names no known hub vision tower; set it to the hub id or a local path "
                         "of the tower this run was trained with")
    return Proposal(
        title=f"set mm_vision_tower in {CONFIG} from {tower!r} to the hub id {hub!r}",
        safety=FixSafety.unsafe, files=(CONFIG,),
        unsafe_reason=f"it assumes the tower at {tower} was the stock {hub}; a fine-tuned or "
                      "different tower under the same name would be replaced silently",
        edit=lambda w: w.edit_json(CONFIG, {"mm_vision_tower": hub}))


@planner("LD406", watches=(CONFIG,))
def fix_model_type(pi: PlanInput) -> Outcome:
    """`model_type: "llava"` on an original-LLaVA config -> the LLaVA type of its LLM
    (`llava_llama`, `llava_mistral`, `llava_mpt`, `llava_qwen`, ...), or no fix when the config
    does not say which LLM it is."""
    cfg = pi.ws.json(CONFIG)
    if cfg is None:
        return _no_config(pi)
    if cfg.get("model_type") != "llava":
        if pi.findings and pi.ws.is_pending(CONFIG) and str(
                cfg.get("model_type") or "").startswith("llava_"):
            return AlreadyDone(f"the planned config.json already has model_type "
                               f"{cfg.get('model_type')!r}")
        return NothingToDo(f"model_type is {cfg.get('model_type')!r}")
    if cfg.get("text_config") is not None:
        return NothingToDo("a llava-hf config, where 'llava' is right")
    if cfg.get("hidden_size") is None and cfg.get("num_hidden_layers") is None:
        return NothingToDo("no Llama fields at the top level")
    expected = llava_model_type(cfg)
    if expected is None:
        return CannotFix(f"config.json's architectures {cfg.get('architectures')} name no LLM "
                         "LLaVA has a class for; set model_type to the LLaVA type of this run's "
                         "LLM by hand")
    return Proposal(
        title=f"set model_type in {CONFIG} from 'llava' to '{expected}' (what LLaVA writes for "
              "this LLM since v1.6; 'llava' is transformers' llava-hf type)",
        safety=FixSafety.safe, files=(CONFIG,),
        edit=lambda w: w.edit_json(CONFIG, {"model_type": expected}))


@planner("LD403", watches=(CONFIG,))
def fix_im_patch_token(pi: PlanInput) -> Outcome:
    """The `<im_patch>` trap: a config without `mm_use_im_patch_token` (LLaVA defaults it to
    True) whose vocabulary has no room for the token -> `mm_use_im_patch_token: false`."""
    ctx = pi.ctx
    cfg = pi.ws.json(CONFIG)
    if cfg is None:
        return _no_config(pi)
    other = CannotFix("this vocabulary mismatch has no automatic fix: use the base and "
                      "tokenizer the LoRA was trained with")
    if "mm_use_im_patch_token" in cfg:
        return other if pi.findings else NothingToDo("mm_use_im_patch_token is set")
    base = ctx.base_path
    if base is None or not base.is_dir():
        return CannotFix("no base model is resolved to count its tokenizer: pass --base")
    vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    tok_len = tokenizer_length(base)
    if not isinstance(vocab, int) or tok_len is None:
        return CannotFix("the vocab_size or the base tokenizer's length is unknown")
    present = known_added_tokens(base)
    start_end = bool(cfg.get("mm_use_im_start_end"))
    added = [t for t, on in ((IM_PATCH, True), (IM_START, start_end), (IM_END, start_end))
             if on and t not in present]
    final = tok_len + len(added)
    if final <= vocab or tok_len > vocab:
        return other if pi.findings else NothingToDo("the merge's tokens fit the vocabulary")
    if IM_PATCH not in added or final - 1 > vocab:
        return other
    return Proposal(
        title=f"set mm_use_im_patch_token: false in {CONFIG} (absent, so LLaVA's merge would add "
              f"<im_patch> and grow the model past vocab_size {vocab}); the v1.5 scripts pass "
              "false, and this run's vocabulary has no room for the token",
        safety=FixSafety.safe, files=(CONFIG,),
        edit=lambda w: w.edit_json(CONFIG, {"mm_use_im_patch_token": False}))
