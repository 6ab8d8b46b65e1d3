"""The LLaVA side of a merge: where non-LoRA trainables land, and the files around the weights.

* `place_non_lora`: LLaVA's builder rewrites the keys of ``non_lora_trainables.bin`` (strip
  ``base_model.``, then ``model.`` when any key starts with ``model.model.``) and loads them with
  ``load_state_dict(strict=False)``, silently dropping every key that names no parameter. We
  apply the same rewrite, then the normalisations `llava-doctor fix` knows for keys the rewrite
  misses (DDP's ``module.``, bare ``mm_projector.*``, llava-hf ``multi_modal_projector.*``, peft
  wrappers), so a projector saved under any of those names still lands where LLaVA's model has
  it. Keys that still name no parameter are reported, never silently dropped.
* `merged_config` / `fixed_generation_config` / `tokenizer_files`: what LLaVA's
  ``merge_lora_weights.py`` saves next to the weights, minus its traps (F18, F23, F24).
* `out_name_warnings`: LLaVA's loader picks the model class from the folder name (F11).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.configs import TOKENIZER_FILES
from llava_doctor.artifacts.llava import (
    GENERATION_SAVE_REFUSED,
    LLAVA_CLASSES,
    LlavaParams,
    builder_rewrite,
    canonical_param_name,
    get_model_name_from_path,
    llm_family_of,
)

# Files transformers' tokenizer.save_pretrained may write besides TOKENIZER_FILES.
EXTRA_TOKENIZER_FILES = ("chat_template.jinja", "chat_template.json")
# GenerationConfig fields that only matter when sampling, with transformers' defaults: any of
# them set to something else while do_sample is off makes `GenerationConfig.validate()` complain,
# and transformers then refuses to save (GENERATION_SAVE_REFUSED, F23).
SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50,
                                     "typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0,
                                     "eta_cutoff": 0.0}
_LINEAR_SUB = re.compile(r"^model\.mm_projector\.0\.(weight|bias)$")


@dataclass
class NonLoraPlacement:
    """Where each non_lora_trainables key goes.

    ``placed``: output tensor name -> file key. ``renamed``: file key -> output name, for keys
    LLaVA's own rewrite would have dropped and we normalised. ``dropped``: file key -> why it
    lands nowhere.
    """

    placed: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def place_non_lora(keys: Iterable[str], lora_config: dict[str, Any] | None) -> NonLoraPlacement:
    """Place non_lora_trainables keys on `LlavaLlamaForCausalLM` parameter names."""
    keys = list(keys)
    params = LlavaParams.from_config(lora_config)
    linear = (lora_config or {}).get("mm_projector_type") == "linear"
    rewritten = builder_rewrite(keys)
    out = NonLoraPlacement()
    for key in keys:
        name: str | None = rewritten[key]
        if not params.accepts(name):  # type: ignore[arg-type]
            name = canonical_param_name(key)
            if name is not None and linear:
                # llava-hf calls a linear projector `linear_1` too; LLaVA's has no sub-index.
                m = _LINEAR_SUB.match(name)
                if m:
                    name = f"model.mm_projector.{m.group(1)}"
            if name is None or not params.accepts(name):
                why = "names no parameter of LlavaLlamaForCausalLM"
                if name == "model.image_newline":
                    why = (f"image_newline exists only with an 'unpad' mm_patch_merge_type, and "
                           f"config.json has '{params.patch_merge_type}'")
                out.dropped[key] = why
                continue
            out.renamed[key] = name
        assert name is not None
        if name in out.placed:
            other = out.placed[name]
            raise ValueError(f"non_lora_trainables keys '{other}' and '{key}' both land on "
                             f"'{name}'")
        out.placed[name] = key
    return out


def merged_config(lora_config: dict[str, Any], *, out_dtype: str, base: Path,
                  vocab_rows: int | None) -> tuple[dict[str, Any], list[str]]:
    """The merged dir's config.json (from the LoRA dir's) and notes on what was changed."""
    cfg = dict(lora_config)
    notes: list[str] = []
    if "quantization_config" in cfg:
        cfg.pop("quantization_config")
        notes.append("config.json: removed quantization_config (a QLoRA training setting; the "
                     "merged weights are not quantized)")
    for key in ("load_in_4bit", "load_in_8bit"):
        cfg.pop(key, None)
    # The LLaVA class of the run's LLM (LLaVA-NeXT's LlavaQwenForCausalLM for a Qwen2 run...):
    # LLaVA's own merge always writes the Llama one (LD408).
    model_type, cls = LLAVA_CLASSES[llm_family_of(cfg) or "llama"]
    if cfg.get("model_type") != model_type:
        notes.append(f"config.json: model_type {cfg.get('model_type')!r} -> '{model_type}'")
        cfg["model_type"] = model_type
    cfg["architectures"] = [cls]
    cfg["torch_dtype"] = out_dtype
    if "dtype" in cfg:  # transformers 5 writes `dtype`; keep the two in step
        cfg["dtype"] = out_dtype
    cfg["_name_or_path"] = str(base)
    if vocab_rows is not None and cfg.get("vocab_size") != vocab_rows:
        notes.append(f"config.json: vocab_size {cfg.get('vocab_size')} -> {vocab_rows} (the "
                     "rows of the merged embed_tokens)")
        cfg["vocab_size"] = vocab_rows
    return cfg, notes


def fixed_generation_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``cfg`` made valid for transformers' ``save_pretrained``, and a note when changed.

    vicuna v1.5 ships temperature 0.9 / top_p 0.6 without ``do_sample``;
    `GENERATION_SAVE_REFUSED` says which transformers refuses to save that (F23). Setting
    ``do_sample: true`` keeps the authors' sampling values.
    """
    if cfg.get("do_sample"):
        return dict(cfg), None
    odd = {k: cfg[k] for k, default in SAMPLING_DEFAULTS.items()
           if k in cfg and cfg[k] is not None and cfg[k] != default}
    if not odd:
        return dict(cfg), None
    fixed = dict(cfg)
    fixed["do_sample"] = True
    shown = ", ".join(f"{k}={v}" for k, v in odd.items())
    return fixed, (f"generation_config.json: set do_sample=true (the base sets {shown} without "
                   f"it, which {GENERATION_SAVE_REFUSED} refuse to save)")


