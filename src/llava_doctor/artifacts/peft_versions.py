"""The history of PEFT's ``LoraConfig`` fields, as data.

Which keys an ``adapter_config.json`` can contain depends on the PEFT version that wrote it, and
PEFT versions before 0.14 refuse (0.6-0.13) or silently ignore (<= 0.5) keys they do not know
(failure mode F21). This module records, for every field ``LoraConfig``/``PeftConfig`` ever had:
the first version that knows it, the version that removed it (if any), its default, and whether a
non-default value changes the maths of the adapter, so that dropping the key is unsafe.

Sources: the LoraConfig/PeftConfig dataclasses at peft tags v0.2.0 ... v0.20.0 (table in
peers-merge-and-formats.md §1.3) and the installed peft 0.21.2 (``kasa_config`` is new in 0.21).
Defaults are JSON values, i.e. what ``LoraConfig.to_dict()`` serialises.

Versions are compared numerically by :func:`parse_version`; no ``packaging`` dependency.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FieldInfo",
    "FIELDS",
    "LATEST_KNOWN",
    "MATH_FIELDS",
    "TARGETING_FIELDS",
    "BASE_MUTATING_INITS",
    "parse_version",
    "fields_known_by",
    "first_version_of",
    "default_of",
    "adapter_config_fields",
    "changes_math",
    "non_default_math_fields",
]

_VERSION_RE = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(version: str) -> tuple[int, int, int]:
    """``"0.10.0"`` -> ``(0, 10, 0)``; suffixes (``.dev0``, ``rc1``, ``+local``, ``@sha``) ignored.

    Raises ``ValueError`` for a string that does not start with a number.
    """
    m = _VERSION_RE.match(version)
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))


@dataclass(frozen=True)
class FieldInfo:
    """One ``adapter_config.json`` key of a LoRA adapter.

    ``default`` is the value in the newest version; ``old_defaults`` lists earlier defaults as
    ``(until_version, value)`` pairs, oldest first: ``value`` was the default for versions below
    ``until_version``. ``persisted`` is False for fields ``to_dict()`` pops (never written).
    ``math`` is True when a non-default value changes what the adapter computes (dropping the key
    on load gives a different model); ``targeting`` when it only changes which modules get one.
    """

    name: str
    since: str
    default: Any
    removed_in: str | None = None
    old_defaults: tuple[tuple[str, Any], ...] = ()
    persisted: bool = True
    math: bool = False
    targeting: bool = False
    note: str = ""

    def known_by(self, version: str) -> bool:
        """Whether peft ``version`` has this field."""
        v = parse_version(version)
        if v < parse_version(self.since):
            return False
        return self.removed_in is None or v < parse_version(self.removed_in)

    def default_at(self, version: str) -> Any:
        """The default in peft ``version`` (a fresh copy)."""
        v = parse_version(version)
        for until, value in self.old_defaults:
            if v < parse_version(until):
                return copy.deepcopy(value)
        return copy.deepcopy(self.default)


_F = FieldInfo
FIELDS: dict[str, FieldInfo] = {
    f.name: f
    for f in (
        # --- v0.2: PeftConfig + the first LoraConfig ---------------------------------------
        _F("peft_type", "0.2.0", "LORA"),
        _F("task_type", "0.2.0", None),
        _F("inference_mode", "0.2.0", False, note="save_pretrained writes true"),
        _F("base_model_name_or_path", "0.2.0", None),
        _F("r", "0.2.0", 8, note="per-module rank is recoverable from lora_A.shape[0]"),
        _F("target_modules", "0.2.0", None, targeting=True),
        # peft 0.2-0.3 declared lora_alpha/lora_dropout with default None; 0.4 has 8 / 0.0.
        _F("lora_alpha", "0.2.0", 8, old_defaults=(("0.4.0", None),)),
        _F("lora_dropout", "0.2.0", 0.0, old_defaults=(("0.4.0", None),)),
        _F("merge_weights", "0.2.0", False, removed_in="0.3.0"),
        _F(
            "enable_lora",
            "0.2.0",
            None,
            removed_in="0.3.0",
            math=True,
            note="MergedLinear: which of the fused q/k/v slices carry LoRA",
        ),
        _F("fan_in_fan_out", "0.2.0", False, math=True, note="delta is transposed"),
        _F(
            "bias",
            "0.2.0",
            "none",
            math=True,
            note="'all'/'lora_only' saves bias tensors that replace the base biases",
        ),
        _F(
            "modules_to_save",
            "0.2.0",
            None,
            math=True,
            note="saved full tensors replace the base tensors at merge",
        ),
        # --- later additions ---------------------------------------------------------------
        _F(
            "init_lora_weights",
            "0.3.0",
            True,
            math=True,
            note="string values pissa*/olora/corda/loftq/lora_ga mutate the base weights at init",
        ),
        _F("layers_to_transform", "0.4.0", None, targeting=True),
        _F("layers_pattern", "0.4.0", None, targeting=True),
        _F("revision", "0.5.0", None),
        _F("auto_mapping", "0.5.0", None),
        _F("rank_pattern", "0.6.0", {}, math=True),
        _F(
            "alpha_pattern",
            "0.6.0",
            {},
            math=True,
            note="per-module alpha is not recoverable from the tensors",
        ),
        _F("loftq_config", "0.7.0", {}, note="only used with init_lora_weights='loftq'"),
        _F("megatron_config", "0.7.0", None, note="only for Megatron parallel linear layers"),
        _F("megatron_core", "0.7.0", "megatron.core"),
        _F(
            "use_rslora", "0.8.0", False, math=True, note="scaling alpha/sqrt(r) instead of alpha/r"
        ),
        _F(
            "use_dora", "0.9.0", False, math=True, note="lora_magnitude_vector rescales merged rows"
        ),
        _F(
            "layer_replication",
            "0.10.0",
            None,
            math=True,
            note="adapter layers index a replicated stack; merge_and_unload refuses it",
        ),
        _F(
            "runtime_config",
            "0.12.0",
            {"ephemeral_gpu_offload": False},
            persisted=False,
            note="popped by to_dict, never saved",
        ),
        _F("eva_config", "0.14.0", None, note="initialisation only; base untouched"),
        _F("exclude_modules", "0.14.0", None, targeting=True),
        _F(
            "lora_bias",
            "0.14.0",
            False,
            math=True,
            note="lora_B.bias * scaling is added to the base bias",
        ),
        _F("corda_config", "0.15.0", None, note="only used with init_lora_weights='corda'"),
        _F(
            "trainable_token_indices",
            "0.15.0",
            None,
            math=True,
            note="trainable_tokens_delta rows replace embedding rows",
        ),
        _F(
            "use_qalora", "0.16.0", False, math=True, note="input is pooled in groups before lora_A"
        ),
        _F("qalora_group_size", "0.16.0", 16, math=True, note="only matters with use_qalora"),
        _F(
            "target_parameters",
            "0.17.0",
            None,
            math=True,
            note="LoRA on nn.Parameters (MoE experts), not modules",
        ),
        _F(
            "alora_invocation_tokens",
            "0.18.0",
            None,
            math=True,
            note="activated LoRA applies only after the invocation tokens; cannot be merged",
        ),
        _F("arrow_config", "0.18.0", None, math=True, note="routes among several adapters"),
        _F(
            "ensure_weight_tying",
            "0.18.0",
            False,
            note="ties adapters of tied embeddings; no effect on untied Llama",
        ),
        _F("peft_version", "0.18.0", None, note="the writer's peft version string"),
        _F("lora_ga_config", "0.19.0", None, note="only used with init_lora_weights='lora_ga'"),
        _F("use_bdlora", "0.19.0", None, math=True, note="block-diagonal lora_A/lora_B"),
        _F(
            "monteclora_config",
            "0.20.0",
            None,
            math=True,
            note="variational sampling on the adapters",
        ),
        _F("velora_config", "0.20.0", None, note="changes the backward pass only"),
        _F(
            "kasa_config",
            "0.21.0",
            None,
            math=True,
            note="truncates the base weight's smallest singular components and adds a diagonal",
        ),
    )
}

#: The newest peft version whose fields this table describes.
LATEST_KNOWN = "0.21.2"

#: Fields whose non-default value changes what the adapter computes.
MATH_FIELDS: frozenset[str] = frozenset(n for n, f in FIELDS.items() if f.math)
#: Fields that only choose which modules carry an adapter.
TARGETING_FIELDS: frozenset[str] = frozenset(n for n, f in FIELDS.items() if f.targeting)
#: ``init_lora_weights`` values (or prefixes) after which the adapter only fits a mutated base.
BASE_MUTATING_INITS: tuple[str, ...] = ("pissa", "olora", "corda", "loftq", "lora_ga")


def fields_known_by(version: str) -> frozenset[str]:
    """Names of the persisted ``adapter_config.json`` keys that peft ``version`` knows."""
    return frozenset(n for n, f in FIELDS.items() if f.persisted and f.known_by(version))


def first_version_of(field: str) -> str | None:
    """First peft version that knows ``field``; None for a key no peft version ever had."""
    info = FIELDS.get(field)
    return info.since if info is not None else None


def default_of(field: str, version: str | None = None) -> Any:
    """Default JSON value of ``field`` (in ``version``, else in the newest version).

    Raises ``KeyError`` for an unknown field.
    """
    info = FIELDS[field]
    return info.default_at(version) if version is not None else copy.deepcopy(info.default)


def adapter_config_fields(version: str) -> dict[str, Any]:
    """The full ``adapter_config.json`` dict peft ``version`` writes for a default ``LoraConfig``.

    As ``save_pretrained`` writes it: ``inference_mode`` is true and, from 0.18 on, ``peft_version``
    is ``version``. ``base_model_name_or_path``/``task_type``/``target_modules`` are left at their
    defaults (None); callers fill them in. Keys are sorted like peft's
    ``json.dumps(sort_keys=True)``.
    """
    out: dict[str, Any] = {}
    for name in sorted(fields_known_by(version)):
        out[name] = default_of(name, version)
    out["inference_mode"] = True
    if "peft_version" in out:
        out["peft_version"] = version
    return out


def changes_math(field: str, value: Any) -> bool:
    """True if ``field`` set to ``value`` makes the adapter compute something else than default."""
    info = FIELDS.get(field)
    if info is None or not info.math:
        return False
    if field == "init_lora_weights":
        return isinstance(value, str) and value.lower().startswith(BASE_MUTATING_INITS)
    if field == "bias":
        return value not in (None, "none")
    if field == "qalora_group_size":
        return False  # only meaningful together with use_qalora, which is checked on its own
    default = info.default
    if value in (None, {}, [], False) and default in (None, {}, [], False):
        return False
    return value != default


def non_default_math_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The entries of an adapter config dict that change the maths (see :func:`changes_math`)."""
    return {k: v for k, v in config.items() if changes_math(k, v)}


