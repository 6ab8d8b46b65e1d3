"""Typed, lenient views of the JSON configs in a LLaVA run (unknown fields are kept)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from llava_doctor.errors import FileCorruptError

MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path: Path | str) -> dict[str, Any]:
    """Parse a JSON object file; any failure is a FileCorruptError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise FileCorruptError(f"JSON file is {size:,} bytes, larger than any config",
                                   path=path, rule="json-too-large")
        raw = path.read_bytes()
    except OSError as e:
        raise FileCorruptError(f"cannot read file ({e.strerror})", path=path, rule="unreadable",
                               hint="check the path and its permissions") from None
    if raw.startswith(b"version https://git-lfs"):
        from llava_doctor.errors import LfsPointerError

        raise LfsPointerError("is a Git LFS pointer, not the JSON file", path=path)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FileCorruptError("is not UTF-8 text", path=path, rule="invalid-json",
                               hint="restore the file from the training output") from None
    except json.JSONDecodeError as e:
        raise FileCorruptError(f"is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})",
                               path=path, rule="invalid-json",
                               hint="restore the file from the training output") from None
    except ValueError as e:  # an integer literal of more than 4300 digits
        raise FileCorruptError(f"holds a number Python refuses to read ({e})", path=path,
                               rule="invalid-json",
                               hint="restore the file from the training output") from None
    except RecursionError:
        raise FileCorruptError("JSON nests too deeply to be a config", path=path,
                               rule="invalid-json") from None
    if not isinstance(obj, dict):
        raise FileCorruptError(f"holds a JSON {type(obj).__name__}, not an object", path=path,
                               rule="invalid-json",
                               hint="restore the file from the training output")
    return obj


