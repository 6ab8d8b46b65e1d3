"""LD101 and LD104: files LLaVA writes only at the end of training (config.json, the projector).

Sources are tried from the most to the least faithful: the run's own final files, then the
stage-1 pretrain output, then (config only) a synthesis from the base config. Each source is
checked against the adapter's own tensor shapes before it is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_doctor.artifacts.configs import read_json
from llava_doctor.artifacts.discovery import NON_LORA
from llava_doctor.artifacts.llava import canonical_non_lora_key
from llava_doctor.checks.layout import run_dir_of
from llava_doctor.errors import DoctorError
from llava_doctor.fixes.derive import (
    PROJ,
    AdapterDims,
    adapter_dims,
    dims_mismatch,
    projector_facts,
    projector_mismatch,
)
from llava_doctor.fixes.registry import (
    CannotFix,
    NothingToDo,
    Outcome,
    PlanInput,
    Proposal,
    planner,
)
from llava_doctor.fixes.workspace import Workspace
from llava_doctor.models import FixSafety

CONFIG = "config.json"

# The vision towers LLaVA v1.5 recipes use, by their feature width (mm_hidden_size). Only
# CLIP ViT-L/14-336 is unambiguous enough to guess, and even that is flagged unsafe.
_TOWER_BY_WIDTH = {1024: "openai/clip-vit-large-patch14-336"}

# LLaVA v1.5 `finetune_lora.sh` values for the fields that cannot be read from any weight.
_V15_FIELDS: dict[str, Any] = {
    "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
    "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False, "tokenizer_padding_side": "right",
    "tokenizer_model_max_length": 2048, "use_cache": True,
}
# Fields whose stage-1 value differs from the fine-tuning one in LLaVA's own scripts.
_STAGE_FIELDS = ("image_aspect_ratio", "tune_mm_mlp_adapter", "mm_projector_lr")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except DoctorError:
        return None


def _dims(pi: PlanInput) -> AdapterDims:
    ad = pi.ctx.adapter
    if ad is None:
        return AdapterDims(None, None, None)
    return adapter_dims({k: t.shape for k, t in ad.tensors.items()})


def _base_config(pi: PlanInput) -> tuple[Path | None, dict[str, Any] | None]:
    bp = pi.ctx.base_path
    if bp is None or not (bp / CONFIG).is_file():
        return None, None
    return bp / CONFIG, _read(bp / CONFIG)


# ----------------------------------------------------------------------------------------------
# LD101
# ----------------------------------------------------------------------------------------------

@planner("LD101")
def fix_config_missing(pi: PlanInput) -> Outcome:
    """Copy the run's config.json (safe), the stage-1 one when dims match (safe), or
    synthesise base config + inferred mm_* fields (unsafe). Never the bare base config."""
    ctx, ws = pi.ctx, pi.ws
    if ws.exists(CONFIG):
        return NothingToDo(f"{ctx.path / CONFIG} exists")
    dims = _dims(pi)
    nl_shapes = ws.tensor_shapes(NON_LORA)
    proj = projector_facts(nl_shapes) if nl_shapes else None
    tried: list[str] = []

    parent = run_dir_of(ctx)
    if parent is not None and (parent / CONFIG).is_file():
        src = parent / CONFIG
        cfg = _read(src)
        why = ("is not a readable JSON object" if cfg is None else
               "has no mm_* fields (it is not a LLaVA config)" if "mm_vision_tower" not in cfg
               else dims_mismatch(cfg, dims))
        if why is None:
            return Proposal(
                title=f"copy {src} (the run's final config.json; LLaVA's config does not change "
                      "between checkpoints)",
                safety=FixSafety.safe, files=(CONFIG,),
                edit=lambda w: w.copy_file(CONFIG, src, json_file=True))
        tried.append(f"{src} {why}")
    elif parent is not None:
        tried.append(f"the run's final dir {parent} has no {CONFIG}")

    pre = ctx.projector_resolved.path
    if pre is not None and (pre.parent / CONFIG).is_file():
        src = pre.parent / CONFIG
        cfg = _read(src)
        why = _pretrain_mismatch(pi, cfg, dims, proj)
        if why is None:
            assert cfg is not None
            kept = ", ".join(f"{k}={cfg[k]!r}" for k in _STAGE_FIELDS if k in cfg)
            return Proposal(
                title=f"copy the stage-1 config {src}: its LLM dimensions and projector match "
                      "this adapter",
                safety=FixSafety.safe, files=(CONFIG,),
                notes=((f"stage-1 values are kept ({kept}); set them to your fine-tuning "
                        "values if your fine-tuning script changed them",) if kept else ()),
                edit=lambda w: w.copy_file(CONFIG, src, json_file=True))
        tried.append(f"the stage-1 config {src} {why}")
    elif pre is None:
        tried.append(ctx.projector_resolved.note or "no stage-1 projector was found")

    return _synthesise(pi, dims, proj, tried)


def _pretrain_mismatch(pi: PlanInput, cfg: dict[str, Any] | None, dims: AdapterDims,
                       proj: Any) -> str | None:
    if cfg is None:
        return "is not a readable JSON object"
    if "mm_vision_tower" not in cfg:
        return "has no mm_* fields"
    if dims.hidden is None:
        return "cannot be compared with the adapter (its tensors are unreadable)"
    why = dims_mismatch(cfg, dims)
    if why:
        return f"does not match: {why}"
    _, base = _base_config(pi)
    if base is not None:
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
            if key in base and key in cfg and base[key] != cfg[key]:
                return f"does not match the base: {key}={cfg[key]} vs {base[key]}"
    if proj is not None:
        why = projector_mismatch(proj, cfg)
        if why:
            return f"does not match {NON_LORA}: {why}"
    return None


def _synthesise(pi: PlanInput, dims: AdapterDims, proj: Any, tried: list[str]) -> Outcome:
    ctx = pi.ctx
    lead = ("; ".join(tried) + ". ") if tried else ""
    base_path, base = _base_config(pi)
    if base is None:
        return CannotFix(f"{lead}No base config to synthesise one from: pass --base (the model "
                         "you fine-tuned from), or copy the run's config.json here")
    if base.get("text_config") is not None:
        return CannotFix(f"{lead}The base {base_path} is a llava-hf model; a LLaVA config "
                         "cannot be synthesised from it")
    why = dims_mismatch(base, dims)
    if why:
        return CannotFix(f"{lead}The base config {base_path} does not fit the adapter: {why}")
    facts = proj
    source = NON_LORA
    if facts is None and ctx.projector is not None:
        facts = projector_facts({k: t.shape for k, t in ctx.projector.tensors.items()})
        source = str(ctx.projector.path)
    base_llava = "mm_vision_tower" in base
    if facts is None and not base_llava:
        return CannotFix(f"{lead}No projector weights ({NON_LORA} or a stage-1 projector) to "
                         "infer the mm_* fields from, and the base has none")
    if facts is not None and facts.type is None:
        return CannotFix(f"{lead}The projector in {source} matches no projector type LLaVA "
                         "builds")
    if facts is not None and facts.hidden != base.get("hidden_size"):
        return CannotFix(f"{lead}The projector in {source} outputs {facts.hidden} features but "
                         f"the base's hidden_size is {base.get('hidden_size')}")
    if facts is not None and any("image_newline" in k for k in (ctx.non_lora.tensors
                                                                 if ctx.non_lora else {})):
        return CannotFix(f"{lead}{NON_LORA} holds image_newline (a LLaVA-1.6 'anyres' run): its "
                         "image_grid_pinpoints and merge settings cannot be inferred")
    cfg = dict(base)
    guessed: list[str] = []
    for k, v in _V15_FIELDS.items():
        if k not in cfg:
            cfg[k] = v
            guessed.append(f"{k}={v!r}")
    if facts is not None:
        cfg["mm_projector_type"] = facts.type
        cfg["mm_hidden_size"] = facts.mm_hidden
    tower = cfg.get("mm_vision_tower")
    if tower is None:
        assert facts is not None
        tower = _TOWER_BY_WIDTH.get(facts.mm_hidden or -1)
        if tower is None:
            return CannotFix(f"{lead}Cannot guess the vision tower for a {facts.mm_hidden}-wide "
                             "projector input; copy the run's config.json here")
        cfg["mm_vision_tower"] = tower
        guessed.insert(0, f"mm_vision_tower={tower!r}")
    # The LLaVA type of the base's LLM (llava_qwen for a Qwen2 base...), llava_llama by default.
    from llava_doctor.checks.base_model import llava_model_type

    cfg["model_type"] = llava_model_type(cfg) or "llava_llama"
    cfg.pop("quantization_config", None)
    recorded = ctx.adapter_config.base_model_name_or_path if ctx.adapter_config else None
    if recorded:
        cfg["_name_or_path"] = recorded
    inferred = (f"mm_projector_type={cfg.get('mm_projector_type')!r} and "
                f"mm_hidden_size={cfg.get('mm_hidden_size')} from {source}" if facts is not None
                else "the mm_* fields of the LLaVA base")
    return Proposal(
        title=f"synthesise {CONFIG} from the base config {base_path} plus LLaVA fields "
              f"({inferred})",
        safety=FixSafety.unsafe, files=(CONFIG,),
        unsafe_reason=(f"{lead}It guesses what no file records"
                       + (f": {', '.join(guessed)} (LLaVA v1.5 values)" if guessed else "")
                       + "; check them against your training script"),
        edit=lambda w: w.create_json(CONFIG, cfg))


# ----------------------------------------------------------------------------------------------
# LD104
# ----------------------------------------------------------------------------------------------

def _ds_hint(pi: PlanInput) -> str:
    ds = sorted(p.name for p in pi.ctx.path.glob("global_step*"))
    return (f"; DeepSpeed shards {ds[0]} are here: `python zero_to_fp32.py` recovers this step's "
            "real projector") if ds else ""


@planner("LD104")
def fix_non_lora_missing(pi: PlanInput) -> Outcome:
    """Copy the final run's file into a checkpoint, or build one from the stage-1 projector."""
    ctx, ws = pi.ctx, pi.ws
    if ws.exists(NON_LORA):
        return NothingToDo(f"{ctx.path / NON_LORA} exists")
    if not ctx.adapter_paths:
        return NothingToDo("there is no adapter beside which the file would belong")
    cfg = ws.json(CONFIG)
    reasons: list[str] = []

    parent = run_dir_of(ctx)
    if parent is not None and (parent / NON_LORA).is_file():
        final = parent / NON_LORA
        tensors = ws.read_tensors(final)
        if tensors is None:
            reasons.append(f"{final} is unreadable or unsafe (see `llava-doctor check {parent}`)")
        else:
            facts = projector_facts({k: tuple(v.shape) for k, v in tensors.items()})
            why = projector_mismatch(facts, cfg) if facts is not None else None
            if why:
                reasons.append(f"{final} does not fit: {why}")
            else:
                def copy(w: Workspace, t: dict = tensors, s: Path = final) -> None:
                    w.set_tensors(NON_LORA, t, summary=f"tensors of {s}")
                return Proposal(
                    title=f"copy {final} ({len(tensors)} tensors) into {ctx.path.name}, re-saved "
                          "with torch.save as plain tensors",
                    safety=FixSafety.unsafe, files=(NON_LORA,), edit=copy,
                    unsafe_reason=f"it holds the projector of the run's final step, not of "
                                  f"{ctx.path.name}{_ds_hint(pi)}")

    src = ctx.projector_resolved.path
    arch = (cfg or {}).get("architectures") or []
    if src is not None and ctx.projector_resolved.source != "--projector" and any(
            str(a).startswith("Llava") for a in arch):
        reasons.append(f"the run was trained from a LLaVA checkpoint, so the sibling stage-1 "
                       f"projector {src} is not where it started (pass --projector to use a "
                       "file anyway)")
        src = None
    elif src is None:
        reasons.append(ctx.projector_resolved.note or "no stage-1 projector was found")
    if src is not None:
        tensors = ws.read_tensors(src)
        if tensors is None:
            reasons.append(f"the stage-1 projector {src} is unreadable or unsafe")
        else:
            facts = projector_facts({k: tuple(v.shape) for k, v in tensors.items()})
            why = ("holds no mm_projector.* tensors" if facts is None
                   else projector_mismatch(facts, cfg))
            proj = ({canonical_non_lora_key(PROJ + sub): tensors[k]
                     for sub, k in sorted(facts.keys.items())} if facts is not None else {})
            if why:
                reasons.append(f"the stage-1 projector {src} does not fit: {why}")
            else:
                def build(w: Workspace, t: dict = proj, s: Path = src) -> None:
                    w.set_tensors(NON_LORA, t, summary=f"stage-1 projector {s}")
                return Proposal(
                    title=f"build {NON_LORA} from the stage-1 projector {src} ({len(proj)} "
                          "tensors under LLaVA's base_model.model.model.mm_projector.* names)",
                    safety=FixSafety.unsafe, files=(NON_LORA,), edit=build,
                    unsafe_reason="the stage-1 projector is where fine-tuning started, not the "
                                  f"fine-tuned projector{_ds_hint(pi)}")
    return CannotFix("; ".join(reasons) + _ds_hint(pi)
                     + ". Pass --projector with the stage-1 mm_projector.bin, or copy the file "
                       "from the training output")
