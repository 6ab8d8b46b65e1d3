"""LD2xx: will peft load this adapter onto this base, and would merging it be exact?

The module names, shapes, ranks and scales come from the base's headers (or, without a base,
from the Llama layout the LoRA dir's `config.json` describes) and from peft's own matching
rules, reproduced in `artifacts.peft_match`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_doctor.artifacts import hf_layout, peft_versions
from llava_doctor.artifacts.bounded_re import (
    Evaluation,
    direct,
    evaluate_config,
    shorten,
    with_ancestors,
)
from llava_doctor.artifacts.discovery import Family
from llava_doctor.artifacts.llava import expected_projector
from llava_doctor.artifacts.peft_match import (
    PEFT_PREFIX,
    AdapterModule,
    config_matches,
    effective_r_alpha,
    lora_scaling,
    parse_adapter_keys,
    prepared,
)
from llava_doctor.artifacts.tensors import FLOAT_DTYPES
from llava_doctor.checks.base import BOTH, Hit, Skip, by_consumer, check
from llava_doctor.checks.context import Context
from llava_doctor.models import Consumer, FixSafety, Severity

ERR, WARN, INFO = Severity.error, Severity.warning, Severity.info

# Module-name segments of the multimodal parts (original LLaVA and llava-hf names).
_VISION = ("vision_tower", "vision_model")
_RESAMPLER = ("vision_resampler",)
_PROJECTOR = ("mm_projector", "multi_modal_projector")
# Embedding layers get peft's `lora_embedding_*`; everything else 2-D is a Linear here.
_EMBED_NAMES = frozenset({"embed_tokens", "wte", "wpe", "embed_in", "word_embeddings",
                          "tok_embeddings", "token_embedding", "position_embedding"})
_LLAMA_LIKE = ("llama", "mistral")
_SHOW = 20  # how many names evidence lists keep


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _part(module: str) -> str | None:
    """Which multimodal part a module belongs to (None: the language model)."""
    segs = module.split(".")
    if any(s in _VISION for s in segs):
        return "vision tower"
    if any(s in _RESAMPLER for s in segs):
        return "vision resampler"
    if any(s in _PROJECTOR for s in segs):
        return "projector"
    return None


def _shape(s: Iterable[int]) -> str:
    return f"[{', '.join(str(x) for x in s)}]"


# --- the modules of the model peft wraps at merge time ---------------------------------------

@dataclass(frozen=True)
class ModuleInfo:
    """One module of the base that holds a weight: its kind and weight shape (None: unknown)."""

    kind: str  # linear | embedding | conv | norm | unknown
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class ModuleSet:
    """The modules of the model peft sees, where they came from, and how to say so.

    ``modules`` are named as the adapter's keys name them (the training model's module paths);
    ``targeting`` names the same modules as the model that loads the adapter does, which is what
    peft matches `target_modules` against (None: the same names). ``head`` is the output
    layer, which `all-linear` leaves out. ``multimodal_elsewhere``: LoRA on the vision tower
    and projector is another check's business (LD209 on original LLaVA runs).
    """

    modules: dict[str, ModuleInfo]
    source: str  # "base" | "config"
    where: Path
    projector_from_config: tuple[str, ...] = ()
    targeting: dict[str, ModuleInfo] | None = None
    head: frozenset[str] = frozenset({"lm_head"})
    multimodal_elsewhere: bool = True
    naming: str = ""

    @property
    def describe(self) -> str:
        if self.source == "base":
            return f"the base model {self.where}{self.naming}"
        return (f"the Llama layout {self.where} describes (no base model resolved, so shapes come "
                "from its hidden/intermediate/layer sizes)")

    @staticmethod
    def _wrappable(modules: dict[str, ModuleInfo]) -> list[str]:
        return [n for n, m in modules.items() if m.kind in ("linear", "embedding", "conv",
                                                             "unknown")]

    @property
    def wrappable(self) -> list[str]:
        """Modules peft can put a LoRA on (Linear, Embedding, Conv)."""
        return self._wrappable(self.modules)

    @property
    def linear(self) -> set[str]:
        """What peft's `all-linear` shorthand expands to: every Linear but the output head."""
        return {n for n, m in self.modules.items() if m.kind == "linear" and n not in self.head}

    @property
    def target_wrappable(self) -> list[str]:
        """`wrappable`, named as the loading model names them (what target_modules meets)."""
        return self._wrappable(self.targeting if self.targeting is not None else self.modules)

    @property
    def target_linear(self) -> set[str]:
        mods = self.targeting if self.targeting is not None else self.modules
        return {n for n, m in mods.items() if m.kind == "linear" and n not in self.head}


