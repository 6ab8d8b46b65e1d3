"""LLaVA's own rules, reproduced exactly: name dispatch, key rewrite, projector structure.

Reference: haotian-liu/LLaVA @ c121f04 (`mm_utils.get_model_name_from_path`,
`model/builder.py:load_pretrained_model`, `multimodal_projector/builder.py`); see
llava-layout.md §A–§D and failure-modes.md §0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

CANONICAL_NON_LORA_PREFIX = "base_model.model.model."
PROJECTOR_PREFIX = "model.mm_projector."
_MLP = re.compile(r"^mlp(\d+)x_gelu$")
#: Deepest `mlp{N}x_gelu` (and most `_res{M}x` blocks) a structure is built for. LLaVA's
#: projectors are 1-3 Linear layers deep; a config declaring more than this cannot match any
#: projector file (each layer is two keys), and building its layout would be work driven by a
#: number nobody checked (`mlp100000000x_gelu`): such a type gets no layout, and the checks
#: report the declared depth against the keys the files hold.
MAX_PROJECTOR_DEPTH = 256


def declared_depth(ptype: str) -> int | None:
    """The layer count `mlp{N}x_gelu` / `mlp{N}x_res{M}x_gelu` declare (N + M), None for other
    types. Read from the digits' length first, so a 10,000-digit N costs nothing."""
    m = _MLP.match(ptype) or _MLP_RES.match(ptype)
    if m is None:
        return None
    digits = [g for g in m.groups() if g is not None]
    if any(len(d) > 9 for d in digits):
        return 10 ** (max(len(d) for d in digits) - 1)  # a lower bound is all that is needed
    return sum(int(d) for d in digits)


def get_model_name_from_path(model_path: str) -> str:
    """LLaVA's `get_model_name_from_path`, byte for byte."""
    model_path = model_path.strip("/")
    parts = model_path.split("/")
    if parts[-1].startswith("checkpoint-"):
        return parts[-2] + "_" + parts[-1] if len(parts) > 1 else parts[-1]
    return parts[-1]


def builder_branch(model_name: str, has_base: bool = True) -> str:
    """Which branch of `load_pretrained_model` a name takes (failure-modes.md §0)."""
    name = model_name.lower()
    if "llava" in name:
        if "lora" in name and has_base:
            return "lora"
        if has_base:
            return "projector-only"
        return "full"
    return "plain-llm"


def builder_rewrite(keys: Iterable[str]) -> dict[str, str]:
    """LLaVA's non_lora_trainables key rewrite: original key -> key given to load_state_dict.

    Strip a leading `base_model.`; then, if ANY key starts with `model.model.`, strip a leading
    `model.` from every key that has it.
    """
    step1 = {k: (k[len("base_model."):] if k.startswith("base_model.") else k) for k in keys}
    if any(v.startswith("model.model.") for v in step1.values()):
        step1 = {k: (v[len("model."):] if v.startswith("model.") else v) for k, v in step1.items()}
    return step1


@dataclass(frozen=True)
class ProjectorShape:
    """A projector type and the state-dict entries (relative names -> shape) it must have."""

    type: str
    keys: dict[str, tuple[int, ...]]


def projector_layout(ptype: str, hidden: int, mm_hidden: int) -> ProjectorShape | None:
    """Expected keys (relative to `mm_projector.`) and shapes for a projector type, or None."""
    if ptype == "linear":
        return ProjectorShape(ptype, {"weight": (hidden, mm_hidden), "bias": (hidden,)})
    if ptype == "identity":
        return ProjectorShape(ptype, {})
    m = _MLP.match(ptype)
    if m:
        if (declared_depth(ptype) or 0) > MAX_PROJECTOR_DEPTH:
            return None
        # LLaVA's builder makes one Linear, then one more per depth step: mlp0x is mlp1x.
        depth = max(int(m.group(1)), 1)
        keys: dict[str, tuple[int, ...]] = {}
        for i in range(depth):
            keys[f"{2 * i}.weight"] = (hidden, mm_hidden if i == 0 else hidden)
            keys[f"{2 * i}.bias"] = (hidden,)
        return ProjectorShape(ptype, keys)
    return None