class _View(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    def raw(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_unset=True)


class ModelConfig(_View):
    """`config.json`: a Llama/vicuna config, a LLaVA config (mm_* fields) or a llava-hf one."""

    name_or_path: str | None = Field(default=None, alias="_name_or_path")
    model_type: str | None = None
    architectures: list[str] | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    vocab_size: int | None = None
    torch_dtype: str | None = None
    tie_word_embeddings: bool | None = None
    quantization_config: dict[str, Any] | None = None
    text_config: dict[str, Any] | None = None
    vision_config: dict[str, Any] | None = None
    mm_vision_tower: str | None = None
    mm_hidden_size: int | None = None
    mm_projector_type: str | None = None
    mm_patch_merge_type: str | None = None
    mm_use_im_patch_token: bool | None = None
    mm_use_im_start_end: bool | None = None
    mm_vision_select_layer: int | None = None
    mm_vision_select_feature: str | None = None
    use_mm_proj: bool | None = None
    tune_mm_mlp_adapter: bool | None = None
    freeze_mm_mlp_adapter: bool | None = None
    image_aspect_ratio: str | None = None

    @property
    def is_llava(self) -> bool:
        """Original-LLaVA config (mm_* fields at top level)."""
        return self.mm_vision_tower is not None or bool(
            self.architectures and any(a.startswith("Llava") and a.endswith("ForCausalLM")
                                       for a in self.architectures))

    @property
    def is_llava_hf(self) -> bool:
        return self.text_config is not None and self.vision_config is not None or bool(
            self.architectures and "LlavaForConditionalGeneration" in self.architectures)

    @property
    def llm_dims(self) -> dict[str, int | None]:
        """The language model's size fields (from text_config for llava-hf)."""
        src: dict[str, Any] = self.text_config if (self.hidden_size is None and self.text_config) \
            else self.raw()
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")
        return {k: src.get(k) for k in keys}


class AdapterConfig(_View):
    """`adapter_config.json` as written by any peft version."""

    peft_type: str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    init_lora_weights: bool | str = True
    layer_replication: list[Any] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None


class GenerationConfig(_View):
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    typical_p: float | None = None
    num_beams: int | None = None


_V = TypeVar("_V", bound=_View)

#: The largest value a model config may declare for each size, about an order of magnitude
#: beyond any released model (Llama-3.1-405B: hidden 16,384, 126 layers, vocab 128,256;
#: Gemma: vocab 256,000). Sizes drive loops and allocations (the module list of a model
#: described only by its config, shapes, memory estimates), so a value outside 1..limit is a
#: finding about the file (LD501), never work. Whether an in-range size is the right one is
#: told by the files: the base's tensors (LD402, LD403), the projector's (LD304).
SIZE_LIMITS: dict[str, int] = {
    "hidden_size": 1 << 18, "intermediate_size": 1 << 20, "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 14, "num_key_value_heads": 1 << 14, "vocab_size": 1 << 24,
    "mm_hidden_size": 1 << 18, "head_dim": 1 << 16,
}


def size_problem(data: dict[str, Any]) -> str | None:
    """The first declared size outside `SIZE_LIMITS`, described; also inside `text_config`
    and `vision_config` (llava-hf). None when every size is a whole number in range."""
    for where, src in (("", data), ("text_config.", data.get("text_config")),
                       ("vision_config.", data.get("vision_config"))):
        if not isinstance(src, dict):
            continue
        for key, limit in SIZE_LIMITS.items():
            value = src.get(key)
            if value is None:
                continue
            whole = isinstance(value, int) and not isinstance(value, bool) or (
                isinstance(value, float) and value.is_integer())
            if not whole or not 1 <= value <= limit:
                shown = json.dumps(value) if not isinstance(value, int) or value < 10**30 \
                    else f"a {len(str(value)):,}-digit number"
                return (f"{where}{key} is {shown}, outside any model's range (a whole number "
                        f"from 1 to {limit:,})")
    return None


def _load_view(cls: type[_V], path: Path | str, hint: str | None) -> _V:
    """Parse a JSON config into its typed view; a field of the wrong type or a size out of any
    model's range is LD501, like bad JSON, rather than a crash, a hang or an allocation in
    every check that reads the config."""
    data = read_json(path)
    try:
        view = cls.model_validate(data)
    except Exception as e:  # pydantic ValidationError
        raise FileCorruptError(f"has a field of the wrong type ({_first_error(e)})", path=path,
                               rule="invalid-config", hint=hint) from None
    problem = size_problem(data) if cls is ModelConfig else None
    if problem is not None:
        raise FileCorruptError(f"declares a size no model has: {problem}", path=path,
                               rule="size-out-of-range", hint=hint)
    return view


def load_model_config(path: Path | str) -> ModelConfig:
    return _load_view(ModelConfig, path, "restore config.json from the training output")


def load_adapter_config(path: Path | str) -> AdapterConfig:
    return _load_view(AdapterConfig, path,
                      "restore adapter_config.json from the training output")


def load_generation_config(path: Path | str) -> GenerationConfig:
    return _load_view(GenerationConfig, path, None)


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            loc = ".".join(str(p) for p in errs[0].get("loc", ()))
            return f"{loc}: {errs[0].get('msg')}"
    return str(e).splitlines()[0]


# --- tokenizers -------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def sentencepiece_size(path: Path | str) -> int:
    """Number of pieces in a sentencepiece ``tokenizer.model`` (protobuf field 1), no library."""
    buf = Path(path).read_bytes()
    i = count = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _varint(buf, i)
            i += length
            if field == 1:
                count += 1
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf")
    return count


def tokenizer_length(model_dir: Path) -> int | None:
    """``len(tokenizer)`` as transformers computes it: base vocab plus added tokens.

    Returns None when no tokenizer file can be read.
    """
    base: int | None = None
    ids: set[int] = set()
    tj = model_dir / "tokenizer.json"
    sp = model_dir / "tokenizer.model"
    try:
        if sp.is_file():
            base = sentencepiece_size(sp)
        elif tj.is_file():
            data = read_json(tj)
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                base = len(vocab)
            elif isinstance(vocab, list):
                base = len(vocab)
            for tok in data.get("added_tokens") or []:
                if isinstance(tok, dict) and isinstance(tok.get("id"), int):
                    ids.add(tok["id"])
    except (ValueError, OSError, FileCorruptError):
        return None
    if base is None:
        return None
    added = model_dir / "added_tokens.json"
    if added.is_file():
        try:
            ids.update(v for v in read_json(added).values() if isinstance(v, int))
        except FileCorruptError:
            pass
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        try:
            dec = read_json(tc).get("added_tokens_decoder") or {}
            # a token id of more digits than any vocabulary is not one (and int() of 4,300+
            # digits raises)
            ids.update(int(k) for k in dec if str(k).isdigit() and len(str(k)) <= 12)
        except FileCorruptError:
            pass
    return max([base - 1, *ids]) + 1 if ids else base