def _kind(name: str, shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "unknown"
    if len(shape) == 2:
        return "embedding" if name.rsplit(".", 1)[-1] in _EMBED_NAMES else "linear"
    if len(shape) in (3, 4, 5):
        return "conv"
    return "norm" if len(shape) == 1 else "unknown"


def _from_base(ctx: Context) -> ModuleSet | None:
    base = ctx.base
    if base is None or ctx.base_path is None:
        return None
    modules: dict[str, ModuleInfo] = {}
    # The index promises names even for a shard we could not read (LD401/LD501 report it).
    names = set(base.tensor_names) | set(base.tensors)
    for tname in sorted(names):
        module, _, param = tname.rpartition(".")
        if not module or param != "weight":
            continue
        tinfo = base.info(tname)
        shape = tuple(tinfo.shape) if tinfo is not None else None
        modules[module] = ModuleInfo(_kind(module, shape), shape)
    added = _add_config_projector(ctx, modules)
    return ModuleSet(modules, "base", ctx.base_path, tuple(added))


def _from_hf_base(ctx: Context) -> ModuleSet | None:
    """A llava-hf base's modules, named in the layout the adapter's keys use (the training
    transformers'), and for `target_modules` in the layout the target transformers runs."""
    base = ctx.base
    if base is None or ctx.base_path is None:
        return None
    names = set(base.tensor_names) | set(base.tensors)
    base_layout = hf_layout.detect_layout(names) or hf_layout.Layout.canonical
    ad = ctx.adapter
    target = hf_layout.runtime_layout(ctx.options.transformers_version)
    adapter_layout = (hf_layout.detect_adapter_layout(ad.tensors) if ad is not None else None) \
        or target or hf_layout.Layout.canonical
    canonical: dict[str, ModuleInfo] = {}
    for tname in sorted(names):
        module, _, param = hf_layout.to_canonical(tname, base_layout).rpartition(".")
        if not module or param != "weight":
            continue
        tinfo = base.info(tname)
        shape = tuple(tinfo.shape) if tinfo is not None else None
        canonical[module] = ModuleInfo(_kind(module, shape), shape)
    head = hf_layout.TABLE[hf_layout.Layout.canonical][hf_layout.Part.lm_head]

    def named(layout: hf_layout.Layout) -> dict[str, ModuleInfo]:
        return {hf_layout.to_layout(n, layout): i for n, i in canonical.items()}

    runs = target or adapter_layout
    naming = (f" (module names of transformers {ctx.options.transformers_version}, layout "
              f"{runs.value})" if target is not None else f" (module names in the "
              f"{runs.value} layout the adapter was saved with)")
    return ModuleSet(named(adapter_layout), "base", ctx.base_path,
                     targeting=named(runs) if runs != adapter_layout else None,
                     head=frozenset({hf_layout.to_layout(head, lay)
                                     for lay in (adapter_layout, runs)}),
                     multimodal_elsewhere=False, naming=naming)


def _add_config_projector(ctx: Context, modules: dict[str, ModuleInfo]) -> list[str]:
    """LLaVA's builder creates `model.mm_projector` from the LoRA dir's config even on a vicuna
    base, so peft can target it at merge time: add its Linear layers when the base lacks them."""
    cfg = ctx.config
    if cfg is None or not cfg.is_llava or cfg.mm_projector_type is None:
        return []
    hidden, mm_hidden = cfg.llm_dims.get("hidden_size"), cfg.mm_hidden_size
    if not isinstance(hidden, int) or not isinstance(mm_hidden, int):
        return []
    want = expected_projector(cfg.mm_projector_type, hidden, mm_hidden) or {}
    added = []
    for sub, shape in want.items():
        mod, _, param = f"model.mm_projector.{sub}".rpartition(".")
        if param == "weight" and mod not in modules:
            kind = "linear" if len(shape) == 2 else _kind(mod, shape)
            modules[mod] = ModuleInfo(kind, tuple(shape))
            added.append(mod)
    return added


def _from_config(ctx: Context) -> ModuleSet | None:
    """LlamaForCausalLM's modules at the LoRA dir's config.json sizes (no base available)."""
    cfg = ctx.config
    path = ctx.file("config.json")
    if cfg is None or path is None or cfg.text_config is not None:
        return None
    kind = f"{cfg.model_type or ''} {' '.join(cfg.architectures or [])}".lower()
    if not any(k in kind for k in _LLAMA_LIKE):
        return None
    raw = cfg.raw()
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    if not all(isinstance(x, int) and x > 0 for x in (h, i, n, heads)):
        return None
    assert h is not None and i is not None and n is not None and heads is not None
    kv: int = cfg.num_key_value_heads or heads
    head_dim: int = raw["head_dim"] if isinstance(raw.get("head_dim"), int) else h // heads
    shapes = {"self_attn.q_proj": (heads * head_dim, h), "self_attn.k_proj": (kv * head_dim, h),
              "self_attn.v_proj": (kv * head_dim, h), "self_attn.o_proj": (h, heads * head_dim),
              "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
              "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    modules: dict[str, ModuleInfo] = {}
    vocab = cfg.vocab_size
    if isinstance(vocab, int):
        modules["model.embed_tokens"] = ModuleInfo("embedding", (vocab, h))
    for layer in range(n):
        for sub, shape in shapes.items():
            name = f"model.layers.{layer}.{sub}"
            modules[name] = ModuleInfo(_kind(name, shape), shape)
    modules["model.norm"] = ModuleInfo("norm", (h,))
    if isinstance(vocab, int):
        modules["lm_head"] = ModuleInfo("linear", (vocab, h))
    added = _add_config_projector(ctx, modules)
    return ModuleSet(modules, "config", path, tuple(added))


_BUILDERS = {Family.llava: (_from_base, _from_config), Family.llava_hf: (_from_hf_base,)}


def module_set(ctx: Context) -> ModuleSet | None:
    """The modules of the merge-time model: from the base's headers (named per family), else
    from config.json."""
    for build in _BUILDERS[ctx.family]:
        found = build(ctx)
        if found is not None:
            return found
    return None


def require_module_set(ctx: Context) -> ModuleSet:
    """`module_set`, or the check is skipped with the reason."""
    mods = module_set(ctx)
    if mods is None:
        raise Skip("no base model resolved and config.json describes no Llama layout")
    return mods


def _target_version(ctx: Context) -> str | None:
    v = ctx.options.peft_version
    if v is None:
        return None
    try:
        peft_versions.parse_version(v)
    except ValueError:
        return None
    return v


# Fields whose patterns decide which modules peft wraps, and those that decide rank and alpha.
TARGETING_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern")
RANK_FIELDS = ("rank_pattern", "alpha_pattern")


def pattern_eval(ctx: Context) -> Evaluation | None:
    """Every regex of `adapter_config.json`, evaluated once per target with a time bound
    (`artifacts.bounded_re`) over the module names the checks ask about: the merge-time model's
    (and their containers, which peft walks too) and the adapter's. None without a config."""
    if "patterns" in ctx.memo:
        return ctx.memo["patterns"]  # type: ignore[no-any-return]
    cfg = ctx.adapter_config
    ev = None
    if cfg is not None:
        mods = module_set(ctx)
        names = set(mods.modules) if mods is not None else set()
        if mods is not None and mods.targeting is not None:
            names |= set(mods.targeting)  # llava-hf: the loading transformers' names too
        if ctx.adapter is not None:
            names |= set(parse_adapter_keys(ctx.adapter.tensors).modules)
        v = _target_version(ctx)
        ev = evaluate_config(cfg, with_ancestors(names),
                             peft_version=peft_versions.parse_version(v) if v else None)
    ctx.memo["patterns"] = ev
    return ev


def _skip_if_blocked(ev: Evaluation | None, fields: Iterable[str]) -> None:
    blocked = ev.blocked(fields) if ev is not None else None
    if blocked is not None:
        raise Skip(f"{blocked.describe()} (LD210)")


# --- LD210 ---------------------------------------------------------------------------------

@check("LD210", "pattern-over-budget", Severity.error, families=BOTH)
def pattern_over_budget(ctx: Context) -> Iterable[Hit]:
    """A regular expression in `adapter_config.json` runs longer than its time budget.

    ## What it does
    Evaluates every pattern peft reads from `adapter_config.json` — `target_modules` and
    `exclude_modules` given as strings, `modules_to_save` entries, `layers_pattern`, the keys
    of `rank_pattern` and `alpha_pattern` — with peft's own templates and Python's `re`, over
    every module name of the merge-time model, in a child process stopped after 1 s per pattern
    (3 s for all the patterns of the config; more than 1,000 patterns are not evaluated at all).
    Patterns that finish give exactly peft's answers; the checks that need a pattern over
    budget are skipped with this reason.

    ## Why is this bad?
    peft evaluates these patterns with `re` on every module name while it builds the LoRA
    layers; a catastrophic pattern (nested quantifiers such as `(a+)+$`, `(.*)*x(.*)*y`)
    backtracks exponentially, so `PeftModel.from_pretrained` and LLaVA's merge hang at 100% CPU
    without a message. An artifact from an untrusted source can stall a CI job this way.

    ## Example
    `"target_modules": "^(a+)+$|(.*)*x(.*)*y(.*)*z"`.

    ## Fix
    None automatic: replace the pattern with the list of module names it was meant to select
    (e.g. `["q_proj", "v_proj"]`), or a pattern without nested quantifiers.
    """
    if ctx.adapter_config is None:
        raise Skip("no readable adapter_config.json")
    ev = pattern_eval(ctx)
    path = ctx.file("adapter_config.json")
    over = ev.over_budget if ev is not None else []
    for v in [v for v in over if v.status == "over-budget" or v.use == "all"]:
        yield Hit(f"{path}: {v.describe()}. The checks that need it are skipped. Replace it "
                  "with the list of module names it was meant to select, or a pattern without "
                  "nested quantifiers", path=path,
                  evidence={"field": v.field, "pattern": v.pattern if len(v.pattern) <= 4096
                            else shorten(v.pattern), "pattern_chars": len(v.pattern),
                            "status": v.status, "budget_s": v.budget, "module_names": v.names,
                            "template": v.use})
    rest = [v for v in over if v.status == "not-evaluated" and v.use != "all"]
    if rest:
        yield Hit(f"{path}: {len(rest)} more pattern(s) were not evaluated ({rest[0].error}), "
                  f"e.g. the {rest[0].field} pattern {shorten(rest[0].pattern)}; peft would "
                  "evaluate them too. The checks that need them are skipped", path=path,
                  evidence={"status": "not-evaluated", "count": len(rest),
                            "fields": sorted({v.field for v in rest}),
                            "patterns": [shorten(v.pattern) for v in rest[:_SHOW]]})


# --- LD201 ---------------------------------------------------------------------------------

def _loader_behaviour(version: str, first: str) -> tuple[str, str]:
    v = peft_versions.parse_version(version)
    if v < (0, 6, 0):
        return "ignores", (f"peft {version} ignores keys it does not know without a word, so the "
                           "adapter loads with whatever those keys changed silently undone")
    if v < (0, 14, 0):
        return "TypeError", (f"peft {version} refuses the file: `TypeError: LoraConfig.__init__() "
                             f"got an unexpected keyword argument '{first}'`")
    return "warns", (f"peft {version} drops them with only a warning (`Unexpected keyword "
                     "arguments [...] for class LoraConfig, these are ignored.`)")


def rewritable_alpha(alpha: Any, r: Any) -> bool:
    """Whether `exact_plain_alpha` can rewrite this pair: a finite alpha, a positive r that
    floats hold exactly (a 400-digit r has no square root as a float)."""
    return (isinstance(r, int) and not isinstance(r, bool) and 0 < r <= 2**53
            and isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
            and math.isfinite(alpha))


def _peft_loaders(severity: Severity) -> dict[Consumer, Severity]:
    """`severity` for the consumers that load adapter_config.json with the target peft (LLaVA's
    merge and peft's); info for `llava-doctor merge`, which reads it itself."""
    return by_consumer(llava=severity, llava_doctor=INFO, peft=severity)


def exact_plain_alpha(alpha: float, r: int) -> float:
    """A `lora_alpha` whose plain-LoRA scaling `new / r` equals rslora's `alpha / sqrt(r)`, as
    Python (and peft) compute both in floating point."""
    target = alpha / math.sqrt(r)
    cand = target * r
    if cand / r == target:
        return cand
    lo = hi = cand
    for _ in range(64):  # a few ulps either side always suffice
        lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
        for c in (lo, hi):
            if c / r == target:
                return c
    return cand


def _rslora_rewrite(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The plain-LoRA config fields equivalent to this rslora config, or None when rank_pattern
    makes per-module ranks that one alpha per pattern key cannot express for old peft."""
    if raw.get("rank_pattern"):
        return None
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not rewritable_alpha(alpha, r):
        return None
    assert isinstance(r, int) and isinstance(alpha, (int, float))
    out: dict[str, Any] = {"use_rslora": None, "lora_alpha": exact_plain_alpha(float(alpha), r)}
    pattern = raw.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(rewritable_alpha(a, r) for a in pattern.values()):
        return None
    if pattern:
        out["alpha_pattern"] = {k: exact_plain_alpha(float(a), r) for k, a in pattern.items()}
    return out


@check("LD201", "adapter-config-version",
       by_consumer(llava=WARN, llava_doctor=INFO, peft=WARN), fix=FixSafety.safe, families=BOTH)
def adapter_config_version(ctx: Context) -> Iterable[Hit]:
    """`adapter_config.json` has fields the peft that will load it does not know.

    ## What it does
    Compares the keys of `adapter_config.json` with the `LoraConfig` fields of the target peft
    (`--peft-version`, default: the installed peft) using peft's field history, and sorts each
    unknown key: holds its default, holds a value that does not change the maths (e.g.
    `peft_version`), or changes the maths (`use_rslora: true` before 0.8, `use_dora: true` before
    0.9, `layer_replication` before 0.10, `lora_bias: true` before 0.14, ...). For LLaVA's merge
    and peft (both load the file with the target peft): an error when that peft refuses the file
    (0.6-0.13) or the adapter would compute something else, a warning for keys no peft release
    knows, info when dropping the unknown keys is exact. Info for `llava-doctor merge`, which
    reads the config itself and does the maths (LD206 says what it cannot do).

    ## Why is this bad?
    LLaVA leaves peft unpinned, so training and merging environments drift. peft <= 0.5
    silently ignores unknown keys; 0.6-0.13 refuse the file with `TypeError:
    LoraConfig.__init__() got an unexpected keyword argument 'use_dora'`; >= 0.14 drop them with
    a warning. Dropping `use_rslora: true` changes every module's scale from `alpha/sqrt(r)`
    to `alpha/r` (2.0 instead of 22.6 for r=128, alpha=256).

    ## Example
    An adapter saved by peft 0.10 (`use_dora`, `layer_replication` keys, both at defaults)
    merged in an environment with peft 0.8.

    ## Fix
    Safe when every unknown key holds its default or does not change the maths: `llava-doctor
    fix` drops them. Unsafe for `use_rslora: true` on peft < 0.8: the config is rewritten as
    plain LoRA with `lora_alpha` set so that `lora_alpha / r` equals `alpha / sqrt(r)` exactly.
    Otherwise none: upgrade peft to a version that knows the fields.
    """
    version = ctx.options.peft_version
    if version is None:
        yield from _needed_peft(ctx)
        return
    try:
        peft_versions.parse_version(version)
    except ValueError:
        raise Skip(f"--peft-version '{version}' is not a version number") from None
    raw = ctx.adapter_config_raw
    if raw is None:
        raise Skip("no readable adapter_config.json")
    groups = peft_versions.classify_unknown_fields(raw, version)
    defaults, neutral = list(groups.defaults), list(groups.neutral)
    math_fields, alien = list(groups.math), list(groups.unrecognised)
    unknown = [k for k in raw if k in {*defaults, *neutral, *math_fields, *alien}]
    if not unknown:
        return
    path = ctx.file("adapter_config.json")
    behaviour, consequence = _loader_behaviour(version, unknown[0])
    refused = behaviour == "TypeError"  # the target peft does not load the file at all
    since = {k: peft_versions.first_version_of(k) for k in unknown}
    newest = max((s for s in since.values() if s), key=peft_versions.parse_version, default=None)
    evidence: dict[str, Any] = {
        "target_peft": version, "loader": behaviour, "unknown": {k: raw[k] for k in unknown},
        "first_version": since, "default": defaults, "no_math_effect": neutral,
        "changes_math": math_fields, "unrecognised": alien,
    }
    listing = ", ".join(f"{k}={_json(raw[k])}" for k in unknown)
    upgrade = f"upgrade peft to >= {newest}" if newest else "upgrade peft"
    if math_fields:
        notes = "; ".join(
            f"{k}={_json(raw[k])}: {peft_versions.FIELDS[k].note or 'changes the maths'}"
            for k in math_fields)
        rewrite = _rslora_rewrite(raw) if set(math_fields) == {"use_rslora"} else None
        fix = FixSafety.none
        remedy = upgrade
        if rewrite is not None:
            evidence["rewrite"] = rewrite
            fix = FixSafety.unsafe
            remedy += (f", or run `llava-doctor fix --unsafe`, which rewrites it as plain LoRA "
                       f"with lora_alpha={rewrite['lora_alpha']!r} (alpha/r then equals the rslora "
                       "scale alpha/sqrt(r) exactly)")
        yield Hit(f"{path} has fields peft {version} does not know ({listing}); {consequence}, "
                  f"and without them the adapter computes something else: {notes}. {remedy}",
                  path=path, evidence=evidence, severity=_peft_loaders(ERR), fix=fix)
        return
    if alien:
        yield Hit(f"{path} has fields peft {version} does not know ({listing}); {consequence}. "
                  f"{', '.join(alien)} is unknown to every peft release up to "
                  f"{peft_versions.LATEST_KNOWN}, so whether dropping it changes the maths cannot "
                  f"be told: {upgrade} or check where the key comes from",
                  path=path, evidence=evidence, fix=FixSafety.none,
                  severity=_peft_loaders(ERR if refused else WARN))
        return
    what = "all hold their defaults" if not neutral else (
        "they hold defaults or values that do not change the maths (" + ", ".join(neutral) + ")")
    yield Hit(f"{path} has fields peft {version} does not know ({listing}); {consequence}. "
              f"{what}, so dropping them is exact: `llava-doctor fix` removes them (safe), or "
              f"{upgrade}", path=path, evidence=evidence, fix=FixSafety.safe,
              severity=_peft_loaders(ERR if refused else INFO))


def _needed_peft(ctx: Context) -> Iterable[Hit]:
    """Without a target peft (none installed, no --peft-version), name the oldest peft that knows
    every field of the file: the merge usually runs in another environment, so say what it needs."""
    raw = ctx.adapter_config_raw
    if raw is None:
        raise Skip("no readable adapter_config.json")
    since = {k: peft_versions.first_version_of(k) for k in raw}
    known = {k: v for k, v in since.items() if v is not None}
    alien = sorted(k for k, v in since.items() if v is None)
    newest_key = max(known, key=lambda k: peft_versions.parse_version(known[k]), default=None)
    if newest_key is None and not alien:
        return
    path = ctx.file("adapter_config.json")
    needs = (f"needs peft >= {known[newest_key]} (its newest field, {newest_key}, first appeared "
             f"there)" if newest_key is not None else "has no field any peft release knows")
    extra = (f"; {', '.join(alien)} is unknown to every peft release up to "
             f"{peft_versions.LATEST_KNOWN}" if alien else "")
    yield Hit(f"{path} {needs}{extra}. No peft is installed here and no --peft-version was given: "
              "pass --peft-version to check against the merge environment's peft",
              path=path, severity=Severity.info, fix=FixSafety.none,
              evidence={"target_peft": None,
                        "needs_peft": known[newest_key] if newest_key is not None else None,
                        "first_version": since, "unrecognised": alien})


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


# --- LD202 ---------------------------------------------------------------------------------

@check("LD202", "target-modules-missing", Severity.error, families=BOTH)
def target_modules_missing(ctx: Context) -> Iterable[Hit]:
    """`target_modules` selects no module of the base model.

    ## What it does
    Applies peft's own matching rule (`check_target_module_exists`: a string is a regex that
    must match the whole module name, a list matches exact names or `.name` suffixes, then
    `layers_to_transform`/`layers_pattern` and `exclude_modules`) to every Linear/Embedding
    module of the base (from its headers; without a base, from the Llama layout the LoRA dir's
    `config.json` describes) plus the projector LLaVA's builder creates.

    ## Why is this bad?
    peft refuses the adapter: `ValueError: Target modules {...} not found in the base model.
    Please check the target modules and try again.` A regex written for llava-hf
    (`language_model.model.layers...`) never matches an original-LLaVA base.

    ## Example
    `"target_modules": "language_model.*(q_proj|v_proj)"` with a vicuna base.

    ## Fix
    None automatic: use the base the adapter was trained on, or correct `target_modules`.
    """
    cfg = ctx.adapter_config
    if cfg is None:
        raise Skip("no readable adapter_config.json")
    raw = ctx.adapter_config_raw or {}
    if cfg.target_modules is None and raw.get("target_parameters"):
        raise Skip("the adapter targets parameters, not modules (see LD206)")
    mods = require_module_set(ctx)
    path = ctx.file("adapter_config.json")
    if cfg.target_modules is None:
        yield Hit(f"{path} has no target_modules: peft falls back to its per-architecture "
                  "default (q_proj/v_proj for Llama) or refuses the config; set target_modules "
                  "to the modules the adapter holds", path=path,
                  evidence={"target_modules": None})
        return
    ev = pattern_eval(ctx)
    _skip_if_blocked(ev, TARGETING_FIELDS)
    fast_cfg = prepared(cfg)
    try:
        matched = [n for n in mods.target_wrappable
                   if config_matches(fast_cfg, n, mods.target_linear, matcher=ev or direct)]
    except re.error as e:
        yield Hit(f"{path}: target_modules {_json(cfg.target_modules)} (or an exclude_modules/"
                  f"modules_to_save entry, which peft also reads as a regex) is not a valid "
                  f"regular expression ({e}); peft fails with re.error. Correct it", path=path,
                  evidence={"target_modules": cfg.target_modules, "regex_error": str(e)})
        return
    if matched:
        return
    wrappable = mods.target_wrappable
    example = next((n for n in wrappable if ".layers.0." in n), None) or \
        (wrappable[0] if wrappable else None)
    filters = {k: raw.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules")
               if raw.get(k) not in (None, [], "")}
    extra = f" (with {', '.join(f'{k}={_json(v)}' for k, v in filters.items())})" if filters else ""
    yield Hit(f"{path}: target_modules {_json(cfg.target_modules)}{extra} selects none of the "
              f"{len(wrappable)} Linear/Embedding modules of {mods.describe} (e.g. "
              f"'{example}'); peft refuses it: `ValueError: Target modules "
              f"{cfg.target_modules} not found in the base model.` Use the base the adapter was "
              "trained on, or correct target_modules", path=path,
              evidence={"target_modules": cfg.target_modules, "filters": filters,
                        "modules_source": mods.source, "example_module": example})


# --- LD203 ---------------------------------------------------------------------------------

def _expected(mod: AdapterModule, info: ModuleInfo, r: int,
              head: frozenset[str] = frozenset({"lm_head"})) -> dict[str, tuple[int, ...]]:
    """Adapter key -> the shape peft gives that parameter for a rank-r LoRA on this module."""
    shape = info.shape
    if shape is None or len(shape) != 2:
        return {}
    out: dict[str, tuple[int, ...]] = {}
    if info.kind == "embedding":
        num, dim = shape
        if mod.embedding_A:
            out[mod.embedding_A] = (r, num)
        if mod.embedding_B:
            out[mod.embedding_B] = (dim, r)
        if mod.magnitude:
            out[mod.magnitude] = (dim,)
    else:
        o, i = shape
        if mod.A:
            out[mod.A] = (r, i)
        if mod.B:
            out[mod.B] = (o, r)
        if mod.lora_bias:
            out[mod.lora_bias] = (o,)
        if mod.magnitude:
            out[mod.magnitude] = (o,)
    if mod.bias:
        out[mod.bias] = (shape[0] if info.kind != "embedding" else shape[1],)
    # A full replacement must fit the base; resized vocabularies are LD403's business.
    if mod.weight and info.kind != "embedding" and mod.name not in head:
        out[mod.weight] = shape
    return out


@check("LD203", "adapter-shape-mismatch", Severity.error, families=BOTH)
def adapter_shape_mismatch(ctx: Context) -> Iterable[Hit]:
    """A `lora_A`/`lora_B` pair does not fit the base weight it adapts, or its rank disagrees
    with `r`/`rank_pattern`.

    ## What it does
    For every adapted module checks `lora_A` is `[r, in]` and `lora_B` is `[out, r]` against the
    base weight `[out, in]` (embeddings: `lora_embedding_A` `[r, num_embeddings]`,
    `lora_embedding_B` `[dim, r]`; DoRA magnitudes and LoRA biases `[out]`), and that `r` is
    the rank peft gives the module from `r` and `rank_pattern` (with the target peft's pattern
    rules). Without a base the shapes come from the LoRA dir's `config.json` and the message
    says so.

    ## Why is this bad?
    peft fails with `size mismatch for base_model.model.model.layers.0.self_attn.q_proj.lora_A.
    default.weight: copying a param with shape torch.Size([128, 4096]) from checkpoint, the
    shape in current model is torch.Size([128, 5120])` - a 7B adapter on a 13B base, or a
    `rank_pattern` the loading peft reads differently.

    ## Example
    A LoRA trained on vicuna-7b merged onto vicuna-13b.

    ## Fix
    None automatic: use the base the adapter was trained on; for a rank disagreement, correct
    `r`/`rank_pattern` in `adapter_config.json` to the ranks the tensors have.
    """
    ad = ctx.adapter
    if ad is None:
        raise Skip("no readable adapter file")
    mods = require_module_set(ctx)
    cfg = ctx.adapter_config
    version = _target_version(ctx)
    ev = pattern_eval(ctx)
    slow = ev.blocked(RANK_FIELDS) if ev is not None else None
    dims: list[dict[str, Any]] = []
    ranks: list[dict[str, Any]] = []
    bad_pattern: str | None = None
    for mod in parse_adapter_keys(ad.tensors).modules.values():
        info = mods.modules.get(mod.name)
        if info is None:
            continue  # no such module: LD207
        a_key = mod.A or mod.embedding_A
        b_key = mod.B or mod.embedding_B
        a = ad.tensors[a_key].shape if a_key else None
        b = ad.tensors[b_key].shape if b_key else None
        if a is not None and len(a) != 2 or b is not None and len(b) != 2:
            continue  # [0]-shaped ZeRO-3 leftovers are LD105's; conv kernels are not checked
        file_r = a[0] if a is not None else (b[1] if b is not None else None)
        if a is not None and b is not None and a[0] != b[1]:
            dims.append({"key": b_key, "expected": [b[0], a[0]], "actual": list(b),
                         "why": f"lora_A has rank {a[0]} but lora_B has rank {b[1]}"})
        if cfg is not None and file_r is not None and (a_key or b_key) and bad_pattern is None \
                and slow is None:
            try:
                want_r, _ = effective_r_alpha(cfg, mod.name, version, matcher=ev or direct)
            except re.error as e:
                bad_pattern = str(e)
                want_r = file_r
            if want_r != file_r:
                ranks.append({"module": mod.name, "config_r": want_r, "file_r": file_r,
                              "key": a_key or b_key})
        if file_r is None:
            file_r = 0
        for key, want in _expected(mod, info, file_r, mods.head).items():
            got = tuple(ad.tensors[key].shape)
            if got != tuple(want) and not (len(got) == 1 and got == (0,)):
                dims.append({"key": key, "expected": list(want), "actual": list(got),
                             "why": f"{mod.name} is {_shape(info.shape or ())} in {mods.source}"})
    if slow is not None and not dims:
        raise Skip(f"{slow.describe()} (LD210); the ranks cannot be compared")
    if dims:
        d = dims[0]
        peft_key = _with_adapter_name(d["key"])
        yield Hit(f"{ad.path}: {len(dims)} adapter tensor(s) do not fit {mods.describe}, e.g. "
                  f"'{d['key']}' is {_shape(d['actual'])} where {_shape(d['expected'])} is "
                  f"expected ({d['why']}); peft fails with `size mismatch for {peft_key}: copying "
                  f"a param with shape torch.Size({d['actual']}) from checkpoint, the shape in "
                  f"current model is torch.Size({d['expected']})`. The adapter was trained on "
                  "another model: use the base it was trained on", path=ad.path,
                  evidence={"mismatches": dims[:_SHOW], "count": len(dims),
                            "modules_source": mods.source})
    if bad_pattern is not None:
        acfg = ctx.file("adapter_config.json")
        yield Hit(f"{acfg}: a rank_pattern/alpha_pattern key is not a valid regular expression "
                  f"({bad_pattern}); peft fails with re.error while building the LoRA layers. "
                  "Correct the pattern", path=acfg or ad.path,
                  evidence={"regex_error": bad_pattern})
    if ranks:
        k = ranks[0]
        seen = sorted({(x["config_r"], x["file_r"]) for x in ranks})
        acfg = ctx.file("adapter_config.json")
        yield Hit(f"{ad.path}: {len(ranks)} module(s) have a rank that {acfg} does not give "
                  f"them, e.g. '{k['module']}' holds rank {k['file_r']} but r/rank_pattern give "
                  f"{k['config_r']}" + (f" under peft {version}'s pattern rules" if version else "")
                  + "; peft builds the layer at the config's rank and fails with `size mismatch`, "
                  "and the scale alpha/r would be wrong. Set r/rank_pattern to the tensors' ranks",
                  path=acfg or ad.path,
                  evidence={"rank_mismatches": ranks[:_SHOW], "count": len(ranks),
                            "config_vs_file": [list(p) for p in seen], "target_peft": version})


def _with_adapter_name(key: str) -> str:
    """The in-memory name peft reports in size-mismatch errors (`.default` inserted)."""
    for seg in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                "lora_magnitude_vector"):
        tag = f".{seg}"
        if tag in key:
            head, _, tail = key.partition(tag)
            return f"{head}{tag}.default{tail}"
    return key


# --- the LoRA scaling: finite, and within the output dtype --------------------------------------

#: float32's largest finite value: peft multiplies the delta by the scaling in the weights'
#: float type (float32 arithmetic for fp16/bf16/fp32 weights), as the streaming merge does.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class ModuleScale:
    """The scaling peft gives one LoRA module (``module`` None: the config's own r/alpha)."""

    module: str | None
    r: Any
    alpha: Any
    rslora: bool
    scaling: float  # NaN when peft's formula has no value (r = 0, sqrt of a negative r, ...)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.scaling) and abs(self.scaling) <= FLOAT32_MAX

    def formula(self) -> str:
        den = f"sqrt({_num(self.r)})" if self.rslora else _num(self.r)
        return f"lora_alpha / {'sqrt(r)' if self.rslora else 'r'} = {_num(self.alpha)} / {den}"


def _num(x: Any) -> str:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10**30:
        return f"a {len(str(abs(x))):,}-digit number"
    return repr(x) if isinstance(x, float) else str(x)


def _scale_of(r: Any, alpha: Any, rslora: bool) -> float:
    try:
        value = lora_scaling(r, alpha, rslora)
        return float(value)
    except (ZeroDivisionError, ValueError, OverflowError, TypeError):
        return math.nan


def lora_scales(ctx: Context) -> list[ModuleScale]:
    """peft's scaling for every LoRA module of the adapter (r/alpha patterns and rslora under
    the target peft's rules), or for the config's r/lora_alpha without a readable adapter.

    Raises Skip without a config, or when a rank/alpha pattern is over its time budget.
    """
    cfg = ctx.adapter_config
    if cfg is None:
        raise Skip("no readable adapter_config.json")
    if cfg.r is None or cfg.lora_alpha is None:
        raise Skip("adapter_config.json has no r or lora_alpha")
    version = _target_version(ctx)
    v = peft_versions.parse_version(version) if version else None
    rslora = bool(cfg.use_rslora) and (v is None or v >= (0, 8, 0))
    ev = pattern_eval(ctx)
    _skip_if_blocked(ev, RANK_FIELDS)
    modules = []
    if ctx.adapter is not None:
        modules = [m.name for m in parse_adapter_keys(ctx.adapter.tensors).modules.values()
                   if m.is_lora or m.is_embedding_lora]
    out = []
    for name in modules:
        try:
            r, alpha = effective_r_alpha(cfg, name, version, matcher=ev or direct)
        except re.error:
            continue  # an invalid pattern is LD202/LD203's finding
        out.append(ModuleScale(name, r, alpha, rslora, _scale_of(r, alpha, rslora)))
    if not out:
        out.append(ModuleScale(None, cfg.r, cfg.lora_alpha, rslora,
                               _scale_of(cfg.r, cfg.lora_alpha, rslora)))
    return out


@dataclass(frozen=True)
class DeltaBound:
    """An upper bound on |scaling * B @ A| (or |scaling * lora_B.bias|) of one module, from
    the largest magnitudes of its tensors: |sum_k B_ik A_kj| <= r * max|B| * max|A|."""

    module: str
    key: str
    bound: float
    scaling: float
    rank: int
    max_b: float
    max_a: float | None  # None for a LoRA bias (scaling * max|bias|)


def delta_bounds(ctx: Context) -> list[DeltaBound]:
    """`DeltaBound` of every plain-LoRA module whose scaling is finite (values are read).

    DoRA modules are left out: the magnitude vector renormalises the sum, so this bound does
    not hold for them.
    """
    ad = ctx.adapter
    if ad is None:
        return []
    scales = {s.module: s for s in lora_scales(ctx) if s.module is not None and s.finite}
    stats = ctx.all_stats(ad)
    out = []
    for mod in parse_adapter_keys(ad.tensors).modules.values():
        sc = scales.get(mod.name)
        a_key, b_key = mod.A or mod.embedding_A, mod.B or mod.embedding_B
        if sc is None or mod.magnitude or a_key is None or b_key is None:
            continue
        a, b = ad.tensors[a_key], ad.tensors[b_key]
        if len(a.shape) != 2 or a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
            continue
        sa, sb = stats.get(a_key), stats.get(b_key)
        if sa is None or sb is None:
            continue
        rank = a.shape[0]
        s = abs(sc.scaling)
        out.append(DeltaBound(mod.name, b_key, s * rank * sb.max_abs * sa.max_abs, sc.scaling,
                              rank, sb.max_abs, sa.max_abs))
        if mod.lora_bias and mod.lora_bias in stats:
            sbias = stats[mod.lora_bias]
            out.append(DeltaBound(mod.name, mod.lora_bias, s * sbias.max_abs, sc.scaling, rank,
                                  sbias.max_abs, None))
    return out


# --- LD204 / LD205: values -------------------------------------------------------------------

@check("LD204", "adapter-untrained", Severity.warning, families=BOTH)
def adapter_untrained(ctx: Context) -> Iterable[Hit]:
    """Every `lora_B` is exactly zero: the adapter was never trained and merging it is a no-op.

    ## What it does
    Reads the factor peft initialises to zero in every LoRA module (`lora_B`, and
    `lora_embedding_A` for embeddings) and reports when all of them are still exactly zero.
    Skipped with `--fast`. DoRA adapters are not reported: their magnitudes can change the
    model even with zero deltas.

    ## Why is this bad?
    The merged model is identical to the base. LLaVA-NeXT's `--mm_tunable_parts` without
    `mm_language_model` froze the LoRA after `get_peft_model`, so whole runs trained only the
    projector.

    ## Example
    A LoRA output whose `adapter_model.safetensors` is byte-identical across checkpoints.

    ## Fix
    None automatic: retrain with the LoRA parameters trainable.
    """
    if not ctx.read_values:
        raise Skip("--fast: tensor values are not read")
    ad = ctx.adapter
    if ad is None:
        raise Skip("no readable adapter file")
    mods = parse_adapter_keys(ad.tensors).modules.values()
    zero_init = [k for m in mods for k in (m.B, m.embedding_A) if k is not None]
    if not zero_init:
        raise Skip("the adapter holds no LoRA tensors (see LD105)")
    if any(m.magnitude for m in mods):
        raise Skip("DoRA: magnitudes can change the model even when every lora_B is zero")
    zero_init = [k for k in zero_init if ad.tensors[k].numel > 0]
    if not zero_init:
        raise Skip("the LoRA tensors are empty (see LD105)")
    stats = ctx.all_stats(ad)
    if not all(stats[k].all_zero for k in zero_init):
        return
    # `base_layer` copies (save_embedding_layers) are the base's own weights, not a change.
    full = [k for m in mods for k in (m.weight, m.bias)
            if k is not None and ".base_layer." not in k]
    rest = (f" (only the {len(full)} full tensors it also holds, e.g. '{full[0]}', would change "
            "the model)") if full else ""
    yield Hit(f"{ad.path}: all {len(zero_init)} lora_B tensors are exactly zero, as peft "
              f"initialises them, so the adapter was never trained and merging it leaves the base "
              f"unchanged{rest}. Check that the LoRA parameters were trainable (LLaVA-NeXT "
              "--mm_tunable_parts) and use a trained checkpoint", path=ad.path,
              evidence={"zero_tensors": len(zero_init), "example": zero_init[0],
                        "full_tensors": full[:_SHOW]})


@check("LD205", "nonfinite-weights", Severity.error, families=BOTH)
def nonfinite_weights(ctx: Context) -> Iterable[Hit]:
    """NaN or Inf values in the adapter, `non_lora_trainables.bin` or the stage-1 projector.

    ## What it does
    Computes the scaling peft gives every LoRA module (`lora_alpha / r`, rslora's
    `lora_alpha / sqrt(r)`, with `rank_pattern`/`alpha_pattern`) and reports one that is NaN,
    infinite or beyond float32's range (also with `--fast`). Then reads every floating-point
    tensor of those files (one streaming pass shared with the other value checks) and names
    each tensor holding NaN or Inf (skipped with `--fast`).

    ## Why is this bad?
    A single NaN in `lora_B` spreads through `B @ A` into a whole merged weight; peft's
    `safe_merge` stops with `NaNs detected in the merged weights`, the default merge writes them
    and the model then fails with `probability tensor contains either inf, nan or element < 0`.
    A scaling of `1e308 / 8` multiplies every delta into `inf` the same way, and `r: 0` has no
    scaling at all.

    ## Example
    A run whose loss went to NaN in its last steps before the final save; a hand-edited
    `"lora_alpha": 1e308`.

    ## Fix
    None automatic: use an earlier checkpoint whose weights are finite, or restore `r` and
    `lora_alpha` from the training run.
    """
    try:
        scales = lora_scales(ctx)
    except Skip:
        scales = []
    bad_scale = [s for s in scales if not s.finite]
    if bad_scale:
        s0 = bad_scale[0]
        acfg = ctx.file("adapter_config.json")
        what = "has no value" if math.isnan(s0.scaling) else (
            "is infinite" if math.isinf(s0.scaling) else
            f"is {s0.scaling:.4g}, beyond float32's range ({FLOAT32_MAX:.4g})")
        where = (f"{len(bad_scale)} LoRA module(s), e.g. '{s0.module}'" if s0.module is not None
                 else "every LoRA module")
        yield Hit(f"{acfg}: the LoRA scaling of {where}, {s0.formula()}, {what}: peft's merge "
                  "multiplies every delta B @ A by it in float32, so the merged weights would be "
                  "inf or NaN. Restore r and lora_alpha (and rank_pattern/alpha_pattern) from "
                  "the training run", path=acfg,
                  evidence={"scaling": repr(s0.scaling), "r": _num(s0.r),
                            "lora_alpha": _num(s0.alpha), "use_rslora": s0.rslora,
                            "modules": [s.module for s in bad_scale[:_SHOW]],
                            "count": len(bad_scale)})
    if not ctx.read_values:
        if bad_scale:
            return
        raise Skip("--fast: tensor values are not read")
    files = [wf for wf in (ctx.adapter, ctx.non_lora, ctx.projector) if wf is not None]
    if not files:
        if bad_scale:
            return
        raise Skip("no readable adapter, non_lora_trainables.bin or projector file")
    for wf in files:
        stats = ctx.all_stats(wf)
        bad = [(n, s.nonfinite, s.numel) for n, s in stats.items()
               if s.nonfinite and wf.tensors[n].dtype in FLOAT_DTYPES]
        if not bad:
            continue
        name, count, numel = bad[0]
        yield Hit(f"{wf.path}: {len(bad)} tensor(s) hold NaN or Inf, e.g. '{name}' "
                  f"({count:,} of {numel:,} values); the merged weights would be NaN/Inf. Use "
                  "an earlier checkpoint whose weights are finite", path=wf.path,
                  evidence={"tensors": {n: c for n, c, _ in bad[:_SHOW]}, "count": len(bad)})


# --- LD206 ---------------------------------------------------------------------------------

# adapter_config.json field -> why the merge cannot reproduce a non-default value exactly.
_UNSUPPORTED: dict[str, str] = {
    "layer_replication": "the adapter indexes a replicated layer stack that the base does not "
                         "have; peft's merge_and_unload refuses it",
    "target_parameters": "LoRA on nn.Parameters (MoE experts) rather than modules",
    "trainable_token_indices": "trainable token rows (trainable_tokens_delta) replace embedding "
                               "rows instead of adding a low-rank delta",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A; its delta is not B @ A",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens and "
                               "cannot be merged into the weights",
    "arrow_config": "Arrow routes among several adapters per token",
    "use_bdlora": "block-diagonal lora_A/lora_B",
    "monteclora_config": "MonteCLoRA samples the adapter variationally",
    "kasa_config": "KaSA truncates the base weight's singular values and adds a diagonal",
    "enable_lora": "peft 0.2's MergedLinear puts LoRA on chosen slices of a fused layer",
}


@check("LD206", "unsupported-adapter-variant", Severity.error, families=BOTH)
def unsupported_adapter_variant(ctx: Context) -> Iterable[Hit]:
    """The adapter is not a plain LoRA that can be merged into this base exactly.

    ## What it does
    Flags `peft_type` other than `LORA` (AdaLoRA, LoHa, IA3, ...), PiSSA/OLoRA/CorDA/LoftQ/
    LoRA-GA initialisation (`init_lora_weights`), `layer_replication`, `target_parameters`,
    `trainable_token_indices`, QA-LoRA, aLoRA, Arrow, BD-LoRA, MonteCLoRA, KaSA, peft 0.2's
    `enable_lora`, and set fields no peft release knows: everything a `W + scale * B @ A` merge
    (with rslora, DoRA, LoRA biases, embeddings and `modules_to_save`) cannot reproduce.

    ## Why is this bad?
    PiSSA-style initialisations subtract the principal components from the base weights at
    init: the saved adapter only fits that residual base, and merged onto the original base
    counts them twice (peft converts such adapters only when saved with
    `path_initial_model_for_weight_conversion`, which writes `init_lora_weights: true` and
    doubles `r`). `layer_replication` makes peft refuse the merge; the other variants compute
    something a weight merge does not.

    ## Example
    `"init_lora_weights": "pissa_niter_4"` saved without conversion.

    ## Fix
    None automatic: for PiSSA/OLoRA/CorDA, convert the adapter with peft
    (`save_pretrained(..., path_initial_model_for_weight_conversion=...)`) from the training
    environment; otherwise merge with the training framework's own tool.
    """
    raw = ctx.adapter_config_raw
    if raw is None:
        raise Skip("no readable adapter_config.json")
    path = ctx.file("adapter_config.json")
    ptype = raw.get("peft_type")
    if ptype is not None and str(ptype).upper() != "LORA":
        yield Hit(f"{path}: peft_type is {_json(ptype)}, not LORA; its weights are not a "
                  "`W + scale * B @ A` LoRA and neither LLaVA's LoRA path nor `llava-doctor "
                  "merge` reproduces it. Merge it with peft in the training environment",
                  path=path, evidence={"peft_type": ptype})
        return
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(peft_versions.BASE_MUTATING_INITS):
        yield Hit(f"{path}: init_lora_weights is {_json(init)}, which changes the base weights at "
                  "initialisation; this adapter only fits that modified base, and merged onto the "
                  f"original base it is wrong{_converted_note(ctx, raw)}. Convert it with peft "
                  "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) to a "
                  "plain LoRA of rank 2r", path=path, evidence={"init_lora_weights": init})
    for key, why in _UNSUPPORTED.items():
        value = raw.get(key)
        if value in (None, False, [], {}, ""):
            continue
        yield Hit(f"{path}: {key} is {_json(value)}: {why}. A weight merge cannot reproduce it; "
                  "use the training framework's own merge", path=path,
                  evidence={"field": key, "value": value})
    # A set key no peft release in our table knows: what it does to the maths is unknown, so
    # neither this check nor the merge can vouch for an exact result.
    for key, value in raw.items():
        if key in peft_versions.FIELDS or value in (None, False, [], {}, "", 0):
            continue
        yield Hit(f"{path}: {key} is {_json(value)}, a field no peft release up to "
                  f"{peft_versions.LATEST_KNOWN} has; whether it changes the maths cannot be told, "
                  "so the merge cannot promise an exact result. Check where the key comes from "
                  "(a newer peft or a fork) and merge with that library", path=path,
                  evidence={"field": key, "value": value, "unrecognised": True})


def _converted_note(ctx: Context, raw: dict[str, Any]) -> str:
    """A converted save has rank 2r tensors; if the tensors say so but the config does not,
    the config was left stale after conversion."""
    ad = ctx.adapter
    r = raw.get("r")
    if ad is None or not isinstance(r, int):
        return ""
    ranks = {ad.tensors[m.A].shape[0] for m in parse_adapter_keys(ad.tensors).modules.values()
             if m.A and len(ad.tensors[m.A].shape) == 2}
    if ranks == {2 * r}:
        return (f" (its tensors have rank {2 * r} = 2r, as a converted save has: if it was "
                "converted, set init_lora_weights to true, r to "
                f"{2 * r} and lora_alpha to twice its value (sqrt(2) times with rslora))")
    return ""


# --- LD207 ---------------------------------------------------------------------------------

@check("LD207", "adapter-keys-unmatched", Severity.error, families=BOTH)
def adapter_keys_unmatched(ctx: Context) -> Iterable[Hit]:
    """Adapter keys that reach no LoRA layer when peft loads them onto this base.

    ## What it does
    Maps every key of the adapter file to the module it adapts (peft strips
    `base_model.model.`), then checks the module exists in the base (or, without a base, in the
    Llama layout `config.json` describes, plus the projector LLaVA builds) and that
    `target_modules` selects it, so that peft creates the layer the key loads into. Keys in the
    vision tower, resampler or projector are LD209's.

    ## Why is this bad?
    peft loads adapters with `strict=False`: unexpected keys are dropped without a word (a
    "missing adapter keys" warning exists only since peft 0.14, and only for the opposite
    case), so the merge silently leaves those weights unchanged. Typical: an adapter trained on
    llava-hf (`base_model.model.language_model.model.layers...`) merged onto an original-LLaVA
    base, keys saved with the adapter name (`lora_A.default.weight`), or a layer index beyond
    the base's depth.

    ## Example
    `base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight` with
    `liuhaotian/llava-v1.5-7b` as the base.

    ## Fix
    None automatic. When only the prefix differs, the message names the rewrite that would make
    every key match; otherwise use the base the adapter was trained on.
    """
    ad = ctx.adapter
    if ad is None:
        raise Skip("no readable adapter file")
    mods = require_module_set(ctx)
    cfg = ctx.adapter_config
    ev = pattern_eval(ctx)
    _skip_if_blocked(ev, TARGETING_FIELDS)
    prepared_cfg = prepared(cfg) if cfg is not None else None
    parsed = parse_adapter_keys(ad.tensors)
    missing: list[str] = []       # module absent from the base
    untargeted: list[str] = []    # module present, but target_modules does not select it
    odd: list[str] = list(parsed.unprefixed)  # keys peft's loader cannot place at all
    for mod in parsed.modules.values():
        if mods.multimodal_elsewhere and _part(mod.name) is not None:
            continue
        odd.extend(mod.other)
        info = mods.modules.get(mod.name)
        lora_keys = [k for k in (mod.A, mod.B, mod.lora_bias, mod.magnitude, mod.embedding_A,
                                 mod.embedding_B) if k]
        if info is None:
            missing.extend(k for k in mod.keys() if k not in mod.other)
            continue
        if lora_keys and cfg is not None and cfg.target_modules is not None:
            try:
                targeted = config_matches(prepared_cfg, mod.name, mods.linear,
                                          matcher=ev or direct)
            except re.error:
                targeted = True  # an invalid regex is LD202's finding
            if not targeted or info.kind == "norm":
                untargeted.extend(lora_keys)
    if not (missing or untargeted or odd):
        return
    remap = _prefix_remap([_module_of(k) for k in missing], mods)
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) name modules {mods.describe} does not have, e.g. "
                     f"'{missing[0]}'")
    if untargeted:
        parts.append(f"{len(untargeted)} key(s) belong to modules target_modules does not select "
                     f"(so peft creates no LoRA layer for them), e.g. '{untargeted[0]}'")
    if odd:
        parts.append(f"{len(odd)} key(s) are not in peft's saved format (no `base_model.model.` "
                     f"prefix, or the adapter name left in), e.g. '{odd[0]}'")
    hint = ""
    if remap is not None:
        old, new = remap
        hint = (f" Only the prefix differs: the adapter was saved for another model layout "
                f"(llava-hf?); rewriting '{PEFT_PREFIX}{old}' to '{PEFT_PREFIX}{new}' in every key "
                "makes them all match.")
    total = len(missing) + len(untargeted) + len(odd)
    yield Hit(f"{ad.path}: {total} of {len(ad.tensors)} adapter keys reach no LoRA layer: "
              f"{'; '.join(parts)}. peft drops them silently, so the merge leaves those weights "
              f"unchanged.{hint} Use the base the adapter was trained on", path=ad.path,
              evidence={"missing_module": missing[:_SHOW], "not_targeted": untargeted[:_SHOW],
                        "unloadable": odd[:_SHOW], "count": total,
                        "modules_source": mods.source,
                        "prefix_remap": list(remap) if remap else None})


def _module_of(key: str) -> str:
    mods = parse_adapter_keys([key]).modules
    return next(iter(mods)) if mods else key


def _prefix_remap(modules: list[str], mods: ModuleSet) -> tuple[str, str] | None:
    """A single prefix rewrite (llava-hf language model -> original LLaVA's `model.`) under
    which every module exists (`hf_layout.to_original_llava`)."""
    if not modules:
        return None
    for layout in (hf_layout.Layout.canonical, hf_layout.Layout.runtime_4):
        mapped = [hf_layout.to_original_llava(m, layout) for m in modules]
        if all(n is not None and n in mods.modules for n in mapped):
            hits = {hf_layout.split(m, layout) for m in modules}
            parts = {h[0] for h in hits if h is not None}
            if len(parts) != 1:
                continue
            part = parts.pop()
            return (hf_layout.TABLE[layout][part] + ".",
                    hf_layout.ORIGINAL_LLAVA[part] + ".")
    return None


# --- LD208 ---------------------------------------------------------------------------------

@check("LD208", "quantized-training-config",
       by_consumer(llava=ERR, llava_doctor=INFO, peft=INFO), fix=FixSafety.safe)
def quantized_training_config(ctx: Context) -> Iterable[Hit]:
    """The LoRA dir's `config.json` carries QLoRA's `quantization_config`.

    ## What it does
    Looks for `quantization_config` (or `load_in_4bit`/`load_in_8bit: true`) in the LoRA dir's
    `config.json`, which LLaVA's `train.py --bits 4/8` saves there.

    ## Why is this bad?
    LLaVA's builder passes this config to `from_pretrained(model_base, config=...)`, so the
    fp16 base is quantized while merging: on CPU the merge fails with `RuntimeError:
    "addmm_impl_cpu_" not implemented for 'Half'`, elsewhere the merged weights are the lossy
    4-bit round trip, and the projector load fails with `size mismatch ... torch.Size([2097152,
    1])`. An error for LLaVA's merge; info for `llava-doctor merge` (it drops the field and
    merges in the dtype asked for) and for peft (it never reads this `config.json`).

    ## Example
    Output of the legacy `scripts/finetune_qlora.sh`.

    ## Fix
    Safe: `llava-doctor fix` removes `quantization_config` from the LoRA dir's `config.json`
    (the merge then loads the fp16 base as it should).
    """
    cfg = ctx.config
    if cfg is None:
        raise Skip("no readable config.json in the LoRA dir")
    raw = cfg.raw()
    keys = [k for k in ("quantization_config",) if raw.get(k)]
    keys += [k for k in ("load_in_4bit", "load_in_8bit") if raw.get(k) is True]
    if not keys:
        return
    path = ctx.file("config.json")
    q = raw.get("quantization_config") or {}
    bits = "4-bit" if (q.get("load_in_4bit") or raw.get("load_in_4bit")) else (
        "8-bit" if (q.get("load_in_8bit") or raw.get("load_in_8bit")) else "quantized")
    yield Hit(f"{path} has {', '.join(keys)} (a QLoRA run): LLaVA's merge passes this config to "
              f"from_pretrained and loads the base {bits}, so the merge fails on CPU "
              "(`\"addmm_impl_cpu_\" not implemented for 'Half'`) or writes lossy weights. "
              "`llava-doctor fix` removes it (safe)", path=path,
              evidence={"keys": keys, "quant_method": q.get("quant_method") if q else None})


# --- LD209 ---------------------------------------------------------------------------------

@check("LD209", "adapter-on-multimodal", Severity.info)
def adapter_on_multimodal(ctx: Context) -> Iterable[Hit]:
    """The adapter has LoRA weights inside the vision tower, resampler or projector.

    ## What it does
    Counts adapter keys whose module lies in `vision_tower`/`vision_model`, `vision_resampler`
    or `mm_projector`/`multi_modal_projector`, and says what each merge does with them.

    ## Why is this bad?
    `find_all_linear_names` returns bare suffixes (`q_proj`...), which peft also matches inside
    a CLIP tower that was built before `get_peft_model`. What LLaVA's merge does depends on
    `unfreeze_mm_vision_tower` in the LoRA dir's `config.json`: when true (v1.6 configs), the
    builder loads the tower while building the model, so peft finds the modules, merges the
    deltas, and the merged checkpoint holds the merged tower (info); when false or absent it
    delay-loads the tower, so peft finds no module for those keys and drops them, and the tower
    is reloaded unchanged from `mm_vision_tower` (warning: trained deltas are lost).
    `llava-doctor merge` merges them into the base's tower tensors when the base holds them
    (`model.vision_tower.*`, as LLaVA's own merged checkpoints do) and otherwise drops them and
    says so in its notes. Projector LoRA (pre-2023-10 LLaVA with a linear projector) is applied
    on top of the projector from `non_lora_trainables.bin`.

    ## Example
    A task LoRA whose adapter holds `...vision_tower.vision_tower.vision_model.encoder.layers.0.
    self_attn.q_proj.lora_A.weight`.

    ## Fix
    None. When the deltas are dropped and matter: merge onto a base that holds the tower, or
    set `unfreeze_mm_vision_tower` as in training; or retrain with the tower excluded
    (`exclude_modules`).
    """
    ad = ctx.adapter
    if ad is None:
        raise Skip("no readable adapter file")
    by_part: dict[str, list[str]] = {}
    for mod in parse_adapter_keys(ad.tensors).modules.values():
        part = _part(mod.name)
        if part is not None:
            by_part.setdefault(part, []).extend(mod.keys())
    mods = module_set(ctx)
    raw = ctx.config.raw() if ctx.config is not None else {}
    unfreeze = bool(raw.get("unfreeze_mm_vision_tower"))
    for part, keys in sorted(by_part.items()):
        severity: dict[Consumer, Severity] | None = None
        if part == "projector":
            exists = mods is not None and all(_module_of(k) in mods.modules for k in keys)
            what = ("peft applies them on top of the projector loaded from "
                    "non_lora_trainables.bin, and a merge must do the same"
                    if exists else "no projector module of that name exists at merge time, so "
                    "peft drops them")
            if not exists:
                severity = by_consumer(llava=WARN, llava_doctor=WARN, peft=WARN)
        elif part == "vision tower":
            in_base = mods is not None and mods.source == "base" and all(
                _module_of(k) in mods.modules for k in keys)
            ours = ("`llava-doctor merge` merges them into the base's tower tensors" if in_base
                    else "`llava-doctor merge` drops them and says so (the base holds no tower "
                         "weights to merge them into)")
            if unfreeze:
                what = ("config.json has unfreeze_mm_vision_tower: true, so LLaVA's builder "
                        "loads the tower while building the model, peft merges these deltas "
                        f"and the merged checkpoint holds the merged tower; {ours}")
            else:
                what = ("config.json has no unfreeze_mm_vision_tower: true, so LLaVA's builder "
                        "delay-loads the tower, peft finds no module for these keys and drops "
                        "them, and the merged model reloads the original tower from "
                        f"mm_vision_tower without them; {ours}")
            severity = by_consumer(llava=INFO if unfreeze else WARN,
                                   llava_doctor=INFO if in_base else WARN, peft=INFO)
        else:
            what = (f"LLaVA's builder delay-loads the {part}, so peft finds no module for them and "
                    f"drops them; the merged model reloads the original {part} from "
                    "mm_vision_tower, without these deltas")
        yield Hit(f"{ad.path}: {len(keys)} adapter key(s) adapt the {part}, e.g. '{keys[0]}': "
                  f"{what}", path=ad.path, severity=severity,
                  evidence={"part": part, "keys": keys[:_SHOW], "count": len(keys),
                            "unfreeze_mm_vision_tower": unfreeze})


__all__ = ["ModuleInfo", "ModuleSet", "module_set", "exact_plain_alpha", "rewritable_alpha",
           "lora_scaling"]