@dataclass(frozen=True)
class UnknownFields:
    """The keys of an adapter_config.json that a target peft does not know, by consequence."""

    defaults: tuple[str, ...]      # hold their default: dropping them is exact
    neutral: tuple[str, ...]       # non-default, but without effect on what the adapter computes
    math: tuple[str, ...]          # change the maths: dropping them changes the merged weights
    unrecognised: tuple[str, ...]  # unknown to every release up to LATEST_KNOWN

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.defaults, *self.neutral, *self.math, *self.unrecognised)


def is_default_value(value: Any, default: Any) -> bool:
    """A value equal to the default, counting null/{}/[]/false/"none" as one 'empty'."""
    empty: tuple[Any, ...] = (None, {}, [], False, "none")
    return value == default or (value in empty and default in empty)


def classify_unknown_fields(config: dict[str, Any], version: str) -> UnknownFields:
    """Sort the keys of `config` that peft `version` does not know (LD201 and its fix)."""
    known = fields_known_by(version)
    beyond_table = parse_version(version) > parse_version(LATEST_KNOWN)
    groups: dict[str, list[str]] = {"defaults": [], "neutral": [], "math": [], "unrecognised": []}
    for key, value in config.items():
        if key in known:
            continue
        info = FIELDS.get(key)
        if info is None:
            # The table ends at LATEST_KNOWN: a newer target may know the key; do not guess.
            if not beyond_table:
                groups["unrecognised"].append(key)
            continue
        if not info.persisted:
            continue
        if changes_math(key, value):
            groups["math"].append(key)
        elif is_default_value(value, info.default):
            groups["defaults"].append(key)
        else:
            groups["neutral"].append(key)
    return UnknownFields(**{k: tuple(v) for k, v in groups.items()})
