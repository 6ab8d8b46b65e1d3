"""The llava-hf planner: a peft adapter on transformers' Llava / LlavaNext / LlavaOnevision,
merged into a base saved in any of the key layouts, written in the canonical on-disk layout.

Same `MergePlan` as the original-LLaVA planner, same streaming writer and verifier:

1. every base tensor, renamed from the base's layout to the canonical one
   (`hf_layout.to_canonical`): `language_model.model.*`, `language_model.lm_head.*`,
   `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`, which
   transformers 4.36 ... 5.x and vLLM all read;
2. the adapter's full tensors (`modules_to_save`, trained biases, saved embeddings) replace
   theirs, and its LoRA deltas (peft's maths: rslora, DoRA, patterns, `lora_bias`) add to
   them, LoRA on the vision tower and projector included, whichever transformers trained it
   (the adapter's module paths are renamed from their layout to the canonical one).

Side files: the base's config.json (dtype updated), generation_config.json, and the
tokenizer, processor and chat-template files, each group from the adapter dir when training
saved it there, else from the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_doctor.artifacts import hf_layout
from llava_doctor.artifacts.configs import TOKENIZER_FILES
from llava_doctor.artifacts.hf_layout import Layout, Part
from llava_doctor.errors import MergeError, UsageError
from llava_doctor.merge.llava_parts import write_generation_config
from llava_doctor.merge.plan import (
    DTYPES,
    MergeInputs,
    MergePlan,
    base_table,
    check_adapter_config,
    finish_plan,
    plan_adapter,
)
from llava_doctor.merge.writer import write_file, write_index, write_json

CANON = hf_layout.TABLE[Layout.canonical]
# Files the merged dir gets, by group: a group comes whole from the adapter dir or the base.
FILE_GROUPS: dict[str, tuple[str, ...]] = {
    "tokenizer": (*TOKENIZER_FILES, "tokenizer.json", "vocab.json", "merges.txt"),
    "processor": ("preprocessor_config.json", "processor_config.json"),
    "chat template": ("chat_template.jinja", "chat_template.json"),
}


def build_hf_plan(inputs: MergeInputs, *, dtype: str = "float16",
                  max_shard_size: int = 5 * 10**9, force: bool = False) -> MergePlan:
    """Decide every output tensor of a llava-hf merge from headers (canonical output names)."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'", hint=f"choose one of: {', '.join(DTYPES)}")
    check_adapter_config(inputs.adapter_config, inputs.lora_dir / "adapter_config.json")
    names = inputs.base.tensor_names
    base_layout = hf_layout.detect_layout(names)
    if base_layout is None:
        raise MergeError("the base has no llava-hf tensors (language_model.*, vision_tower.*, "
                         "multi_modal_projector.*)", path=inputs.base_path,
                         hint="pass the llava-hf base the adapter was trained on (LD407)")
    embed = f"{CANON[Part.language_model]}.embed_tokens.weight"
    head = f"{CANON[Part.lm_head]}.weight"
    table = base_table(inputs, lambda n: hf_layout.to_canonical(n, base_layout),
                       embed_names=(embed, head))
    adapter_layout = hf_layout.detect_adapter_layout(inputs.adapter.tensors) or Layout.canonical
    specs, bias_deltas = plan_adapter(
        table, inputs, force=force,
        module_name=lambda m: hf_layout.to_canonical(m, adapter_layout))
    if base_layout != Layout.canonical:
        table.notes.append(f"the base is in the {base_layout.value} layout; the merged model is "
                           "written in the canonical layout (transformers 4.36 ... 5.x, vLLM)")
    if adapter_layout != Layout.canonical:
        table.notes.append(f"the adapter's keys are in the {adapter_layout.value} layout "
                           "(trained with transformers >= 4.52); merged under canonical names")
    proj = [n for n in table.targets if n.startswith(CANON[Part.projector] + ".")]
    if any(n in table.replaced for n in proj):
        projector_source = f"the adapter's modules_to_save ({inputs.adapter.path.name})"
    elif any(n in specs for n in proj):
        projector_source = f"base model ({inputs.base_path}) plus the adapter's LoRA"
    else:
        projector_source = f"base model ({inputs.base_path}; not trained)"
    return finish_plan(table, specs, bias_deltas, dtype=dtype, max_shard_size=max_shard_size,
                       adapter_path=inputs.adapter.path, projector_source=projector_source)


def merged_hf_config(base_config: dict[str, Any], out_dtype: str) -> dict[str, Any]:
    """The base's config.json with the output dtype (`torch_dtype` for 4.x, `dtype` for 5.x:
    whichever the base has, else `torch_dtype`, which both read)."""
    cfg = json.loads(json.dumps(base_config))
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = out_dtype
    return cfg


def side_files(lora_dir: Path, base: Path) -> list[tuple[str, Path]]:
    """(group, file) the merged dir gets: each group from the adapter dir if it has any file of
    the group, else from the base."""
    out = []
    for group, names in FILE_GROUPS.items():
        src = lora_dir if any((lora_dir / n).is_file() for n in names) else base
        out += [(group, src / n) for n in names if (src / n).is_file()]
    return out


def write_hf_side_files(plan: MergePlan, inputs: MergeInputs, out: Path, durable: bool,
                        notes: list[str], out_dtype: str) -> dict[str, str]:
    """Index, config.json, generation_config.json, tokenizer/processor/chat-template files."""
    files: dict[str, str] = {}
    name, digest = write_index(plan, out, durable)
    files[name] = digest
    files["config.json"] = write_json(out / "config.json",
                                      merged_hf_config(inputs.base_config or {}, out_dtype),
                                      durable=durable)
    gen_digest = write_generation_config(inputs.base_path, out, durable, notes)
    if gen_digest is not None:
        files["generation_config.json"] = gen_digest
    copied = side_files(inputs.lora_dir, inputs.base_path)
    groups = {g for g, _ in copied}
    for group in FILE_GROUPS:
        if group not in groups:
            notes.append(f"no {group} files in the adapter dir or the base: the merged model has "
                         "none (LD702/LD703)")
    for group, src in copied:
        try:
            data = src.read_bytes()
        except OSError as e:
            raise MergeError(f"cannot read {group} file ({e.strerror})", path=src,
                             hint="check its permissions") from None
        files[src.name] = write_file(out / src.name, data, durable=durable)
    where = {src.parent for _, src in copied}
    if inputs.lora_dir in where:
        notes.append(f"tokenizer/processor/chat-template files taken from {inputs.lora_dir} "
                     "where training saved them")
    return files
