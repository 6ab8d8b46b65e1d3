"""peft's rules for which modules get a LoRA, with which rank and scale, and what a key means.

Everything here reproduces peft's own code without importing it (peft is a test-only
reference), so that the checks and the streaming merge agree with `PeftModel.from_pretrained`
+ `merge_and_unload` on the same files:

- `target_matches` is `peft.tuners.tuners_utils.check_target_module_exists` (peft 0.21):
  a string `target_modules` is a `re.fullmatch` on the module name; a list matches the exact
  name or a `.name` suffix, and only then are `layers_to_transform`/`layers_pattern` applied;
  `exclude_modules` (str: fullmatch, list: exact or suffix) and `modules_to_save` win.
- `get_pattern_key`/`effective_r_alpha` are `peft.utils.other.get_pattern_key` and
  `LoraModel._create_and_replace`, with the older rules selectable by peft version
  (peers-merge-and-formats.md §1.1): v0.6-v0.13 search rank and alpha keys together with
  `.*\\.{key}$`; v0.14 searches them separately with the same regex; v0.15+ uses
  `(.*\\.)?({key})$`.
- `parse_adapter_keys` maps the keys of `adapter_model.*` to the base modules they change.

Module names are those of the wrapped model, i.e. without peft's `base_model.model.` prefix
(`model.layers.0.self_attn.q_proj`).

Every pattern that comes from the config goes through a ``matcher`` (`bounded_re.USES` has
the templates): `bounded_re.direct` evaluates in-process (trusted input), a
`bounded_re.Evaluation` answers from a table computed with a time bound, for artifacts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llava_doctor.artifacts.bounded_re import Matcher, direct
from llava_doctor.artifacts.peft_versions import parse_version

PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"

__all__ = [
    "PEFT_PREFIX", "ALL_LINEAR", "target_matches", "config_matches", "get_pattern_key",
    "effective_r_alpha", "lora_scaling", "module_scaling", "AdapterModule", "AdapterKeys",
    "parse_adapter_keys", "adapter_modules", "layer_index", "prepared",
]


# --- which modules get a LoRA -----------------------------------------------------------------

def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def layer_index(module_name: str, layers_pattern: str | Iterable[str] | None = None, *,
                matcher: Matcher = direct) -> int | None:
    """The decoder-layer index peft reads from a module name (first numbered segment)."""
    patterns = _as_list(layers_pattern)
    idx: str | None
    if not patterns:
        # peft: lazy `.*?` so the first index wins, not an expert index deeper down.
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        idx = m.group("idx") if m is not None else None
    else:
        idx = None
        for pattern in patterns:
            # The first pattern that matches decides, even when its idx group took no part
            # (a top-level `|` in the pattern): the matcher answers "" then.
            found = matcher("layer", pattern, module_name)
            if found is not None:
                idx = found or None
                break
    return int(idx) if idx is not None else None


def target_matches(target_modules: str | Collection[str] | None, module_name: str, *,
                   layers_to_transform: int | Collection[int] | None = None,
                   layers_pattern: str | Collection[str] | None = None,
                   exclude_modules: str | Collection[str] | None = None,
                   modules_to_save: Collection[str] | None = None,
                   linear_modules: Collection[str] | None = None,
                   matcher: Matcher = direct) -> bool:
    """Whether peft wraps ``module_name`` with a LoRA layer (`check_target_module_exists`).

    ``target_modules == "all-linear"`` is peft's shorthand, expanded at injection time to the
    linear layers except the output head: pass those names as ``linear_modules`` (without
    them the shorthand matches nothing, as a regex it would).
    """
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if matcher("fullmatch", exclude_modules, module_name) is not None:
                return False
        elif module_name in exclude_modules or _ends_with_one_of(module_name, exclude_modules):
            return False
    # peft never puts an adapter on a module it also saves whole (they would conflict).
    if modules_to_save and any(matcher("saved", m, module_name) is not None
                               for m in modules_to_save):
        return False
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return linear_modules is not None and module_name in linear_modules
        return matcher("fullmatch", target_modules, module_name) is not None
    if module_name in target_modules:
        # An exact name is taken as is: peft applies no layer filter on this path.
        return True
    found = _ends_with_one_of(module_name, target_modules)
    using_layers = layers_to_transform is not None and (
        len(layers_to_transform) != 0 if isinstance(layers_to_transform, Collection) else True)
    if found and using_layers:
        idx = layer_index(module_name, layers_pattern or None, matcher=matcher)
        if idx is None:
            return False
        if isinstance(layers_to_transform, int):
            return idx == layers_to_transform
        return idx in layers_to_transform  # type: ignore[operator]
    return found


def _ends_with_one_of(module_name: str, keys: Collection[str]) -> bool:
    """peft's ``any(module_name.endswith(f".{k}") for k in keys)``; for a set, by looking each
    dotted suffix of the name up (its length, not the set's, bounds the work)."""
    if isinstance(keys, (set, frozenset)):
        parts = module_name.split(".")
        return any(".".join(parts[i:]) in keys for i in range(1, len(parts)))
    return any(module_name.endswith(f".{k}") for k in keys)


def prepared(adapter_config: Any) -> dict[str, Any]:
    """The targeting fields of a config, lists made frozensets: `config_matches` gives the same
    answers, in time bounded by the module name rather than by a list of a million entries."""
    out = {k: _field(adapter_config, k) for k in ("target_modules", "layers_to_transform",
                                                  "layers_pattern", "exclude_modules",
                                                  "modules_to_save")}
    for k in ("target_modules", "exclude_modules", "layers_to_transform"):
        if isinstance(out[k], list):
            try:
                out[k] = frozenset(out[k])
            except TypeError:  # unhashable entries: keep peft's list scan
                pass
    return out


def _field(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    return default if value is None and default is not None else value


def config_matches(adapter_config: Any, module_name: str,
                   linear_modules: Collection[str] | None = None, *,
                   matcher: Matcher = direct) -> bool:
    """`target_matches` with every targeting field read from an adapter config (model or dict)."""
    return target_matches(
        _field(adapter_config, "target_modules"), module_name,
        layers_to_transform=_field(adapter_config, "layers_to_transform"),
        layers_pattern=_field(adapter_config, "layers_pattern"),
        exclude_modules=_field(adapter_config, "exclude_modules"),
        modules_to_save=_field(adapter_config, "modules_to_save"),
        linear_modules=linear_modules, matcher=matcher)


# --- rank, alpha, scaling --------------------------------------------------------------------

def _version(peft_version: str | None) -> tuple[int, int, int] | None:
    return parse_version(peft_version) if peft_version else None


def get_pattern_key(pattern_keys: Iterable[str], module_key: str,
                    peft_version: str | None = None, *, matcher: Matcher = direct) -> str:
    """The first pattern key that selects ``module_key``, else ``module_key`` itself.

    peft >= 0.15 (and ``peft_version=None``): ``re.match(rf"(.*\\.)?({k})$", module_key)``;
    peft 0.6-0.14: ``re.match(rf".*\\.{k}$", module_key)`` (no `^` anchoring, no bare names).
    """
    v = _version(peft_version)
    use = "key_old" if v is not None and v < (0, 15, 0) else "key_new"
    for key in pattern_keys:
        if matcher(use, key, module_key) is not None:
            return key
    return module_key


def effective_r_alpha(adapter_config: Any, module_key: str,
                      peft_version: str | None = None, *,
                      matcher: Matcher = direct) -> tuple[int, float]:
    """``(r, lora_alpha)`` that peft ``peft_version`` gives ``module_key`` (None: newest rules).

    peft < 0.6 knows no patterns; 0.6-0.13 look the first key matching among rank keys then
    alpha keys up in BOTH dicts (so a more specific alpha key after a rank key is missed);
    0.14+ look each dict up on its own.
    """
    r = _field(adapter_config, "r", 8)
    alpha = _field(adapter_config, "lora_alpha", 8)
    rank_pattern = _field(adapter_config, "rank_pattern") or {}
    alpha_pattern = _field(adapter_config, "alpha_pattern") or {}
    v = _version(peft_version)
    if v is not None and v < (0, 6, 0):
        return r, alpha
    if v is not None and v < (0, 14, 0):
        key = get_pattern_key([*rank_pattern, *alpha_pattern], module_key, peft_version,
                              matcher=matcher)
        return rank_pattern.get(key, r), alpha_pattern.get(key, alpha)
    r_key = get_pattern_key(rank_pattern, module_key, peft_version, matcher=matcher)
    a_key = get_pattern_key(alpha_pattern, module_key, peft_version, matcher=matcher)
    return rank_pattern.get(r_key, r), alpha_pattern.get(a_key, alpha)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's ``scaling``: ``alpha / sqrt(r)`` with rslora, else ``alpha / r``."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def module_scaling(adapter_config: Any, module_key: str, peft_version: str | None = None, *,
                   matcher: Matcher = direct) -> float:
    """The scaling peft applies to ``module_key``'s delta (patterns and rslora included)."""
    r, alpha = effective_r_alpha(adapter_config, module_key, peft_version, matcher=matcher)
    rslora = bool(_field(adapter_config, "use_rslora", False))
    v = _version(peft_version)
    if v is not None and v < (0, 8, 0):
        rslora = False  # peft < 0.8 has no rslora: the flag is ignored or refused
    return lora_scaling(r, alpha, rslora)


# --- what the keys of adapter_model.* mean ----------------------------------------------------

@dataclass
class AdapterModule:
    """The tensors an adapter file holds for one base module (values are file keys).

    ``lora_bias`` is `lora_B.bias` (peft >= 0.14 `lora_bias=True`); ``weight``/``bias`` are full
    tensors that replace the base module's (``modules_to_save``, `bias="all"|"lora_only"`,
    resized embeddings saved by `save_embedding_layers`). ``other`` holds keys under this module
    that peft's loader would not put anywhere (e.g. `lora_A.default.weight` with the adapter
    name still in it, AdaLoRA's `lora_E`).
    """

    name: str
    A: str | None = None
    B: str | None = None
    lora_bias: str | None = None
    magnitude: str | None = None
    embedding_A: str | None = None
    embedding_B: str | None = None
    weight: str | None = None
    bias: str | None = None
    other: list[str] = field(default_factory=list)

    @property
    def is_lora(self) -> bool:
        return self.A is not None or self.B is not None

    @property
    def is_embedding_lora(self) -> bool:
        return self.embedding_A is not None or self.embedding_B is not None

    @property
    def is_full(self) -> bool:
        return self.weight is not None or self.bias is not None

    def keys(self) -> list[str]:
        """Every file key belonging to this module."""
        own = [self.A, self.B, self.lora_bias, self.magnitude, self.embedding_A,
               self.embedding_B, self.weight, self.bias]
        return [k for k in own if k is not None] + list(self.other)


@dataclass
class AdapterKeys:
    """An adapter file's keys, by module; ``unprefixed`` lack peft's `base_model.model.`."""

    modules: dict[str, AdapterModule]
    unprefixed: list[str]


# Suffix after the module name -> AdapterModule attribute.
_ROLES: dict[str, str] = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "lora_bias",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
    "lora_embedding_A": "embedding_A",
    "lora_embedding_B": "embedding_B",
    # save_embedding_layers on a targeted embedding: the (possibly resized) base weight itself.
    "base_layer.weight": "weight",
    "base_layer.bias": "bias",
}
# A peft tensor segment: `lora_X` or a peft wrapper's internals; the module name ends before it.
_PEFT_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save|original_module|base_layer|"
                           r"token_adapter|trainable_tokens_[a-z_]+)(\.|$)")


