"""What an original-LLaVA model needs to become a llava-hf checkpoint, read from files only.

* `resolve_tower`: the CLIP/SigLIP directory the vision tower comes from (``--vision-tower``,
  else ``mm_vision_tower`` when it is a local directory, else that hub id in the local Hugging
  Face cache; offline).
* `read_tower`: its config (as a llava-hf ``vision_config``) and its weights' headers.
* `conversion_problems`: everything that cannot map onto llava-hf, as (code, message, path,
  hint) values that the LD8xx checks report and `convert` refuses on. One source of truth, so
  ``check --to llava-hf`` says in advance exactly what ``convert`` would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.configs import read_json, tokenizer_length
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.artifacts.tensors import TensorInfo
from llava_doctor.artifacts.weights import WeightFile
from llava_doctor.errors import DoctorError

# Vision config defaults of transformers (CLIPVisionConfig / SiglipVisionConfig): an old
# CLIPModel config.json may leave any of them out.
TOWER_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512,
                          "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3,
                          "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5, "attention_dropout": 0.0},
    "siglip_vision_model": {"hidden_size": 768, "intermediate_size": 3072,
                            "num_hidden_layers": 12, "num_attention_heads": 12,
                            "num_channels": 3, "image_size": 224, "patch_size": 16,
                            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                            "attention_dropout": 0.0},
}
# A full two-tower model_type -> its vision tower's.
_FAMILY = {"clip": "clip_vision_model", "clip_vision_model": "clip_vision_model",
           "siglip": "siglip_vision_model", "siglip_vision_model": "siglip_vision_model"}
_NOT_VISION = frozenset({"architectures", "_name_or_path", "transformers_version", "torch_dtype",
                         "dtype", "vision_config_dict", "_attn_implementation_autoset"})
PROJECTOR_TYPE = "mlp2x_gelu"
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
LLAVA_NEXT_MERGE = "spatial_unpad"

TOWER_WAYS = ("pass --vision-tower CLIP_DIR, make config.json's mm_vision_tower a local "
              "directory, or put '{id}' into the local Hugging Face cache "
              "(`huggingface-cli download {id}`)")


@dataclass(frozen=True)
class TowerResolution:
    """Where the vision tower directory was found (or why it was not)."""

    path: Path | None
    source: str  # "--vision-tower" | "mm_vision_tower" | "hf-cache" | "none"
    note: str = ""


@dataclass(frozen=True)
class Tower:
    """A CLIP/SigLIP checkpoint directory as a llava-hf vision tower."""

    path: Path
    model_type: str                 # "clip_vision_model" | "siglip_vision_model" | other
    vision_config: dict[str, Any]   # llava-hf's `vision_config` (defaults filled in)
    weights: ModelDir | None
    tensors: dict[str, tuple[WeightFile, TensorInfo]] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return self.model_type in TOWER_DEFAULTS

    @property
    def has_cls(self) -> bool:
        """CLIP prepends a CLS token to the patch features; SigLIP has none."""
        return self.model_type == "clip_vision_model"

    def _int(self, key: str) -> int:
        v = self.vision_config.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    @property
    def hidden_size(self) -> int:
        return self._int("hidden_size")

    @property
    def image_size(self) -> int:
        return self._int("image_size")

    @property
    def patch_size(self) -> int:
        return self._int("patch_size")

    @property
    def layers(self) -> int:
        return self._int("num_hidden_layers")

    @property
    def patches(self) -> int:
        """Patch features per image: ``(image_size / patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2 if self.patch_size else 0


def resolve_tower(given: Path | None, mm_vision_tower: object, relative_to: Path,
                  ) -> TowerResolution:
    """The vision tower directory, found the three ways the CLI documents, offline."""
    if given is not None:
        if given.is_dir():
            return TowerResolution(given, "--vision-tower")
        return TowerResolution(None, "none", f"--vision-tower {given} is not a directory")
    if not isinstance(mm_vision_tower, str) or not mm_vision_tower:
        return TowerResolution(None, "none", "config.json names no mm_vision_tower")
    p = Path(mm_vision_tower).expanduser()
    if not p.is_absolute() and (relative_to / p).is_dir():
        p = relative_to / p
    if p.is_dir():
        return TowerResolution(p, "mm_vision_tower")
    from llava_doctor.checks.context import _hf_cache_lookup

    cached = _hf_cache_lookup(mm_vision_tower)
    if cached is not None:
        return TowerResolution(cached, "hf-cache",
                               f"{mm_vision_tower} from the local Hugging Face cache")
    return TowerResolution(None, "none", f"mm_vision_tower '{mm_vision_tower}' is neither a "
                           "local directory nor in the local Hugging Face cache")


def read_tower(path: Path) -> Tower:
    """The tower's config and weight headers. Raises DoctorError for unreadable files."""
    from llava_doctor.merge.hf_keys import tower_to_canonical

    cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    raw_type = str(cfg.get("model_type") or "")
    model_type = _FAMILY.get(raw_type, raw_type or "unknown")
    vc = cfg.get("vision_config") if raw_type in ("clip", "siglip") else cfg
    vision = {k: v for k, v in (vc or {}).items() if k not in _NOT_VISION}
    vision = {**TOWER_DEFAULTS.get(model_type, {}), **vision, "model_type": model_type}
    md = ModelDir.find(path)
    tensors: dict[str, tuple[WeightFile, TensorInfo]] = {}
    if md is not None:
        for p in md.problems:
            raise p.error or DoctorError(p.detail, path=p.path,
                                         hint="copy or download the complete vision tower")
        for name, hit in md.tensors.items():
            canon = tower_to_canonical(name)
            if canon is not None:
                tensors[canon] = hit
    return Tower(path=path, model_type=model_type, vision_config=vision, weights=md,
                 tensors=tensors)


@dataclass(frozen=True)
class Problem:
    """One reason the model cannot be written as llava-hf (an LD8xx finding)."""

    code: str
    message: str
    path: Path | None = None
    hint: str = ""


def is_next(cfg: Mapping[str, Any]) -> bool:
    """A LLaVA-NeXT (anyres / unpad) run: it maps onto LlavaNextForConditionalGeneration."""
    return ("anyres" in str(cfg.get("image_aspect_ratio") or "")
            or "unpad" in str(cfg.get("mm_patch_merge_type") or ""))


def conversion_problems(cfg: Mapping[str, Any], cfg_path: Path,
                        shapes: Mapping[str, tuple[int, ...]], tokenizer_dir: Path | None,
                        resolution: TowerResolution, tower: Tower | DoctorError | None,
                        ) -> list[Problem]:
    """Everything about this model that has no llava-hf equivalent (codes LD801-LD809).

    ``shapes``: the original-LLaVA tensor names the output would be made of (after a merge:
    the base's plus the non-LoRA trainables') and their shapes.
    """
    out: list[Problem] = []
    ptype = cfg.get("mm_projector_type") or "linear"
    if ptype != PROJECTOR_TYPE:
        out.append(Problem("LD801", f"mm_projector_type is '{ptype}'; llava-hf's "
                           "multi_modal_projector is linear -> GELU -> linear, which only "
                           f"'{PROJECTOR_TYPE}' maps onto", cfg_path,
                           "serve this model with LLaVA's own code; it has no llava-hf form"))
    if isinstance(tower, DoctorError):
        out.append(Problem("LD803", f"the vision tower cannot be read: {tower.message}",
                           Path(tower.path) if tower.path else resolution.path, tower.hint))
        tower = None
    if resolution.path is None:
        out.append(Problem("LD802", f"no vision tower: {resolution.note}", cfg_path,
                           TOWER_WAYS.format(id=cfg.get("mm_vision_tower") or "<CLIP id>")))
    elif tower is not None and not tower.supported:
        out.append(Problem("LD803", f"the vision tower is a '{tower.model_type}' model, not "
                           "CLIP or SigLIP", tower.path / "config.json",
                           "pass the CLIP checkpoint the run was trained with (--vision-tower)"))
    elif tower is not None and not tower.tensors and not any(
            n.startswith("model.vision_tower.vision_tower.") for n in shapes):
        out.append(Problem("LD803", "the vision tower directory holds no vision_model weights",
                           tower.path, "pass a CLIP checkpoint with its weights "
                                       "(model.safetensors or pytorch_model.bin)"))
    if tower is not None and tower.supported:
        mm_hidden = cfg.get("mm_hidden_size")
        lin1 = shapes.get("model.mm_projector.0.weight")
        widths = {"mm_hidden_size": mm_hidden,
                  "model.mm_projector.0.weight's input": lin1[1] if lin1 and len(lin1) == 2
                  else None}
        for what, width in widths.items():
            if isinstance(width, int) and width != tower.hidden_size:
                out.append(Problem("LD804", f"the vision tower's hidden_size is "
                                   f"{tower.hidden_size} but {what} is {width}",
                                   tower.path / "config.json",
                                   "pass the vision tower the run was trained with "
                                   "(--vision-tower)"))
                break
        if tower.patch_size <= 0 or tower.image_size % max(1, tower.patch_size):
            out.append(Problem("LD803", f"the vision tower's image_size {tower.image_size} is "
                               f"not a multiple of its patch_size {tower.patch_size}",
                               tower.path / "config.json", "check the tower's config.json"))
        layer = cfg.get("mm_vision_select_layer", -1)
        if not isinstance(layer, int) or not -tower.layers - 1 <= layer <= tower.layers:
            out.append(Problem("LD807", f"mm_vision_select_layer {layer!r} does not name a "
                               f"hidden state of the {tower.layers}-layer vision tower",
                               cfg_path, "pass the vision tower the run was trained with"))
        out += _tower_weights(shapes, tower)
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        out.append(Problem("LD807", f"mm_vision_select_feature '{feature}' has no "
                           "vision_feature_select_strategy (only 'patch' -> default and "
                           "'cls_patch' -> full do)", cfg_path,
                           "serve this model with LLaVA's own code"))
    merge_type = str(cfg.get("mm_patch_merge_type") or "flat")
    aspect = str(cfg.get("image_aspect_ratio") or "square")
    if is_next(cfg):
        if merge_type != LLAVA_NEXT_MERGE or aspect != "anyres":
            out.append(Problem("LD807", f"mm_patch_merge_type '{merge_type}' with "
                               f"image_aspect_ratio '{aspect}': LlavaNext only implements "
                               "'anyres' with 'spatial_unpad'", cfg_path,
                               "serve this model with LLaVA's own code"))
        if not cfg.get("image_grid_pinpoints"):
            out.append(Problem("LD807", "an anyres run without image_grid_pinpoints", cfg_path,
                               "restore config.json from the training output"))
        if "model.image_newline" not in shapes:
            out.append(Problem("LD808", "an unpad run without model.image_newline: LlavaNext "
                               "needs the trained newline embedding", cfg_path,
                               "merge with the non_lora_trainables.bin that holds it"))
    elif merge_type != "flat":
        out.append(Problem("LD807", f"mm_patch_merge_type '{merge_type}' has no llava-hf "
                           "equivalent", cfg_path, "serve this model with LLaVA's own code"))
    if cfg.get("mm_use_im_start_end"):
        out.append(Problem("LD805", "mm_use_im_start_end is true: the model was trained with "
                           "<im_start>/<im_end> around the image, which llava-hf's processor "
                           "never inserts", cfg_path, "serve this model with LLaVA's own code"))
    unknown = sorted(n for n in shapes if _unmapped(n))
    if unknown:
        out.append(Problem("LD807", f"tensor '{unknown[0]}'"
                           + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                           + " has no place in the llava-hf layout", cfg_path,
                           "serve this model with LLaVA's own code (a resampler or another "
                           "projector has no llava-hf form)"))
    out += _vocab(shapes, tokenizer_dir)
    return out


def _unmapped(name: str) -> bool:
    from llava_doctor.merge.hf_keys import to_canonical

    if name.endswith(".rotary_emb.inv_freq") or name.startswith("model.mm_projector."):
        return False  # dropped / covered by LD801
    return to_canonical(name) is None


def _tower_weights(shapes: Mapping[str, tuple[int, ...]], tower: Tower) -> list[Problem]:
    """LD809: a tower saved inside the checkpoint must match the tower config tensor by tensor."""
    from llava_doctor.merge.hf_keys import to_canonical

    inside = {str(to_canonical(n)): s for n, s in shapes.items()
              if n.startswith("model.vision_tower.vision_tower.vision_model.")}
    if not inside:
        return []
    want = {n: info.shape for n, (_, info) in tower.tensors.items()}
    if not want:
        return []
    missing = sorted(set(want) - set(inside))
    bad = sorted(n for n in inside if n in want and want[n] != inside[n])
    extra = sorted(n for n in inside if n not in want)
    if not (missing or bad or extra):
        return []
    if missing:
        first = f"lacks '{missing[0]}'"
    elif bad:
        first = (f"has '{bad[0]}' of shape {list(inside[bad[0]])} where the tower has "
                 f"{list(want[bad[0]])}")
    else:
        first = f"has '{extra[0]}', which the tower lacks"
    return [Problem("LD809", f"the vision tower saved in the checkpoint does not match "
                    f"{tower.path}: it {first}", tower.path,
                    "pass the CLIP checkpoint the run was trained with (--vision-tower)")]


def _vocab(shapes: Mapping[str, tuple[int, ...]], tokenizer_dir: Path | None) -> list[Problem]:
    """LD806: `<image>` and `<pad>` get the ids after the tokenizer's last, which must also be
    the first rows after the embeddings (the conversion script's assumption)."""
    emb = shapes.get("model.embed_tokens.weight")
    rows = emb[0] if emb else None
    if tokenizer_dir is None:
        return []
    n = tokenizer_length(tokenizer_dir)
    if n is None:
        return [Problem("LD806", "no readable tokenizer (tokenizer.model or tokenizer.json), so "
                        "the ids of <image> and <pad> cannot be chosen", tokenizer_dir,
                        "copy the tokenizer files of the base into this directory")]
    if rows is not None and n != rows:
        return [Problem("LD806", f"the tokenizer has {n} tokens but the embeddings have {rows} "
                        "rows; <image> would get an id that is no row of its own", tokenizer_dir,
                        "save the tokenizer the model was trained with next to its weights")]
    return []
