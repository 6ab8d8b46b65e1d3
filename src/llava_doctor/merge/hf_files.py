"""The files around a llava-hf checkpoint's weights: config.json, the processor files, the
tokenizer with ``<image>`` and ``<pad>``, and a chat template. Pure functions of their inputs;
nothing is written here.

Portable across transformers 4.46 ... 5.x (llava-hf-layout.md, "Version traps"): config.json
with ``image_seq_length`` of the actual tower, ``preprocessor_config.json`` and
``processor_config.json`` each in its classic form, the chat template both as
``chat_template.json`` (what 4.x processors read) and inside ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.configs import read_json
from llava_doctor.artifacts.hf_convert import SELECT_FEATURE, Tower
from llava_doctor.errors import UsageError
from llava_doctor.merge.hf_plan import Vocab

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# config.json fields that are LLaVA's, not the language model's.
_LLAVA_ONLY = frozenset({
    "use_mm_proj", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side",
    "tokenizer_model_max_length", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower", "tune_mm_vision_resampler", "mm_resampler_type",
    "_name_or_path", "architectures", "transformers_version", "quantization_config",
    "load_in_4bit", "load_in_8bit", "dtype", "torch_dtype"})
_LLM_TYPES = {"mistral": ("mistral", "MistralForCausalLM"),
              "llama": ("llama", "LlamaForCausalLM")}

_VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's "
                  "questions.")
# Message content is a string or a list of {"type": "image"} / {"type": "text", "text": ...}
# parts, as llava-hf processors' apply_chat_template passes it; images go first, each followed
# by a newline, as LLaVA's own prompts put them. Literal text is emitted as {{ '...' }} so the
# whitespace-trimming tags cannot eat its spaces and newlines.
_CONTENT = ("{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
            "{%- for part in message['content'] if part['type'] == 'image' -%}"
            "{{ '<image>\\n' }}{%- endfor -%}"
            "{%- for part in message['content'] if part['type'] == 'text' -%}"
            "{{ part['text'] }}{%- endfor -%}{%- endif -%}")
CHAT_TEMPLATES: dict[str, str] = {
    # LLaVA's conv_vicuna_v1 (sep_style TWO, seps " " and "</s>"):
    # "SYSTEM USER: <image>\nq ASSISTANT: a</s>USER: q2 ASSISTANT:"
    "vicuna_v1": (
        "{%- set ns = namespace(system='" + _VICUNA_SYSTEM.replace("'", "\\'") + "') -%}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- set ns.system = message['content'] -%}{%- endfor -%}{{ ns.system + ' ' }}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}" + _CONTENT + "{{ ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' }}" + _CONTENT + "{{ '</s>' }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"),
    # LLaVA's conv_mistral_instruct (sep_style LLAMA_2, no system prompt):
    # "[INST] <image>\nq [/INST] a </s>[INST] q2 [/INST]"
    "mistral_instruct": (
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}{{ '[INST] ' }}" + _CONTENT + "{{ ' [/INST]' }}"
        "{%- else -%}{{ ' ' }}" + _CONTENT + "{{ ' </s>' }}{%- endif -%}{%- endfor -%}"),
    # LLaVA's conv_chatml_direct (sep_style MPT, llava-v1.6-34b).
    "chatml_direct": (
        "{%- set ns = namespace(system='Answer the questions.') -%}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- set ns.system = message['content'] -%}{%- endfor -%}"
        "{{ '<|im_start|>system\\n' + ns.system + '<|im_end|>' }}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}" + _CONTENT + "{{ '<|im_end|>' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
        "{%- endif -%}"),
}
CHAT_TEMPLATES["v1"] = CHAT_TEMPLATES["llava_v1"] = CHAT_TEMPLATES["vicuna_v1"]


def default_conv_template(family: str) -> str:
    """LLaVA's conversation mode for a language model family (its run scripts' choice)."""
    return "mistral_instruct" if family == "mistral" else "vicuna_v1"


def chat_template(name: str) -> str:
    """The jinja chat template of one of LLaVA's conversation templates."""
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        raise UsageError(f"unknown --conv-template '{name}'",
                         hint=f"choose one of: {', '.join(sorted(CHAT_TEMPLATES))}") from None


def strategy(cfg: Mapping[str, Any], tower: Tower) -> str:
    """vision_feature_select_strategy: patch -> default (drops CLS), cls_patch -> full.
    SigLIP has no CLS token, so nothing is dropped whatever LLaVA's setting."""
    if not tower.has_cls:
        return "full"
    return SELECT_FEATURE[str(cfg.get("mm_vision_select_feature", "patch"))]