def tokenizer_files(base: Path) -> list[Path]:
    """Tokenizer files of the base, in a stable order."""
    return [base / n for n in (*TOKENIZER_FILES, *EXTRA_TOKENIZER_FILES) if (base / n).is_file()]


def llm_family(*configs: dict[str, Any] | None) -> str:
    """'mistral', 'mpt' or 'llama': the LLM under a (LLaVA or plain) config."""
    for cfg in configs:
        mt = str((cfg or {}).get("model_type") or "").lower()
        for fam in ("mistral", "mixtral", "mpt"):
            if fam in mt:
                return "mistral" if fam == "mixtral" else fam
    return "llama"


def out_name_warnings(out: Path, family: str = "llama") -> list[str]:
    """What LLaVA's loader (`load_pretrained_model` without a base) would make of ``out``'s name.

    It chooses by substring of `get_model_name_from_path`: no 'llava' -> plain Llama (text only);
    'mpt' anywhere (even 'prompt') -> LlavaMptForCausalLM; 'mistral'/'mixtral' ->
    LlavaMistralForCausalLM; else LlavaLlamaForCausalLM. A 'lora' in the name sends it to the LoRA
    branch whenever a --model-base is passed (failure modes F09, F11).
    """
    name = get_model_name_from_path(str(out))
    low = name.lower()
    warns: list[str] = []
    if "llava" not in low:
        warns.append(f"--out name '{name}' lacks 'llava': LLaVA's load_pretrained_model would "
                     "load it as a plain language model, without the projector and vision tower; "
                     "rename it, e.g. 'llava-v1.5-7b-merged'")
        return warns
    if "lora" in low:
        warns.append(f"--out name '{name}' contains 'lora': LLaVA's loader takes its LoRA branch "
                     "for it whenever --model-base is passed; drop 'lora' from the name")
    if "mpt" in low:
        warns.append(f"--out name '{name}' contains 'mpt': LLaVA's loader would build "
                     "LlavaMptForCausalLM for this Llama model; rename it")
    elif ("mistral" in low or "mixtral" in low) and family != "mistral":
        warns.append(f"--out name '{name}' contains 'mistral': LLaVA's loader would build "
                     "LlavaMistralForCausalLM for this Llama model; rename it")
    elif family == "mistral" and not ("mistral" in low or "mixtral" in low):
        warns.append(f"--out name '{name}' lacks 'mistral': LLaVA's loader would build "
                     "LlavaLlamaForCausalLM for this Mistral model; add 'mistral' to the name")
    return warns


def write_generation_config(base: Path, out: Path, durable: bool, notes: list[str]) -> str | None:
    """The base's generation_config.json, made savable (vicuna's sampling fields without
    do_sample), written into OUT; its sha256, or None when the base has none."""
    from llava_doctor.artifacts.configs import read_json
    from llava_doctor.merge.writer import write_json

    path = base / "generation_config.json"
    if not path.is_file():
        return None
    gen, note = fixed_generation_config(read_json(path))
    if note:
        notes.append(note)
    return write_json(out / "generation_config.json", gen, durable=durable)
