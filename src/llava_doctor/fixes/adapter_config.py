"""LD201: make `adapter_config.json` loadable by an older peft without changing the maths."""

from __future__ import annotations

from typing import Any

from llava_doctor.artifacts import peft_versions
from llava_doctor.checks.adapter import exact_plain_alpha, rewritable_alpha
from llava_doctor.fixes.jsonedit import DELETE
from llava_doctor.fixes.registry import (
    CannotFix,
    NothingToDo,
    Outcome,
    PlanInput,
    Proposal,
    planner,
)
from llava_doctor.models import FixSafety

ADAPTER_CONFIG = "adapter_config.json"

def _json(v: Any) -> str:
    import json

    return json.dumps(v)


@planner("LD201")
def fix_adapter_config_version(pi: PlanInput) -> Outcome:
    """Drop the keys the target peft does not know when that is exact; rslora -> plain LoRA."""
    version = pi.ctx.options.peft_version
    if version is None:
        return CannotFix("no target peft version (pass --peft-version or install peft)")
    try:
        peft_versions.parse_version(version)
    except ValueError:
        return CannotFix(f"--peft-version '{version}' is not a version number")
    raw = pi.ws.json(ADAPTER_CONFIG)
    if raw is None:
        return CannotFix(f"{pi.ctx.path / ADAPTER_CONFIG} is missing or unreadable")
    groups = peft_versions.classify_unknown_fields(raw, version)
    # A default, or a value without effect on what the adapter computes: dropping it is exact.
    drop = [*groups.defaults, *groups.neutral]
    maths, alien = list(groups.math), list(groups.unrecognised)
    if not (drop or maths or alien):
        return NothingToDo(f"peft {version} knows every key")
    if alien:
        return CannotFix(f"{', '.join(alien)} is unknown to every peft release up to "
                         f"{peft_versions.LATEST_KNOWN}: whether dropping it is exact cannot be "
                         "told; upgrade peft or find where the key comes from")
    since = {k: peft_versions.first_version_of(k) for k in drop + maths}
    newest = max((s for s in since.values() if s), key=peft_versions.parse_version, default=None)
    upgrade = f"upgrade peft to >= {newest}" if newest else "upgrade peft"
    edits: dict[str, Any] = dict.fromkeys(drop, DELETE)
    listing = ", ".join(f"{k}={_json(raw[k])}" for k in drop)
    if not maths:
        return Proposal(
            title=f"remove {listing} from {ADAPTER_CONFIG}: peft {version} does not know them "
                  "and they hold defaults or values that do not change the maths",
            safety=FixSafety.safe, files=(ADAPTER_CONFIG,),
            edit=lambda w: w.edit_json(ADAPTER_CONFIG, edits))
    if set(maths) != {"use_rslora"}:
        return CannotFix(f"{', '.join(f'{k}={_json(raw[k])}' for k in maths)} change what the "
                         f"adapter computes and peft {version} cannot express them: {upgrade}")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if raw.get("rank_pattern"):
        return CannotFix("use_rslora with a rank_pattern: per-module ranks need per-module "
                         f"alphas that peft {version} cannot express; {upgrade}")
    pattern = raw.get("alpha_pattern") or {}
    if not rewritable_alpha(alpha, r) or not isinstance(pattern, dict) \
            or not all(rewritable_alpha(a, r) for a in pattern.values()):
        return CannotFix(f"use_rslora with r={_json(r)}, lora_alpha={_json(alpha)}: cannot "
                         f"compute the plain-LoRA alpha; {upgrade}")
    assert isinstance(r, int) and isinstance(alpha, (int, float))
    new_alpha = exact_plain_alpha(float(alpha), r)
    edits["use_rslora"] = DELETE
    edits["lora_alpha"] = new_alpha
    if pattern and "alpha_pattern" in peft_versions.fields_known_by(version):
        edits["alpha_pattern"] = {k: exact_plain_alpha(float(a), r) for k, a in pattern.items()}
    extra = f"; also removes {listing}" if listing else ""
    return Proposal(
        title=f"rewrite {ADAPTER_CONFIG} as plain LoRA for peft {version}: remove use_rslora "
              f"and set lora_alpha {alpha} -> {new_alpha!r}, so lora_alpha/r equals the rslora "
              f"scale alpha/sqrt(r) = {float(alpha) / r ** 0.5!r}{extra}",
        safety=FixSafety.unsafe, files=(ADAPTER_CONFIG,),
        unsafe_reason="the config no longer says what training used: loaded by a peft that knows "
                      "use_rslora, the rewritten file still computes the same scale, but anyone "
                      f"reading it sees plain LoRA with lora_alpha={new_alpha!r}",
        edit=lambda w: w.edit_json(ADAPTER_CONFIG, edits))
