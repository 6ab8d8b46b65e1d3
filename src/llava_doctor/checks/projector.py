"""LD3xx: will the merged model get the right projector, image_newline and vision tower?

Every check here replays LLaVA's own loading path (failure-modes.md §0): the base is loaded with
the LoRA dir's `config.json` (so the projector is built from `mm_projector_type`), then
`non_lora_trainables.bin` goes through the builder's key rewrite and
`load_state_dict(strict=False)`, whose result is discarded. Whatever that path silently drops or
leaves uninitialised is a finding.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.llava import (
    MAX_PROJECTOR_DEPTH,
    LlavaParams,
    builder_rewrite,
    canonical_non_lora_key,
    canonical_param_name,
    declared_depth,
    expected_projector,
    projector_keys,
    projector_type_of,
)
from llava_doctor.artifacts.tensors import TensorInfo
from llava_doctor.artifacts.weights import WeightFile
from llava_doctor.checks.base import Hit, Skip, by_consumer, check
from llava_doctor.checks.context import Context
from llava_doctor.errors import FileCorruptError, LfsPointerError, UnsafePickleError
from llava_doctor.models import Consumer, FixSafety, Severity

ERR, WARN, INFO = Severity.error, Severity.warning, Severity.info

#: LLaVA's `ModelArguments.mm_projector_type` default: what a config without the field builds.
DEFAULT_PROJECTOR_TYPE = "linear"
#: LD303's threshold on the relative L2 distance ||P_ft - P_start|| / ||P_start||.
#: Fine-tuning moves the projector at LLaVA's `--mm_projector_lr 2e-5`: Adam steps of about lr per
#: element, mostly cancelling, leave it a few percent from where it started. A projector that did
#: not start there is independent of it, and for independent zero-mean tensors
#: E||a - b||^2 = ||a||^2 + ||b||^2, so the distance is at least 1.0 (about 1.41 for a random
#: init of the same scale). 0.5 sits far from both.
DISTANCE_THRESHOLD = 0.5
PROJ = "model.mm_projector."
NEWLINE = "model.image_newline"
#: Where haotian-liu/LLaVA's `build_vision_tower` accepts a tower that is not an existing path.
TOWER_WHITELIST = "names starting with 'openai' or 'laion', or containing 'ShareGPT4V'"


# --- what LLaVA's loader sees ------------------------------------------------------------------

def lora_config(ctx: Context) -> dict[str, Any]:
    """The LoRA dir's `config.json` as written (absent fields absent), or {} when unreadable."""
    return ctx.config.raw() if ctx.config is not None else {}


def declared_type(ctx: Context) -> tuple[str, bool]:
    """(`mm_projector_type` the merge builds, whether config.json states it)."""
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101/LD501 report it)")
    t = ctx.config.mm_projector_type
    return (t, True) if t else (DEFAULT_PROJECTOR_TYPE, False)


def model_dims(ctx: Context) -> tuple[int | None, int | None]:
    """(hidden_size, mm_hidden_size) of the model the merge builds: LoRA config, else the base."""
    hidden = ctx.config.llm_dims.get("hidden_size") if ctx.config is not None else None
    mm_hidden = ctx.config.mm_hidden_size if ctx.config is not None else None
    if (hidden is None or mm_hidden is None) and ctx.base_resolved.path is not None:
        bc = ctx.base_config
        if bc is not None:
            hidden = hidden or bc.llm_dims.get("hidden_size")
            mm_hidden = mm_hidden or bc.mm_hidden_size
    return hidden, mm_hidden


def llava_params(ctx: Context) -> LlavaParams:
    cfg = lora_config(ctx)
    if not cfg and ctx.base_resolved.path is not None and ctx.base_config is not None:
        cfg = ctx.base_config.raw()
    return LlavaParams.from_config(cfg)


@dataclass(frozen=True)
class NonLoraView:
    """`non_lora_trainables.bin` as LLaVA's builder loads it."""

    wf: WeightFile
    rewrite: dict[str, str]  # key in the file -> key given to load_state_dict
    params: LlavaParams

    @property
    def landed(self) -> dict[str, str]:
        """File key -> parameter, for every key strict=False actually loads."""
        return {k: v for k, v in self.rewrite.items() if self.params.accepts(v)}

    @property
    def dropped(self) -> dict[str, str]:
        return {k: v for k, v in self.rewrite.items() if not self.params.accepts(v)}

    def projector(self) -> dict[str, str]:
        """Sub-key relative to `mm_projector.` -> file key, for the projector keys that land."""
        return {v[len(PROJ):]: k for k, v in self.landed.items() if v.startswith(PROJ)}

    def key_for(self, param: str) -> str | None:
        return next((k for k, v in self.landed.items() if v == param), None)


def non_lora_view(ctx: Context) -> NonLoraView | None:
    wf = ctx.non_lora
    if wf is None:
        return None
    return NonLoraView(wf, builder_rewrite(wf.tensors), llava_params(ctx))


def base_projector(ctx: Context) -> dict[str, str]:
    """Sub-key -> base tensor name for the base's `model.mm_projector.*` ({} without a base)."""
    if ctx.base_resolved.path is None or ctx.base is None:
        return {}
    return {n[len(PROJ):]: n for n in ctx.base.tensor_names if n.startswith(PROJ)}


def _base_info(ctx: Context, name: str) -> tuple[Path, TensorInfo] | None:
    hit = ctx.base.tensors.get(name) if ctx.base is not None else None
    return (hit[0].path, hit[1]) if hit else None


def _trained_from_llava(ctx: Context) -> bool:
    arch = ctx.config.architectures if ctx.config is not None else None
    return bool(arch and any(a.startswith("Llava") for a in arch))


def _keys(keys: Iterable[str], n: int = 6) -> str:
    ks = sorted(keys)
    more = f" and {len(ks) - n} more" if len(ks) > n else ""
    return ", ".join(f"'{k}'" for k in ks[:n]) + more


