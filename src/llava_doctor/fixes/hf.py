"""Fixes for llava-hf runs: rename the adapter's keys into the target transformers' layout
(LD701) and write the adapter dir's `processor_config.json` from the model's vision settings
(LD704). The base is never modified.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from llava_doctor.artifacts import hf_layout
from llava_doctor.artifacts.discovery import ADAPTER_WEIGHTS
from llava_doctor.checks.hf import (
    PROCESSOR,
    image_token_count,
    renamed_adapter_keys,
    target_version,
)
from llava_doctor.errors import DoctorError
from llava_doctor.fixes.registry import (
    CannotFix,
    NothingToDo,
    Outcome,
    PlanInput,
    Proposal,
    planner,
)
from llava_doctor.fixes.workspace import Workspace
from llava_doctor.models import FixSafety, Severity

ACFG = "adapter_config.json"


def rename_safetensors_keys(data: bytes, mapping: dict[str, str]) -> bytes:
    """The same safetensors file with tensors renamed: only the header changes (offsets, dtypes,
    shapes and every data byte are kept), padded with spaces to 8 bytes as safetensors does."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {mapping.get(k, k): v for k, v in header.items()}
    if len(out) != len(header):
        raise ValueError("renaming would give two tensors the same name")
    raw = json.dumps(out, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


@planner("LD701")
def fix_hf_key_layout(pi: PlanInput) -> Outcome:
    """Rename the adapter's keys into the layout the target transformers runs."""
    ctx, ws = pi.ctx, pi.ws
    version = target_version(ctx)
    if version is None:
        return CannotFix("no target transformers version: pass --transformers-version V (the "
                         "keys are renamed into the layout V runs)")
    if not any(f.evidence.get("what") == "adapter" and f.severity == Severity.error
               for f in pi.findings):
        return CannotFix("only the base checkpoint's layout is at issue, and the base is never "
                         "modified: merge with `llava-doctor merge` (canonical layout)")
    rel = next((n for n in ADAPTER_WEIGHTS if ws.exists(n)), None)
    names = ws.tensor_names(rel) if rel is not None else None
    if rel is None or names is None:
        return NothingToDo("no readable adapter file")
    mapping = renamed_adapter_keys(names, version)
    if not mapping:
        return NothingToDo(f"every key is already in the layout transformers {version} runs")
    first = sorted(mapping)[0]
    source = ws.path(rel)
    # Full module paths in target_modules (LLaMA-Factory writes them) must follow the keys, or
    # peft creates no layer for the renamed keys; names and regexes are left as they are.
    lay = hf_layout.detect_adapter_layout(names)
    runs = hf_layout.runtime_layout(version)
    acfg = ws.json(ACFG) or {}
    targets = acfg.get("target_modules")
    new_targets = None
    if isinstance(targets, list) and lay is not None and runs is not None:
        conv = [hf_layout.convert(t, lay, runs) if isinstance(t, str) else t for t in targets]
        new_targets = conv if conv != targets else None

    def rename(w: Workspace) -> None:
        if rel.endswith(".safetensors"):
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise DoctorError(f"cannot read ({e.strerror})", path=source) from None
            w.put_bytes(rel, rename_safetensors_keys(data, mapping),
                        summary="keys renamed in the header, tensor bytes unchanged")
        else:
            tensors = w.tensors(rel)
            assert tensors is not None
            w.set_tensors(rel, {mapping.get(k, k): v for k, v in tensors.items()},
                          summary="keys renamed, tensors unchanged")
        if new_targets is not None:
            w.edit_json(ACFG, {"target_modules": new_targets})

    return Proposal(
        title=f"rename {len(mapping)} key(s) of {rel} into the layout transformers {version} "
              f"runs ('{first}' -> '{mapping[first]}'); the tensors are unchanged bit for bit",
        safety=FixSafety.safe, files=(rel, ACFG) if new_targets is not None else (rel,),
        edit=rename)


@planner("LD704")
def fix_image_token_count(pi: PlanInput) -> Outcome:
    """Write the adapter dir's processor_config.json with the model's vision settings."""
    ctx, ws = pi.ctx, pi.ws
    try:
        facts = image_token_count(ctx)
    except Exception:  # Skip: no base / not llava-hf
        facts = None
    if facts is None:
        return NothingToDo("no processor settings to compare")
    if facts["tokens"] == facts["features"]:
        return NothingToDo("the processor expands <image> into as many tokens as features")
    if not facts["fixable"]:
        return CannotFix("the image processor's image size does not fit the vision tower: no "
                         "processor_config.json setting makes the counts agree; use the base's "
                         "own preprocessor_config.json")
    want = dict(facts["expected"])
    src = Path(facts["processor_config"])
    in_dir = ws.exists(PROCESSOR)

    def write(w: Workspace) -> None:
        if in_dir:
            w.edit_json(PROCESSOR, want)
        else:
            data = w.json(src) if src.parent == w.root else json.loads(src.read_text())
            w.create_json(PROCESSOR, {**(data or {}), **want})

    what = "edit" if in_dir else f"write (from {src}, with)"
    return Proposal(
        title=f"{what} {PROCESSOR} in the adapter dir: "
              + ", ".join(f"{k}={json.dumps(v)}" for k, v in want.items())
              + f", so <image> expands into {facts['features']} tokens, the features the "
                "model produces",
        safety=FixSafety.safe, files=(PROCESSOR,), edit=write)