def hf_config(cfg: Mapping[str, Any], tower: Tower, vocab: Vocab, *, family: str, next_: bool,
              out_dtype: str) -> dict[str, Any]:
    """config.json of the llava-hf checkpoint."""
    model_type, arch = _LLM_TYPES.get(family, _LLM_TYPES["llama"])
    text = {k: v for k, v in cfg.items() if k not in _LLAVA_ONLY and not k.startswith("mm_")}
    text.update(model_type=model_type, architectures=[arch], vocab_size=vocab.padded_rows,
                torch_dtype=out_dtype, pad_token_id=vocab.pad_token_id)
    out: dict[str, Any] = {
        "architectures": ["LlavaNextForConditionalGeneration" if next_
                          else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if next_ else "llava",
        "text_config": text,
        "vision_config": dict(tower.vision_config),
        "image_token_index": vocab.image_token_index,
        "pad_token_id": vocab.pad_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": cfg.get("mm_vision_select_layer", -1),
        "vision_feature_select_strategy": strategy(cfg, tower),
        "image_seq_length": tower.patches,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "ignore_index": -100,
        "torch_dtype": out_dtype,
    }
    if next_:
        out["image_grid_pinpoints"] = cfg.get("image_grid_pinpoints")
        out["use_image_newline_parameter"] = True
    return out


def processor_configs(cfg: Mapping[str, Any], tower: Tower, *, next_: bool,
                      template: str) -> dict[str, dict[str, Any]]:
    """preprocessor_config.json (the tower's own, classic form), processor_config.json and
    chat_template.json."""
    pre_path = tower.path / "preprocessor_config.json"
    if pre_path.is_file():
        pre = dict(read_json(pre_path))
    else:  # CLIP's published preprocessing at the tower's resolution
        size = tower.image_size
        pre = {"do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
               "do_center_crop": True, "crop_size": {"height": size, "width": size},
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
               "image_processor_type": "CLIPImageProcessor"}
    pre.pop("processor_class", None)
    pre.pop("feature_extractor_type", None)
    if next_:
        pre.update(image_processor_type="LlavaNextImageProcessor", do_pad=True,
                   image_grid_pinpoints=cfg.get("image_grid_pinpoints"))
    elif "image_processor_type" not in pre:
        pre["image_processor_type"] = "CLIPImageProcessor"
    proc = {"processor_class": "LlavaNextProcessor" if next_ else "LlavaProcessor",
            "image_token": IMAGE_TOKEN, "patch_size": tower.patch_size,
            "vision_feature_select_strategy": strategy(cfg, tower),
            "num_additional_image_tokens": 1 if tower.has_cls else 0}
    return {"preprocessor_config.json": pre, "processor_config.json": proc,
            "chat_template.json": {"chat_template": template}}


def _added(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def tokenizer_files(tok_dir: Path, vocab: Vocab, template: str, *, next_: bool = False,
                    ) -> dict[str, bytes]:
    """The source's tokenizer files with ``<image>`` and ``<pad>`` added as the conversion
    scripts add them (special, not normalized; ``<pad>`` the pad token) and the chat template."""
    out: dict[str, bytes] = {}
    for name in ("tokenizer.model",):
        if (tok_dir / name).is_file():
            out[name] = (tok_dir / name).read_bytes()
    new = {vocab.image_token_index: IMAGE_TOKEN, vocab.pad_token_id: PAD_TOKEN}
    tj = tok_dir / "tokenizer.json"
    if tj.is_file():
        data = read_json(tj)
        added = [a for a in data.get("added_tokens") or []
                 if isinstance(a, dict) and a.get("content") not in new.values()]
        added += [{"id": i, **_added(c)} for i, c in new.items()]
        data["added_tokens"] = added
        out["tokenizer.json"] = _json(data)
    tc_path = tok_dir / "tokenizer_config.json"
    tc: dict[str, Any] = dict(read_json(tc_path)) if tc_path.is_file() else {}
    dec = dict(tc.get("added_tokens_decoder") or {})
    for i, c in new.items():
        dec[str(i)] = _added(c)
    tc["added_tokens_decoder"] = dict(sorted(dec.items(), key=lambda kv: int(kv[0])))
    tc["pad_token"] = PAD_TOKEN
    tc["chat_template"] = template
    tc["processor_class"] = "LlavaNextProcessor" if next_ else "LlavaProcessor"
    tc.pop("auto_map", None)
    out["tokenizer_config.json"] = _json(tc)
    st_path = tok_dir / "special_tokens_map.json"
    st: dict[str, Any] = dict(read_json(st_path)) if st_path.is_file() else {}
    st["pad_token"] = {k: v for k, v in _added(PAD_TOKEN).items() if k != "special"}
    out["special_tokens_map.json"] = _json(st)
    at_path = tok_dir / "added_tokens.json"
    at: dict[str, Any] = dict(read_json(at_path)) if at_path.is_file() else {}
    at.update({c: i for i, c in new.items()})
    out["added_tokens.json"] = _json(at)
    return out


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