def _shape(s: Iterable[object]) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def shown(text: str, limit: int = 60) -> str:
    """A declared string as a message quotes it (a 10,000-digit type name is cut)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _rewrite_hint(key: str, rewritten: str) -> str:
    return f"'{key}'" if key == rewritten else f"'{key}' (LLaVA loads it as '{rewritten}')"


# --- LD301 -------------------------------------------------------------------------------------

@check("LD301", "projector-type-mismatch", Severity.error, fix=FixSafety.safe)
def projector_type_mismatch(ctx: Context) -> Iterable[Hit]:
    """`mm_projector_type` in config.json disagrees with the structure of the projector weights.

    ## What it does
    Infers the projector type from the keys of the projector the merge would load
    (`non_lora_trainables.bin` after LLaVA's key rewrite, else the base's `model.mm_projector.*`):
    `weight`/`bias` is `linear`, `0,2,…,2(N-1)` is `mlpNx_gelu`, NeXT's `pre_norm`/`conv_pool`
    sub-keys are `mlpNx_resMx_gelu`/`pooler`. It compares that with `mm_projector_type` in the
    LoRA dir's `config.json`, which defaults to `linear` when absent (LLaVA's `ModelArguments`).

    ## Why is this bad?
    LLaVA builds the projector from the config and loads the weights with `strict=False`: a
    Sequential's `model.mm_projector.0.weight` never matches a Linear's `model.mm_projector.weight`,
    so the merge succeeds and the projector stays random. At training time the same mismatch is a
    loud `Missing key(s) in state_dict: "0.weight", "0.bias", "2.weight", "2.bias". Unexpected
    key(s) in state_dict: "weight", "bias".` (LLaVA #608); at merge time it is silent.

    ## Example
    A hand-written or legacy config without `mm_projector_type` (so `linear`) next to a v1.5
    `mlp2x_gelu` projector.

    ## Fix
    Safe: `llava-doctor fix` sets `mm_projector_type` to the type the weights have (config only;
    the weights are what training produced). None when the weights match no known structure.
    """
    declared, explicit = declared_type(ctx)
    nl = non_lora_view(ctx)
    nl_proj = nl.projector() if nl is not None else {}
    keys = nl_proj or base_projector(ctx)
    if not keys:
        raise Skip("no projector weights land from non_lora_trainables.bin or the base "
                   "(LD302 reports it)")
    src = nl.wf.path if nl is not None and nl_proj else ctx.base_path
    inferred = projector_type_of(keys)
    if inferred == declared:
        return
    want = expected_projector(declared, 1, 1)
    if want is not None and set(keys) < set(want):
        return  # part of the declared structure: LD302 names the missing keys
    depth = declared_depth(declared)
    too_deep = depth is not None and depth > MAX_PROJECTOR_DEPTH
    if inferred is None and want is None and not too_deep:
        return  # neither is a structure we know: nothing to compare
    cfg_path = ctx.path / "config.json"
    stated = f"'{shown(declared)}'" if explicit else f"absent, so LLaVA's default '{declared}'"
    if depth is not None and too_deep:
        layers = len({k.split(".", 1)[0] for k in keys if k.split(".", 1)[0].isdigit()})
        count = f"{depth:,}" if depth < 10**12 else f"at least 10^{int(math.log10(depth))}"
        effect = (f"that declares {count} projector layers (over {MAX_PROJECTOR_DEPTH}, far "
                  f"beyond any LLaVA projector) while the weights hold {layers or 1} layer(s): "
                  "LLaVA's builder would try to "
                  "allocate that many hidden_size x hidden_size layers and run out of memory, "
                  "or drop these weights")
    elif want is None:
        effect = f"LLaVA's builder raises `ValueError: Unknown projector type: {declared}`"
    else:
        effect = (f"LLaVA builds a {declared} projector and loads these weights with "
                  "strict=False, which drops them silently: the merged model gets a randomly "
                  "initialised projector")
    found = f"'{inferred}'" if inferred else "a structure no LLaVA builder makes"
    remedy = (f"`llava-doctor fix` sets mm_projector_type to '{inferred}' (safe: config only)"
              if inferred else "find the projector that belongs to this run")
    yield Hit(f"{cfg_path}: mm_projector_type is {stated}, but the projector weights in {src} "
              f"are {found} (keys {_keys(keys)}); {effect}. {remedy}", path=cfg_path,
              evidence={"file": str(cfg_path), "field": "mm_projector_type",
                        "actual": declared if len(declared) <= 256 else shown(declared),
                        "explicit": explicit, "expected": inferred, "weights": str(src),
                        "keys": sorted(keys)},
              fix=FixSafety.safe if inferred else FixSafety.none)


# --- LD302 -------------------------------------------------------------------------------------

def stage1_projector(ctx: Context) -> tuple[WeightFile, dict[str, str]] | None:
    """The resolved stage-1 file and its sub-key -> key map, when readable and non-empty."""
    wf = ctx.projector
    if wf is None:
        return None
    rel = {r: k for k, r in projector_keys(wf.tensors).items()}
    return (wf, rel) if rel else None


def _stage1_applies(ctx: Context) -> bool:
    """Whether the resolved stage-1 projector is this run's starting point.

    A sibling `*-pretrain/` found by LLaVA's folder convention is not, for a LoRA trained from a
    LLaVA checkpoint (finetune_task_lora.sh): its projector came from that checkpoint.
    """
    res = ctx.projector_resolved
    return res.path is not None and (res.source == "--projector" or not _trained_from_llava(ctx))


@check("LD302", "projector-missing", Severity.error, fix=FixSafety.unsafe)
def projector_missing(ctx: Context) -> Iterable[Hit]:
    """No projector weights reach the merged model: it would keep a random projector.

    ## What it does
    Applies LLaVA's exact key rewrite to `non_lora_trainables.bin` (strip `base_model.`, then
    `model.` if any key starts with `model.model.`) and collects the `model.mm_projector.*` keys
    that land; adds the base's own `model.mm_projector.*` (a LLaVA checkpoint has one, vicuna has
    not); and checks that every key of the configured projector type is covered.

    ## Why is this bad?
    With `--freeze_mm_mlp_adapter` (or NeXT's `mm_tunable_parts` without `mm_mlp_adapter`) the
    projector is not trainable, so `non_lora_trainables.bin` is a few hundred bytes; merged onto
    vicuna, the projector is left at its random init. The only sign is the usually benign
    `Some weights of LlavaLlamaForCausalLM were not initialized from the model checkpoint ...
    ['model.mm_projector.0.bias', ...]` warning; the merged model then ignores images.

    ## Example
    `finetune_lora.sh` with `--freeze_mm_mlp_adapter True`, merged with
    `--model-base lmsys/vicuna-7b-v1.5`.

    ## Fix
    Unsafe: `llava-doctor fix --unsafe` injects the stage-1 projector (`--projector`, or the
    sibling `*-pretrain/mm_projector.bin`) into `non_lora_trainables.bin` under LLaVA's canonical
    key names. It is the projector training started from; if it was frozen, it is exactly the one
    used in training. When the projector is present under names LLaVA drops, LD305 renames them
    instead.
    """
    declared, _ = declared_type(ctx)
    want = expected_projector(declared, 1, 1)
    if want == {}:
        return  # identity: no parameters to load
    if ctx.non_lora_path is None:
        raise Skip("no non_lora_trainables.bin (LD104 reports it)")
    nl = non_lora_view(ctx)
    if nl is None:
        raise Skip("non_lora_trainables.bin is unreadable (LD501/LD502/LD504 report it)")
    nl_proj = nl.projector()
    if nl_proj and (want is None or set(want) <= set(nl_proj)):
        return
    if ctx.base_resolved.path is None:
        raise Skip("no base model resolved, so whether it provides the projector is unknown "
                   "(LD401 says how to pass --base)")
    if ctx.base is None:
        raise Skip("the base model's weights are unreadable (LD401 reports it)")
    bp = base_projector(ctx)
    landed = set(nl_proj) | set(bp)
    base = ctx.base.path
    if landed:
        if want is None or not landed <= set(want) or set(want) <= landed:
            return  # complete, or a different structure: LD301's finding
        missing = sorted(set(want) - landed)
        # A complete smaller structure (mlp2x inside mlp3x) may instead mean a wrong
        # mm_projector_type; which one is unknowable from the keys, so no fix is offered.
        alt = projector_type_of(landed)
        maybe = (f" (the keys that do land form a complete '{alt}' projector: if that is what "
                 "was trained, mm_projector_type is wrong instead)" if alt else "")
        yield Hit(f"{nl.wf.path}: the {declared} projector is incomplete after LLaVA's key "
                  f"rewrite: {_keys(PROJ + m for m in missing)} come from neither this file nor "
                  f"the base {base}, so LLaVA's merge leaves them randomly initialised{maybe}. "
                  "Find the complete non_lora_trainables.bin of this run", path=nl.wf.path,
                  evidence={"missing": [PROJ + m for m in missing], "base": str(base)},
                  fix=FixSafety.none)
        return
    held = (f"it holds {len(nl.wf.tensors)} tensor(s): {_keys(nl.wf.tensors, 4)}"
            if nl.wf.tensors else "it is empty")
    frozen = (" (config.json has freeze_mm_mlp_adapter: true, so the projector was not "
              "trained and not saved)" if lora_config(ctx).get("freeze_mm_mlp_adapter") else "")
    head = (f"{nl.wf.path}: no model.mm_projector.* weights land from it after LLaVA's key "
            f"rewrite ({held}){frozen}, and the base {base} has no projector either: LLaVA's "
            f"merge builds a {declared} projector and leaves it randomly initialised (the only "
            "sign is the 'Some weights of LlavaLlamaForCausalLM were not initialized ... "
            "model.mm_projector...' warning), so the merged model ignores images.")
    renamed = {k: p for k in nl.dropped
               if (p := canonical_param_name(k)) is not None and p.startswith(PROJ)}
    if renamed:
        # `llava-doctor merge` normalises those names itself.
        yield Hit(f"{head} The projector is in the file under names LLaVA drops "
                  f"({_keys(renamed, 3)}): see LD305, whose fix renames them; `llava-doctor "
                  "merge` places them under LLaVA's names itself", path=nl.wf.path,
                  evidence={"base": str(base), "dropped_projector_keys": sorted(renamed)},
                  fix=FixSafety.none, severity={Consumer.llava_doctor: INFO})
        return
    s1 = stage1_projector(ctx) if ctx.projector_resolved.path is not None else None
    s1_type = projector_type_of(s1[1]) if s1 else None
    if s1 is not None and s1_type == declared and _stage1_applies(ctx):
        wf, rel = s1
        inject = {rel[r]: canonical_non_lora_key(PROJ + r) for r in sorted(rel)}
        # `llava-doctor merge` takes the stage-1 projector in that case: exactly right when the
        # projector was frozen in training, a guess otherwise.
        frozen_ok = bool(lora_config(ctx).get("freeze_mm_mlp_adapter"))
        yield Hit(f"{head} `llava-doctor fix --unsafe` injects the stage-1 projector {wf.path} "
                  "under LLaVA's key names (unsafe: it is the projector training started from, "
                  "not a fine-tuned one), and `llava-doctor merge` uses it", path=nl.wf.path,
                  evidence={"base": str(base), "projector": str(wf.path), "inject": inject},
                  fix=FixSafety.unsafe,
                  severity={Consumer.llava_doctor: INFO if frozen_ok else WARN})
        return
    why = (f"the stage-1 projector {s1[0].path} is a {s1_type or 'unrecognised'} projector, not "
           f"{declared}" if s1 is not None and s1_type != declared else
           "no usable stage-1 projector is known")
    yield Hit(f"{head} Pass the stage-1 mm_projector.bin this run started from with --projector "
              f"so `llava-doctor fix --unsafe` can inject it ({why}), or merge onto a base that "
              "has the projector", path=nl.wf.path,
              evidence={"base": str(base)}, fix=FixSafety.none)


# --- LD303 -------------------------------------------------------------------------------------

@check("LD303", "projector-not-from-pretrain", Severity.warning)
def projector_not_from_pretrain(ctx: Context) -> Iterable[Hit]:
    """The fine-tuned projector is far from the projector the fine-tune should have started from.

    ## What it does
    Computes the relative L2 distance ||P_ft − P_start|| / ||P_start|| between the projector in
    `non_lora_trainables.bin` and its starting point: the stage-1 projector (`--projector`, or
    the sibling `*-pretrain/mm_projector.bin`), or for a LoRA trained from a LLaVA checkpoint the
    base's projector (read only with `--scan-base`). Warns above 0.5 and prints the distance of
    every tensor. Skipped with `--fast`.

    ## Why is this bad?
    LLaVA fine-tunes the projector at `--mm_projector_lr 2e-5`, which moves it a few percent. A
    distance near or above 1.0 means the two are unrelated: the fine-tune most likely ran
    without `--pretrain_mm_mlp_adapter` (a randomly initialised projector, trained only by the
    short fine-tune), or the stage-1 file given is from another run. Either way the result is
    not the model the recipe describes.

    ## Example
    `finetune_lora.sh` with the `--pretrain_mm_mlp_adapter` line deleted: distance ≈ 1.4.

    ## Fix
    None: check the training command; if the stage-1 file is the wrong one, pass the right one
    with `--projector`.
    """
    if not ctx.read_values:
        raise Skip("--fast: tensor values are not read")
    nl = non_lora_view(ctx)
    nl_proj = nl.projector() if nl is not None else {}
    if nl is None or not nl_proj:
        raise Skip("no fine-tuned projector lands from non_lora_trainables.bin (LD302/LD305)")
    res = ctx.projector_resolved
    start_wf: dict[str, tuple[WeightFile, str]] = {}
    if res.path is not None and _stage1_applies(ctx):
        s1 = stage1_projector(ctx)
        if s1 is None:
            raise Skip(f"the stage-1 projector {res.path} is unreadable or holds no projector "
                       "(LD306 reports it)")
        start_wf = {r: (s1[0], k) for r, k in s1[1].items()}
        start_desc = f"the stage-1 projector {s1[0].path}"
    elif _trained_from_llava(ctx) and base_projector(ctx):
        if not ctx.options.scan_base:
            raise Skip("trained from a LLaVA checkpoint: its starting point is the base's "
                       "projector, whose values are read only with --scan-base")
        for r, name in base_projector(ctx).items():
            hit = ctx.base.tensors.get(name) if ctx.base is not None else None
            if hit is not None:
                start_wf[r] = (hit[0], name)
        start_desc = f"the base's projector ({ctx.base_path})"
    else:
        raise Skip(res.note or "no stage-1 projector to compare with")
    if set(start_wf) != set(nl_proj) or any(
            tuple(start_wf[r][0].tensors[start_wf[r][1]].shape)
            != tuple(nl.wf.tensors[nl_proj[r]].shape) for r in nl_proj):
        raise Skip(f"{start_desc} does not have the fine-tuned projector's keys and shapes "
                   "(LD306/LD304 report it)")
    diff_sq = ref_sq = 0.0
    per: dict[str, float] = {}
    for r in sorted(nl_proj):
        wf, name = start_wf[r]
        d, n = _squared_distance(ctx, nl.wf, nl_proj[r], wf, name)
        diff_sq += d
        ref_sq += n
        if n > 0:
            per[r] = math.sqrt(d / n)
    if ref_sq == 0 or not math.isfinite(diff_sq):
        raise Skip(f"{start_desc} is all zeros or the values are not finite (LD205)")
    dist = math.sqrt(diff_sq / ref_sq)
    if dist <= DISTANCE_THRESHOLD:
        return
    tensors = ", ".join(f"{r} {v:.2f}" for r, v in per.items())
    found = f" ({res.note})" if res.source == "sibling *-pretrain" and "stage-1" in start_desc \
        else ""
    yield Hit(f"{nl.wf.path}: the fine-tuned projector is at relative distance {dist:.2f} from "
              f"{start_desc}{found} (per tensor: {tensors}); fine-tuning from it at LLaVA's "
              f"projector lr 2e-5 moves it a few percent, and unrelated projectors are 1.0 or "
              f"more apart (warning above {DISTANCE_THRESHOLD}). The fine-tune probably started "
              "without --pretrain_mm_mlp_adapter, or from another stage-1 run: check the "
              "training command, or pass the right stage-1 file with --projector",
              path=nl.wf.path,
              evidence={"distance": round(dist, 6), "per_tensor": {k: round(v, 6)
                                                                   for k, v in per.items()},
                        "threshold": DISTANCE_THRESHOLD, "reference": start_desc})


def _squared_distance(ctx: Context, a: WeightFile, name_a: str, b: WeightFile, name_b: str,
                      ) -> tuple[float, float]:
    """(||a - b||^2, ||b||^2) in float64, streamed in bounded chunks."""
    import numpy as np

    d = n = 0.0
    with np.errstate(all="ignore"):  # inf - inf is NaN, as in torch; LD205 reports it
        for x, y in ctx.paired_values(a, name_a, b, name_b):
            diff = np.subtract(x, y, dtype=np.float64)
            # einsum, not np.dot: BLAS threads cost more than they gain on a busy machine.
            d += float(np.einsum("i,i->", diff, diff))
            n += float(np.einsum("i,i->", y, y, dtype=np.float64))
    return d, n


# --- LD304 -------------------------------------------------------------------------------------

def _layout_for(keys: set[str], declared: str, hidden: int, mm_hidden: int
                ) -> dict[str, tuple[int, ...]] | None:
    """The layout to hold `keys` against: the declared type's if they fit it, else their own."""
    want = expected_projector(declared, hidden, mm_hidden)
    if want is not None and keys <= set(want):
        return want
    inferred = projector_type_of(keys)
    return expected_projector(inferred, hidden, mm_hidden) if inferred else None


def _fits(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # mm_hidden may be unknown (-1): that dimension is not checked.
    if len(actual) != len(expected):
        return False
    return all(e < 0 or a == e for a, e in zip(actual, expected, strict=True))


def _sym(shape: tuple[int, ...]) -> tuple[int | str, ...]:
    return tuple(d if d >= 0 else "C" for d in shape)  # C: mm_hidden_size, unknown here


def _packed_note(actual: tuple[int, ...], expected: tuple[int, ...]) -> str:
    if len(actual) == 2 and actual[1] == 1 and len(expected) == 2 and expected[1] > 0 \
            and actual[0] * 2 == expected[0] * expected[1]:
        return " (bitsandbytes 4-bit packing: saved from a model loaded in 4 bits)"
    return ""


@check("LD304", "projector-dims-mismatch", Severity.error)
def projector_dims_mismatch(ctx: Context) -> Iterable[Hit]:
    """Projector shapes do not fit `hidden_size` / `mm_hidden_size` of the model being merged.

    ## What it does
    Checks every projector tensor the merge would load (from `non_lora_trainables.bin`, else the
    base): the first layer must be `[hidden_size, mm_hidden_size]`, later layers
    `[hidden_size, hidden_size]`, biases `[hidden_size]`, with the sizes from the LoRA dir's
    `config.json` (the base's where it has none). An `identity` projector needs
    `mm_hidden_size == hidden_size`.

    ## Why is this bad?
    The merge fails with `size mismatch for model.mm_projector.0.weight: copying a param with
    shape torch.Size([4096, 1664]) from checkpoint, the shape in current model is
    torch.Size([4096, 1024])` (another vision tower, LLaVA #1161), or `[4096, 1024]` vs
    `[5120, 1024]` (a 7B projector in a 13B model).

    ## Example
    A 7B run's `non_lora_trainables.bin` copied next to a 13B adapter.

    ## Fix
    None: use the projector trained for this LLM and vision tower.
    """
    declared, _ = declared_type(ctx)
    hidden, mm_hidden = model_dims(ctx)
    if hidden is None:
        raise Skip("hidden_size is unknown (no config.json in the LoRA dir or the base)")
    cfg_path = ctx.path / "config.json"
    if expected_projector(declared, 1, 1) == {} and mm_hidden is not None and mm_hidden != hidden:
        yield Hit(f"{cfg_path}: mm_projector_type 'identity' passes vision features through "
                  f"unchanged, which needs mm_hidden_size == hidden_size, but they are "
                  f"{mm_hidden} and {hidden}; the merged model fails on its first image",
                  path=cfg_path, evidence={"mm_hidden_size": mm_hidden, "hidden_size": hidden})
        return
    nl = non_lora_view(ctx)
    nl_proj = nl.projector() if nl is not None else {}
    bp = {r: n for r, n in base_projector(ctx).items() if r not in nl_proj}
    sources: list[tuple[str, dict[str, tuple[Path, str, TensorInfo]]]] = []
    if nl is not None and nl_proj:
        sources.append(("non_lora", {r: (nl.wf.path, k, nl.wf.tensors[k])
                                     for r, k in nl_proj.items()}))
    if bp:
        got = {r: (hit[0], n, hit[1]) for r, n in bp.items() if (hit := _base_info(ctx, n))}
        if got:
            sources.append(("base", got))
    if not sources:
        raise Skip("no projector weights land from non_lora_trainables.bin or the base (LD302)")
    dims = f"hidden_size {hidden}, mm_hidden_size {mm_hidden if mm_hidden else 'unknown'}"
    base_h = ctx.base_config.llm_dims.get("hidden_size") \
        if ctx.base_resolved.path is not None and ctx.base_config is not None else None
    for kind, entries in sources:
        layout = _layout_for(set(entries), declared, hidden, mm_hidden or -1)
        if layout is None:
            continue  # unrecognised structure: LD301
        bad = []
        for r in sorted(entries):
            path, key, info = entries[r]
            if r not in layout or info.numel == 0:  # empty tensors: LD105
                continue
            if not _fits(info.shape, layout[r]):
                bad.append((path, key, r, info.shape, layout[r]))
        if not bad:
            continue
        path, key, r, actual, expected = bad[0]
        exp = _sym(expected)
        err = (f"`size mismatch for {PROJ}{r}: copying a param with shape torch.Size("
               f"{_shape(actual)}) from checkpoint, the shape in current model is torch.Size("
               f"{_shape(exp)})`")
        listing = "; ".join(f"'{k}' is {_shape(a)}, expected {_shape(_sym(e))}"
                            f"{_packed_note(a, e)}" for _, k, _, a, e in bad[:4])
        where = "non_lora_trainables.bin" if kind == "non_lora" else "the base's projector"
        base_note = (f" (the base {ctx.base_path} has hidden_size {base_h})"
                     if base_h is not None and base_h != hidden else "")
        yield Hit(f"{path}: {len(bad)} projector tensor(s) in {where} do not fit the model the "
                  f"LoRA config describes ({dims}){base_note}: {listing}. LLaVA's merge fails "
                  f"with {err}. The projector belongs to another LLM size or vision tower: use "
                  "the one trained for this model", path=path,
                  evidence={"hidden_size": hidden, "mm_hidden_size": mm_hidden,
                            "base_hidden_size": base_h,
                            "tensors": {k: {"actual": list(a), "expected": list(e)}
                                        for _, k, _, a, e in bad}})


# --- LD305 -------------------------------------------------------------------------------------

_LLAVA_HF = re.compile(r"(?:^|\.)multi_modal_projector\.linear_\d+\.")


@check("LD305", "projector-keys-dropped", Severity.error, fix=FixSafety.safe)
def projector_keys_dropped(ctx: Context) -> Iterable[Hit]:
    """`non_lora_trainables.bin` keys that LLaVA's rewrite maps to no parameter: silently dropped.

    ## What it does
    Applies LLaVA's exact rewrite (strip `base_model.`, then `model.` from every key if any key
    starts with `model.model.`) and checks each result against the parameters
    `LlavaLlamaForCausalLM` has for this config: `model.mm_projector.*`, `model.image_newline`
    (only with an `unpad` patch-merge type), `model.embed_tokens.weight`, `lm_head.weight`, the
    Llama layers, `model.vision_resampler.*`, `model.vision_tower.*`. For every key that misses,
    it works out the parameter it means: DDP's `module.`, a bare `mm_projector.*`, llava-hf's
    `multi_modal_projector.linear_k`, a doubled `model.`, peft's `.base_layer.` and
    `modules_to_save.default`.

    ## Why is this bad?
    The builder calls `load_state_dict(non_lora_trainables, strict=False)` and throws the result
    away: unmatched keys vanish without a message and the projector keeps its random init.

    ## Example
    A run saved from a DDP-wrapped model: `module.base_model.model.model.mm_projector.0.weight`.

    ## Fix
    Safe: `llava-doctor fix` renames every key to LLaVA's canonical
    `base_model.model.model.mm_projector.*` form (all keys of the file, so the rewrite stays
    consistent); the tensors are unchanged bit for bit. Unsafe when the renamed keys include LLM
    weights (`.base_layer.` of a backbone that was unfrozen): loading them changes the LLM the
    LoRA is merged into. None when two keys would get the same name.
    """
    if ctx.non_lora_path is None:
        raise Skip("no non_lora_trainables.bin (LD104 reports it)")
    nl = non_lora_view(ctx)
    if nl is None:
        raise Skip("non_lora_trainables.bin is unreadable (LD501/LD502/LD504 report it)")
    # peft's `original_module` is the untrained copy of a modules_to_save layer: dropping is right.
    dropped = {k: v for k, v in nl.dropped.items() if ".original_module." not in f".{k}."}
    if not dropped:
        return
    params = nl.params
    declared = lora_config(ctx).get("mm_projector_type") or DEFAULT_PROJECTOR_TYPE
    target: dict[str, str | None] = {}
    for k in nl.wf.tensors:
        p = canonical_param_name(k)
        target[k] = p if p is not None and params.accepts(p) else None
    # llava-hf has only linear_1/linear_2; a single Linear projector is linear_1 -> `weight`.
    hf = {k: p for k, p in target.items() if p is not None and _LLAVA_HF.search(k)}
    if declared == "linear" and hf and all(p.startswith(PROJ + "0.") for p in hf.values()):
        for k, p in hf.items():
            target[k] = PROJ + p[len(PROJ + "0."):]
    unmappable = sorted(k for k in dropped if target[k] is None)
    owners: dict[str, list[str]] = {}
    for k, p in target.items():
        if p is not None:
            owners.setdefault(p, []).append(k)
    conflicts = sorted(k for p, ks in owners.items() if len(ks) > 1 for k in ks)
    mapping = {k: canonical_non_lora_key(p) for k, p in sorted(target.items())
               if p is not None and k not in conflicts and canonical_non_lora_key(p) != k}
    fixable = [k for k in dropped if k in mapping]
    examples = "; ".join(f"{_rewrite_hint(k, dropped[k])}" for k in sorted(dropped)[:3])
    lost = {canonical_param_name(k) or "" for k in dropped}
    effects = []
    if any(p.startswith(PROJ) for p in lost):
        effects.append("the merged model keeps a randomly initialised projector")
    if NEWLINE in lost:
        effects.append("image_newline stays uninitialised")
    if any(p and not p.startswith((PROJ, NEWLINE)) for p in lost):
        effects.append("the trained values of the other weights are lost")
    effect = (", and ".join(effects) if effects else "their values are lost")
    parts = [f"{nl.wf.path}: {len(dropped)} key(s) map to no parameter of LlavaLlamaForCausalLM "
             f"after LLaVA's key rewrite, so load_state_dict(strict=False) drops them without a "
             f"word: {examples}. {effect[0].upper()}{effect[1:]}."]
    llm = [k for k in mapping if not mapping[k].startswith(
        (canonical_non_lora_key(PROJ), canonical_non_lora_key(NEWLINE),
         canonical_non_lora_key("model.vision_resampler."),
         canonical_non_lora_key("model.vision_tower.")))]
    if fixable:
        first = sorted(fixable)[0]
        safety = ("unsafe: it also loads LLM weights (" + _keys(llm, 2) + ") into the model the "
                  "LoRA is merged into; do it only if training really updated them"
                  if llm else "safe: the tensors are unchanged bit for bit")
        parts.append(f"`llava-doctor fix` renames the file's keys to LLaVA's canonical form "
                     f"('{first}' -> '{mapping[first]}'; {len(mapping)} key(s) in all) ({safety}).")
    if conflicts:
        parts.append(f"Keys {_keys(conflicts, 4)} would get the same name, so they are not "
                     "renamed: keep the one that was trained and delete the other.")
    if unmappable:
        reasons = []
        for k in unmappable[:3]:
            p = canonical_param_name(k)
            if p is None:
                reasons.append(f"'{k}' names no LLaVA parameter")
            elif p == NEWLINE:
                reasons.append(f"'{k}' is image_newline, which the model has only when "
                               f"mm_patch_merge_type contains 'unpad' (it is "
                               f"'{params.patch_merge_type}')")
            else:
                reasons.append(f"'{k}' would be '{p}', which the model built from config.json "
                               "does not have")
        parts.append("No rename helps for " + "; ".join(reasons) + ".")
    fix = FixSafety.none if not fixable else FixSafety.unsafe if llm else FixSafety.safe
    # `llava-doctor merge` applies the same renames itself; what no rename places, it refuses.
    handled = bool(fixable) and not unmappable and not conflicts
    yield Hit(" ".join(parts), path=nl.wf.path,
              evidence={"dropped": dict(sorted(dropped.items())), "mapping": mapping,
                        "unmappable": unmappable, "conflicts": conflicts}, fix=fix,
              severity={Consumer.llava_doctor: INFO} if handled else None)


# --- LD306 -------------------------------------------------------------------------------------

_READ_ERROR_CODE = ((LfsPointerError, "LD504"), (UnsafePickleError, "LD502"),
                    (FileCorruptError, "LD501"))


def _norm_name(s: str | None) -> str | None:
    """A model name's last path component, normalised for comparison (`v1.5` == `v1-5`)."""
    if not s:
        return None
    base = s.rstrip("/").replace("\\", "/").split("/")[-1]
    return re.sub(r"[._]", "-", base.lower()) or None


@check("LD306", "pretrain-projector-invalid", Severity.warning)
def pretrain_projector_invalid(ctx: Context) -> Iterable[Hit]:
    """The stage-1 projector file is unreadable, holds no projector, or does not fit this run.

    ## What it does
    Reads the stage-1 `mm_projector.bin` (`--projector`, or the sibling
    `*-pretrain/mm_projector.bin`) and checks that it has `mm_projector` keys, that their
    structure is the configured `mm_projector_type` and their shapes `[hidden_size,
    mm_hidden_size]`…; if the pretrain dir's `config.json` is there, that it names the same LLM
    and vision tower as the LoRA's config (warning: same-width projectors of another LLM load
    without an error but perform very poorly, MODEL_ZOO.md).

    ## Why is this bad?
    The projector is the input the fixes (LD104, LD302) and the comparison (LD303) rely on; a
    wrong one loads silently (`strict=False` at merge time) or fails training with
    `Missing key(s) in state_dict: "0.weight", ...`. A warning for every consumer: LLaVA's
    LoRA branch never reads the stage-1 file, and when `llava-doctor merge` would need it (no
    projector in `non_lora_trainables.bin` or the base), LD302 is the error.

    ## Example
    A `llava-336px-pretrain-vicuna-7b-v1.3` linear projector passed to an `mlp2x_gelu` run.

    ## Fix
    None: pass the stage-1 file this run was trained from.
    """
    res = ctx.projector_resolved
    if res.path is None:
        raise Skip(res.note or "no stage-1 projector given or found")
    if not _stage1_applies(ctx):
        raise Skip(f"trained from a LLaVA checkpoint: the sibling stage-1 projector {res.path} "
                   "is not this run's starting point (pass --projector to compare anyway)")
    how = "given with --projector" if res.source == "--projector" else "found beside the run"
    wf = ctx.projector
    if wf is None:
        err = ctx.file_errors.get(res.path)
        code = next((c for cls, c in _READ_ERROR_CODE if isinstance(err, cls)), "LD501")
        what = "does not exist" if not res.path.exists() else f"could not be read ({code} says why)"
        yield Hit(f"the stage-1 projector {res.path} ({how}) {what}; the checks and fixes that "
                  "need it (LD302, LD303) cannot use it", path=res.path,
                  evidence={"see": code, "source": res.source})
        return
    rel = {r: k for k, r in projector_keys(wf.tensors).items()}
    if not rel:
        yield Hit(f"{wf.path} ({how}) holds no mm_projector keys ({len(wf.tensors)} tensor(s): "
                  f"{_keys(wf.tensors, 4) or 'none'}): it is not a stage-1 projector. Pass the "
                  "mm_projector.bin of the --tune_mm_mlp_adapter run", path=wf.path,
                  evidence={"tensors": sorted(wf.tensors)[:20]})
        return
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir to compare with (LD101)")
    declared, _ = declared_type(ctx)
    inferred = projector_type_of(rel)
    if inferred != declared:
        yield Hit(f"{wf.path} ({how}) is a {inferred or 'unrecognised'} projector (keys "
                  f"{_keys(rel)}), but the LoRA's config.json builds '{declared}': loading it "
                  "into this model drops or misses keys. Pass the stage-1 projector of this run",
                  path=wf.path, evidence={"expected": declared, "actual": inferred})
        return
    hidden, mm_hidden = model_dims(ctx)
    layout = expected_projector(declared, hidden or -1, mm_hidden or -1)
    if layout is not None:
        bad = {k: (tuple(wf.tensors[k].shape), layout[r]) for r, k in rel.items()
               if r in layout and not _fits(tuple(wf.tensors[k].shape), layout[r])}
        if bad:
            k0, (a, e) = sorted(bad.items())[0]
            yield Hit(f"{wf.path} ({how}): {len(bad)} tensor(s) do not fit the LoRA's model "
                      f"(hidden_size {hidden}, mm_hidden_size {mm_hidden}): '{k0}' is "
                      f"{_shape(a)}, expected {_shape(e)}. It was trained for another LLM size "
                      "or vision tower", path=wf.path,
                      evidence={"tensors": {k: {"actual": list(a), "expected": list(e)}
                                            for k, (a, e) in bad.items()}})
            return
    pre_cfg = wf.path.parent / "config.json"
    if not pre_cfg.is_file():
        return
    try:
        from llava_doctor.artifacts.configs import load_model_config

        pc = load_model_config(pre_cfg)
    except Exception:  # a broken pretrain config is not this check's business
        return
    diffs = {}
    for field_, ours, theirs in (("_name_or_path", ctx.config.name_or_path, pc.name_or_path),
                                 ("mm_vision_tower", ctx.config.mm_vision_tower,
                                  pc.mm_vision_tower)):
        mine, other = _norm_name(ours), _norm_name(theirs)
        if mine and other and mine != other:
            diffs[field_] = {"lora": ours, "pretrain": theirs}
    if diffs:
        listing = "; ".join(f"{f} is '{d['pretrain']}' there and '{d['lora']}' here"
                            for f, d in diffs.items())
        yield Hit(f"{wf.path} ({how}) was trained for another model: {pre_cfg}'s {listing}. "
                  "Same-width projectors load without an error but perform very poorly "
                  "(MODEL_ZOO.md: use the same base LLM and vision encoder); pass the stage-1 "
                  "projector of this run", path=wf.path,
                  evidence={"pretrain_config": str(pre_cfg), "differs": diffs})


# --- LD307 -------------------------------------------------------------------------------------

_HUB_ORGS = (
    (re.compile(r"^clip-vit-", re.I), "openai"),
    (re.compile(r"^CLIP-ViT-.*laion", re.I), "laion"),
)


def hub_id_for(tower: str) -> str | None:
    """The hub id a local vision-tower path's basename names, when recognisable."""
    base = tower.rstrip("/").split("/")[-1]
    for pat, org in _HUB_ORGS:
        if pat.search(base):
            return f"{org}/{base}"
    return None


def _whitelisted(tower: str) -> bool:
    # haotian-liu/LLaVA multimodal_encoder/builder.py: build_vision_tower
    return tower.startswith("openai") or tower.startswith("laion") or "ShareGPT4V" in tower


@check("LD307", "vision-tower-unresolvable",
       by_consumer(llava=ERR, llava_doctor=WARN, peft=INFO), fix=FixSafety.unsafe)
def vision_tower_unresolvable(ctx: Context) -> Iterable[Hit]:
    """`mm_vision_tower` names a local path that does not exist here, or a name LLaVA rejects.

    ## What it does
    Reads `mm_vision_tower` from the LoRA dir's `config.json`. A path (absolute, or starting with
    `./`, `../`, `~`) must exist on this machine; any other value must be an existing path or a
    name LLaVA's `build_vision_tower` accepts: names starting with `openai` or `laion`, or
    containing `ShareGPT4V`. Hub ids are not looked up (no network).

    ## Why is this bad?
    The field records the training machine's `--vision_tower`. LLaVA's merge (and every later
    load) fails with `ValueError: Unknown vision tower: /mnt/.../clip-vit-large-patch14-336/`
    or an `OSError` from `CLIPVisionModel.from_pretrained`: an error for that merge.
    `llava-doctor merge` never loads the tower, so it completes, but the merged config keeps the
    value (warning); peft never builds the tower from this field (info).

    ## Example
    `"mm_vision_tower": "/mnt/share/ckpt/clip-vit-large-patch14-336"` on a laptop.

    ## Fix
    Unsafe: `llava-doctor fix --unsafe` rewrites the field to the hub id the path's basename
    names (`openai/clip-vit-large-patch14-336`); unsafe because the local copy may have been a
    different tower of the same name.
    """
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101/LD501)")
    tower = ctx.config.mm_vision_tower
    if not tower:
        return  # not a LLaVA config: LD101/LD107 territory
    cfg_path = ctx.path / "config.json"
    exists = os.path.exists(tower)  # what LLaVA tests, relative to the merge's cwd
    looks_local = tower.startswith(("/", "./", "../", "~")) or os.path.isabs(tower)
    if exists:
        return
    suggestion = hub_id_for(tower)
    fix = f"`llava-doctor fix --unsafe` rewrites it to '{suggestion}'" if suggestion else \
        "set it to the hub id or a local path of the vision tower this run was trained with"
    evidence = {"file": str(cfg_path), "field": "mm_vision_tower", "actual": tower,
                "expected": suggestion}
    if looks_local:
        tilde = (" (LLaVA does not expand '~': os.path.exists sees the literal path)"
                 if tower.startswith("~") and os.path.exists(os.path.expanduser(tower)) else "")
        yield Hit(f"{cfg_path}: mm_vision_tower is the local path '{tower}', which does not "
                  f"exist on this machine{tilde}: LLaVA's merge fails with `ValueError: Unknown "
                  f"vision tower: {tower}` (or an OSError loading it). {fix}", path=cfg_path,
                  evidence=evidence, fix=FixSafety.unsafe if suggestion else FixSafety.none)
        return
    if _whitelisted(tower):
        return  # a hub id LLaVA accepts
    yield Hit(f"{cfg_path}: mm_vision_tower '{tower}' is neither an existing path nor a name "
              f"haotian-liu/LLaVA's build_vision_tower accepts ({TOWER_WHITELIST}): it raises "
              f"`ValueError: Unknown vision tower: {tower}` (LLaVA-NeXT has its own list). "
              f"{fix}", path=cfg_path, evidence=evidence,
              fix=FixSafety.unsafe if suggestion else FixSafety.none)


# --- LD308 -------------------------------------------------------------------------------------

@check("LD308", "image-newline-missing", Severity.error)
def image_newline_missing(ctx: Context) -> Iterable[Hit]:
    """An `unpad` patch-merge type, but `model.image_newline` is in neither the base nor non_lora.

    ## What it does
    When `mm_patch_merge_type` contains `unpad` (LLaVA-NeXT / v1.6 `spatial_unpad`), checks that
    `model.image_newline` (shape `[hidden_size]`) lands from `non_lora_trainables.bin` after
    LLaVA's key rewrite or is in the base's weights.

    ## Why is this bad?
    `LlavaMetaModel.__init__` creates it with `torch.empty(hidden_size)`: if no checkpoint
    provides it, the merged model separates image rows with uninitialised memory and produces
    garbage on `anyres` images, without any error.

    ## Example
    A v1.6-style run from vicuna whose `non_lora_trainables.bin` lost `image_newline`.

    ## Fix
    None: take it from the run's full `non_lora_trainables.bin` or from the LLaVA base it was
    trained on.
    """
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101/LD501)")
    merge_type = ctx.config.mm_patch_merge_type or "flat"
    if "unpad" not in merge_type:
        return
    hidden, _ = model_dims(ctx)
    nl = non_lora_view(ctx)
    key = nl.key_for(NEWLINE) if nl is not None else None
    found: tuple[Path, str, TensorInfo] | None = None
    if nl is not None and key is not None:
        found = (nl.wf.path, key, nl.wf.tensors[key])
    else:
        if ctx.non_lora_path is not None and nl is None:
            raise Skip("non_lora_trainables.bin is unreadable (LD501/LD502/LD504)")
        if ctx.base_resolved.path is None or ctx.base is None:
            raise Skip("image_newline is not in non_lora_trainables.bin and no readable base is "
                       "resolved to look in (LD401)")
        hit = _base_info(ctx, NEWLINE)
        if hit is not None:
            found = (hit[0], NEWLINE, hit[1])
        elif NEWLINE in ctx.base.tensor_names:
            return  # promised by the index but unreadable: LD401/LD501
    if found is None:
        where = ctx.non_lora_path or (ctx.path / "non_lora_trainables.bin")
        renamed = sorted(k for k in (nl.dropped if nl is not None else {})
                         if canonical_param_name(k) == NEWLINE)
        remedy = (f"It is in the file as '{renamed[0]}', a name LLaVA drops: see LD305, whose "
                  "fix renames it" if renamed else "Take it from the run's complete "
                  "non_lora_trainables.bin or the LLaVA base it was trained on")
        yield Hit(f"{ctx.path / 'config.json'}: mm_patch_merge_type is '{merge_type}', so the "
                  f"model has an image_newline parameter, but neither {where.name} (after "
                  f"LLaVA's key rewrite) nor the base {ctx.base_path} provides "
                  f"'{NEWLINE}': it stays torch.empty (uninitialised memory) and the merged "
                  f"model produces garbage on anyres images. {remedy}",
                  path=where, evidence={"mm_patch_merge_type": merge_type,
                                        "base": str(ctx.base_path), "dropped_as": renamed})
        return
    path, key, info = found
    if hidden is not None and info.numel and tuple(info.shape) != (hidden,):
        yield Hit(f"{path}: '{key}' has shape {_shape(info.shape)}, but the model's "
                  f"image_newline is [{hidden}] (hidden_size): LLaVA's merge fails with a size "
                  "mismatch. It belongs to another model size", path=path,
                  evidence={"actual": list(info.shape), "expected": [hidden]})
