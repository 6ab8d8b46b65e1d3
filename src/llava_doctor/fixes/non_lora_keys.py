"""Fixes inside `non_lora_trainables.bin`: rename keys LLaVA drops (LD305), inject the stage-1
projector when none lands (LD302). Tensors are carried over bit for bit; the file is re-written
with `torch.save` of a plain `{str: Tensor}` dict.
"""

from __future__ import annotations

from llava_doctor.artifacts.discovery import NON_LORA
from llava_doctor.artifacts.llava import canonical_non_lora_key, expected_projector
from llava_doctor.fixes.derive import (
    DEFAULT_PROJECTOR_TYPE,
    PROJ,
    landed,
    landed_projector,
    plan_renames,
    projector_facts,
    projector_mismatch,
)
from llava_doctor.fixes.registry import (
    AlreadyDone,
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


def _keys(keys: list[str] | tuple[str, ...], n: int = 3) -> str:
    ks = sorted(keys)
    return ", ".join(f"'{k}'" for k in ks[:n]) + (f" and {len(ks) - n} more" if len(ks) > n
                                                  else "")


@planner("LD305", watches=(NON_LORA, CONFIG))
def fix_dropped_keys(pi: PlanInput) -> Outcome:
    """Rename every key to LLaVA's canonical `base_model.model.<parameter>` form."""
    ws = pi.ws
    names = ws.tensor_names(NON_LORA)
    if names is None:
        return NothingToDo(f"no readable {NON_LORA}")
    cfg = ws.json(CONFIG)
    r = plan_renames(names, cfg)
    if not r.dropped:
        if pi.findings and ws.is_pending(NON_LORA):
            return AlreadyDone(f"the planned {NON_LORA} has no key LLaVA drops")
        return NothingToDo("every key lands on a parameter")
    fixable = [k for k in r.dropped if k in r.mapping]
    if not fixable:
        why = []
        if r.conflicts:
            why.append(f"{_keys(r.conflicts)} would get the same name: keep the trained one and "
                       "delete the other")
        if r.unmappable:
            why.append(f"{_keys(r.unmappable)} name no parameter of the model config.json "
                       "describes")
        return CannotFix("; ".join(why) or "no rename makes the dropped keys land")
    if r.problem:
        return CannotFix(r.problem)
    first = sorted(fixable)[0]
    left = ""
    if r.conflicts or r.unmappable:
        left = (f"; left as they are: {_keys(list(r.conflicts) + list(r.unmappable))} (no "
                "rename saves them)")

    mapping = dict(r.mapping)

    def rename(w: Workspace) -> None:
        tensors = w.tensors(NON_LORA)
        assert tensors is not None
        w.set_tensors(NON_LORA, {mapping.get(k, k): v for k, v in tensors.items()},
                      summary="keys renamed, tensors unchanged")

    return Proposal(
        title=f"rename {len(r.mapping)} key(s) of {NON_LORA} to LLaVA's canonical names "
              f"('{first}' -> '{r.mapping[first]}'); the tensors are unchanged bit for bit{left}",
        safety=FixSafety.unsafe if r.llm else FixSafety.safe, files=(NON_LORA,), edit=rename,
        unsafe_reason=(f"it also loads LLM weights ({_keys(r.llm, 2)}) into the model the LoRA "
                       "is merged into; right only if training really updated them"
                       if r.llm else None))


def _trained_from_llava(cfg: dict | None) -> bool:
    return any(str(a).startswith("Llava") for a in (cfg or {}).get("architectures") or [])


@planner("LD302", watches=(NON_LORA, CONFIG))
def fix_projector_missing(pi: PlanInput) -> Outcome:
    """Inject the stage-1 projector under LLaVA's canonical names when none lands."""
    ctx, ws = pi.ctx, pi.ws
    cfg = ws.json(CONFIG)
    if cfg is None:
        return CannotFix(f"{ctx.path / CONFIG} is missing or unreadable (LD101/LD501 first)")
    declared = cfg.get("mm_projector_type") or DEFAULT_PROJECTOR_TYPE
    want = expected_projector(declared, 1, 1)
    if want == {}:
        return NothingToDo("an identity projector has no weights")
    names = ws.tensor_names(NON_LORA)
    if names is None:
        return CannotFix(f"no readable {NON_LORA} to inject into (LD104/LD501 first)")
    nl_proj = landed_projector(names, cfg)
    if nl_proj and (want is None or set(want) <= set(nl_proj)):
        if pi.findings and ws.is_pending(NON_LORA):
            return AlreadyDone(f"the planned {NON_LORA} holds the projector")
        return NothingToDo("the projector lands from non_lora_trainables.bin")
    if ctx.base is None:
        return CannotFix("no readable base model is resolved, so whether it provides the "
                         "projector is unknown: pass --base")
    bp = {n[len(PROJ):] for n in ctx.base.tensor_names if n.startswith(PROJ)}
    if nl_proj or bp:
        return CannotFix("part of the projector lands (from the file or the base): the rest "
                         "cannot be taken from a stage-1 file without mixing two projectors; "
                         "find the complete non_lora_trainables.bin of this run")
    facts_in_file = projector_facts({n: () for n in names})
    if facts_in_file is not None:
        return CannotFix("the projector is in the file under names LLaVA drops: LD305's rename "
                         "fixes it")
    res = ctx.projector_resolved
    if res.path is None:
        return CannotFix(f"{res.note or 'no stage-1 projector found'}; pass --projector")
    if res.source != "--projector" and _trained_from_llava(cfg):
        return CannotFix(f"the run was trained from a LLaVA checkpoint, so the sibling stage-1 "
                         f"projector {res.path} is not where it started; pass --projector to "
                         "use a file anyway, or merge onto the LLaVA base")
    s1 = ws.read_tensors(res.path)
    if s1 is None:
        return CannotFix(f"the stage-1 projector {res.path} is unreadable or unsafe (LD306)")
    facts = projector_facts({k: tuple(v.shape) for k, v in s1.items()})
    why = "holds no mm_projector.* tensors" if facts is None else projector_mismatch(facts, cfg)
    if why:
        return CannotFix(f"the stage-1 projector {res.path} does not fit: {why}")
    assert facts is not None
    inject = {canonical_non_lora_key(PROJ + sub): s1[k] for sub, k in sorted(facts.keys.items())}
    before = landed(names, cfg)
    after_names = [*names, *inject]
    after = landed(after_names, cfg)
    lost = [k for k in before if after.get(k) != before[k]]
    renames: dict[str, str] = {}
    if lost:  # the injected `model.model.` keys change the builder's prefix stripping
        r = plan_renames(after_names, cfg)
        if r.problem or r.llm or any(k not in r.mapping for k in lost):
            return CannotFix(f"injecting the projector would make LLaVA drop {_keys(lost)}; "
                             f"rename the file's keys to LLaVA's canonical form first")
        renames = dict(r.mapping)

    def add(w: Workspace) -> None:
        tensors = w.tensors(NON_LORA) or {}
        merged = {renames.get(k, k): v for k, v in tensors.items()}
        merged.update(inject)
        w.set_tensors(NON_LORA, merged, summary=f"stage-1 projector {res.path} injected")

    return Proposal(
        title=f"inject the stage-1 projector {res.path} ({len(inject)} tensors, "
              f"{facts.type}) into {NON_LORA} under LLaVA's base_model.model.model.mm_projector.*"
              " names" + (f", renaming {len(renames)} existing key(s) to match" if renames else ""),
        safety=FixSafety.unsafe, files=(NON_LORA,), edit=add,
        unsafe_reason="it is the projector training started from, not a fine-tuned one (if the "
                      "projector was frozen during fine-tuning, it is exactly the one used)")