def infer_projector_type(rel_keys: Iterable[str]) -> str | None:
    """Projector type from its state-dict keys (relative to `mm_projector.`), or None."""
    keys = set(rel_keys)
    if not keys:
        return "identity"
    if keys == {"weight", "bias"} or keys == {"weight"}:
        return "linear"
    if any(".pre_norm." in k or k.startswith("conv_pool") for k in keys):
        return "pooler" if any(k.startswith("conv_pool") for k in keys) else None
    idx = set()
    for k in keys:
        m = re.match(r"^(\d+)\.(weight|bias)$", k)
        if not m:
            return None
        idx.add(int(m.group(1)))
    expected = set(range(0, 2 * len(idx), 2))
    if idx == expected:
        return f"mlp{len(idx)}x_gelu"
    return None


def projector_keys(tensor_names: Iterable[str]) -> dict[str, str]:
    """Full key -> key relative to `mm_projector.` for every name containing `mm_projector.`."""
    out = {}
    for k in tensor_names:
        i = k.find("mm_projector.")
        if i >= 0:
            out[k] = k[i + len("mm_projector."):]
    return out


# --- Projector structures LLaVA-NeXT adds, and the parameters of the model the merge builds ------
# (appended for the LD3xx checks; the functions above stay as they are)

_MLP_RES = re.compile(r"^mlp(\d+)x_res(\d+)x_gelu$")
_SUB_INDEX = re.compile(r"^(\d+)\.")


def expected_projector(ptype: str, hidden: int, mm_hidden: int
                       ) -> dict[str, tuple[int, ...]] | None:
    """Keys (relative to `mm_projector.`) and shapes of every projector type LLaVA or LLaVA-NeXT
    builds: `projector_layout`'s types plus NeXT's `pooler` and `mlp{N}x_res{M}x_gelu`.

    None for a type neither builder knows (LLaVA raises `ValueError: Unknown projector type`).
    """
    basic = projector_layout(ptype, hidden, mm_hidden)
    if basic is not None:
        return dict(basic.keys)
    h, c = hidden, mm_hidden
    if ptype == "pooler":
        return {"conv_pool.weight": (h, c, 2, 2), "conv_pool.bias": (h,),
                "proj.1.weight": (h, h), "proj.1.bias": (h,)}
    m = _MLP_RES.match(ptype)
    if m is None or (declared_depth(ptype) or 0) > MAX_PROJECTOR_DEPTH:
        return None
    depth, res = max(int(m.group(1)), 1), int(m.group(2))
    out = dict(projector_layout(f"mlp{depth}x_gelu", h, c).keys)  # type: ignore[union-attr]
    # NeXT appends SimpleResBlock(H) modules after the MLP: Sequential indices 2N-1 ... 2N-2+M.
    for j in range(2 * depth - 1, 2 * depth - 1 + res):
        out.update({f"{j}.pre_norm.weight": (h,), f"{j}.pre_norm.bias": (h,),
                    f"{j}.proj.0.weight": (h, h), f"{j}.proj.0.bias": (h,),
                    f"{j}.proj.2.weight": (h, h), f"{j}.proj.2.bias": (h,)})
    return out


def projector_type_of(rel_keys: Iterable[str]) -> str | None:
    """`infer_projector_type`, extended to NeXT's `mlp{N}x_res{M}x_gelu`; None when unrecognised."""
    keys = set(rel_keys)
    if not any(".pre_norm." in k for k in keys):
        return infer_projector_type(keys)
    res_idx = sorted({int(m.group(1)) for k in keys if ".pre_norm." in k
                      for m in [_SUB_INDEX.match(k)] if m})
    if not res_idx:
        return None
    depth = (res_idx[0] + 1) // 2
    ptype = f"mlp{depth}x_res{len(res_idx)}x_gelu"
    want = expected_projector(ptype, 1, 1)
    return ptype if want is not None and set(want) == keys else None


# Decoder-layer parameters of LlamaForCausalLM (biases only with attention_bias / mlp_bias).
_LLAMA_LAYER = re.compile(
    r"^model\.layers\.(\d+)\.(?:(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)\.(weight|bias)"
    r"|(?:input_layernorm|post_attention_layernorm)\.weight)$")