def parse_adapter_keys(tensor_names: Iterable[str]) -> AdapterKeys:
    """Group adapter file keys by the base module they change (peft's save format)."""
    modules: dict[str, AdapterModule] = {}
    unprefixed: list[str] = []
    for key in tensor_names:
        if not key.startswith(PEFT_PREFIX):
            unprefixed.append(key)
            continue
        rest = key[len(PEFT_PREFIX):]
        m = _PEFT_SEGMENT.search(rest)
        if m is not None:
            module, suffix = rest[:m.start()], rest[m.start() + 1:]
            role = _ROLES.get(suffix)
        else:
            module, _, suffix = rest.rpartition(".")
            role = {"weight": "weight", "bias": "bias"}.get(suffix)
        if not module:
            unprefixed.append(key)
            continue
        entry = modules.setdefault(module, AdapterModule(module))
        if role is None or getattr(entry, role) is not None:
            entry.other.append(key)
        else:
            setattr(entry, role, key)
    return AdapterKeys(modules=modules, unprefixed=unprefixed)


def adapter_modules(tensor_names: Iterable[str]) -> dict[str, AdapterModule]:
    """Base module name -> the adapter tensors for it (keys without the peft prefix are left out;
    see `parse_adapter_keys`)."""
    return parse_adapter_keys(tensor_names).modules