# Sub-modules whose parameters exist only when the model is built with them; accepted by prefix.
MULTIMODAL_PREFIXES = ("model.mm_projector.", "model.vision_resampler.", "model.vision_tower.")
# Projector sub-keys of every structure `expected_projector` knows (Linear / Sequential of
# Linears, NeXT's SimpleResBlock and PoolerProjector).
_PROJ_SUB = re.compile(r"^(?:(?:\d+\.)?|\d+\.(?:pre_norm|proj\.\d+)\.|conv_pool\.|proj\.\d+\.)"
                       r"(?:weight|bias)$")
# Module names peft inserts; a key through one of them is never a parameter of the bare model.
_PEFT_SEGMENTS = frozenset({"base_layer", "modules_to_save", "original_module", "lora_A",
                            "lora_B", "lora_embedding_A", "lora_embedding_B",
                            "lora_magnitude_vector"})
# First path components that live inside `LlavaLlamaModel` (`model.` in the full model).
_INNER = ("mm_projector", "image_newline", "vision_resampler", "vision_tower", "embed_tokens",
          "layers", "norm")


@dataclass(frozen=True)
class LlavaParams:
    """Which parameter names `LlavaLlamaForCausalLM(config)` has when LLaVA's builder makes it.

    This is the set `load_state_dict(non_lora_trainables, strict=False)` matches against: a key
    outside it is dropped without a word. Projector sub-keys are accepted whatever their
    structure (a structure that disagrees with `mm_projector_type` is LD301's finding) as long
    as they name a Linear/LayerNorm/Conv parameter, not a peft wrapper; and the
    vision tower / resampler by prefix, since their parameter lists come from other checkpoints.
    """

    num_layers: int | None = None  # None: any layer index is accepted
    patch_merge_type: str = "flat"
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict | None) -> LlavaParams:
        """From a LoRA dir's `config.json` (LLaVA's defaults for absent fields)."""
        cfg = cfg or {}
        layers = cfg.get("num_hidden_layers")
        return cls(num_layers=layers if isinstance(layers, int) else None,
                   patch_merge_type=str(cfg.get("mm_patch_merge_type") or "flat"),
                   attention_bias=bool(cfg.get("attention_bias", False)),
                   mlp_bias=bool(cfg.get("mlp_bias", False)))

    @property
    def has_image_newline(self) -> bool:
        # llava_arch.py: `if 'unpad' in getattr(config, 'mm_patch_merge_type', '')`.
        return "unpad" in self.patch_merge_type

    def accepts(self, name: str) -> bool:
        """True when `name` is a parameter of the model (so strict=False would load it)."""
        if name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            return True
        if name == "model.image_newline":
            return self.has_image_newline
        if _PEFT_SEGMENTS.intersection(name.split(".")):
            return False
        if name.startswith(MULTIMODAL_PREFIXES[0]):
            return bool(_PROJ_SUB.match(name[len(MULTIMODAL_PREFIXES[0]):]))
        if any(name.startswith(p) and len(name) > len(p) for p in MULTIMODAL_PREFIXES):
            return True
        m = _LLAMA_LAYER.match(name)
        if m is None:
            return False
        if self.num_layers is not None and int(m.group(1)) >= self.num_layers:
            return False
        if m.group(3) == "bias":
            return self.attention_bias if m.group(2).startswith("self_attn") else self.mlp_bias
        return True


def canonical_param_name(key: str) -> str | None:
    """The `LlavaLlamaForCausalLM` parameter a non_lora_trainables key most plausibly means.

    Undoes the wrappings seen in the wild (failure-modes F07): DDP's `module.`, peft's
    `base_layer` and `modules_to_save.<adapter>`, a doubled `model.`, a missing `model.`
    (bare `mm_projector.*`), and llava-hf names (`multi_modal_projector.linear_{k}` ->
    `mm_projector.{2(k-1)}`, `language_model.*`). None for peft's `original_module` copies (the
    untrained originals of a `modules_to_save` layer) and for names with no such parameter. The
    result is a name, not a verdict: check it with `LlavaParams.accepts`.
    """
    segs = key.split(".")
    if "original_module" in segs:
        return None
    segs = [s for s in segs if s not in ("module", "base_layer")]
    while "modules_to_save" in segs:
        i = segs.index("modules_to_save")
        del segs[i:i + 2]  # `modules_to_save.<adapter name>`
    name = ".".join(segs)
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    while name.startswith("model.model."):
        name = name[len("model."):]
    # llava-hf: legacy `language_model.model.*` / `language_model.lm_head`, >= 4.52
    # `model.language_model.*` and `[model.]multi_modal_projector.linear_k`.
    for old, new in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                     ("model.language_model.", "model.")):
        if name.startswith(old):
            name = new + name[len(old):]
    m = re.match(r"^(?:model\.)?multi_modal_projector\.linear_(\d+)\.(.+)$", name)
    if m:
        k = int(m.group(1))
        if k < 1:
            return None
        name = f"model.mm_projector.{2 * (k - 1)}.{m.group(2)}"
    if name.startswith(("model.", "lm_head.")):
        return name
    if name.split(".", 1)[0] in _INNER:
        return "model." + name
    return None


def canonical_non_lora_key(param: str) -> str:
    """The key LLaVA's own `train.py` saves a parameter under in `non_lora_trainables.bin`."""
    return "base_model.model." + param


# --- The stack LLaVA pins, and the LLaVA class of each LLM -----------------------------------
# (appended for per-consumer severities; the functions above stay as they are)

#: Which transformers refuses to save vicuna's generation config, as one text (LD404, the merge's
#: note, the README): LLaVA #1144 reports it with the version LLaVA pins.
GENERATION_SAVE_REFUSED = "transformers 4.37.2 (the version LLaVA pins; LLaVA #1144) and later"

#: LLM family -> (LLaVA `model_type`, LLaVA class) as LLaVA / LLaVA-NeXT register them.
#: haotian-liu/LLaVA has llama, mistral and mpt; LLaVA-NeXT adds mixtral, gemma and qwen.
LLAVA_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("llava_llama", "LlavaLlamaForCausalLM"),
    "mistral": ("llava_mistral", "LlavaMistralForCausalLM"),
    "mixtral": ("llava_mixtral", "LlavaMixtralForCausalLM"),
    "mpt": ("llava_mpt", "LlavaMptForCausalLM"),
    "gemma": ("llava_gemma", "LlavaGemmaForCausalLM"),
    "qwen": ("llava_qwen", "LlavaQwenForCausalLM"),
}
#: The families only LLaVA-NeXT's code knows (haotian-liu/LLaVA has no class for them).
NEXT_ONLY = frozenset({"mixtral", "gemma", "qwen"})

# Plain-LLM class name prefixes and model_type spellings -> family. Order matters: "mixtral"
# before "mistral" is not needed (no substring overlap), "qwen" covers qwen2 / qwen2_moe.
_FAMILY_WORDS = (("mixtral", "mixtral"), ("mistral", "mistral"), ("mpt", "mpt"),
                 ("gemma", "gemma"), ("qwen", "qwen"), ("llama", "llama"))


def llm_family_of(config: dict[str, object] | None) -> str | None:
    """The LLM family of a LLaVA (or plain) config, from `model_type` and `architectures`:
    a key of `LLAVA_CLASSES`, or None when the config names none of them."""
    if not config:
        return None
    names = [str(config.get("model_type") or "")]
    archs = config.get("architectures")
    if isinstance(archs, list):
        names += [str(a) for a in archs]
    for raw in names:
        low = raw.lower()
        if low in ("llava", ""):
            continue  # LLaVA's pre-v1.6 type and transformers' llava-hf type say nothing
        for word, family in _FAMILY_WORDS:
            if word in low:
                return family
    # model_type "llava" without architectures: LLaVA before v1.6 wrote it only for its Llama
    # class (its MPT class was "llava_mpt"). Architectures naming another LLM: no family known.
    if config.get("model_type") == "llava" and not archs:
        return "llama"
    return None
