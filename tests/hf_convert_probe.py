"""Run in a child interpreter (transformers 5.x here, 4.46 in the cross-version venv): load a
converted llava-hf checkpoint with transformers and compare it with LLaVA's own computation of
the original checkpoint, written here from the reference notes (llava-layout.md), not from
LLaVA's code:

    features = CLIP(pixels).hidden_states[mm_vision_select_layer][:, 1:]   (CLS dropped)
    features = mm_projector.2(gelu(mm_projector.0(features)))
    embeds   = embed(ids before <image>) ++ features ++ embed(ids after)
    logits   = LLaMA(inputs_embeds=embeds)

Usage: python hf_convert_probe.py ORIGINAL CLIP CONVERTED INPUTS.pt RESULT.json [llava|next]
Only torch, safetensors and transformers are imported (no llava_doctor).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file


def _load(cls, path, **kw):  # type: ignore[no-untyped-def]
    try:
        return cls.from_pretrained(path, dtype=torch.float32, **kw)
    except TypeError:
        return cls.from_pretrained(path, torch_dtype=torch.float32, **kw)


def original_state(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return {k: v.float() for k, v in state.items()}


def state_dtype(path: Path) -> torch.dtype:
    f = sorted(path.glob("*.safetensors"))[0]
    return next(iter(load_file(str(f)).values())).dtype


def best_resolution(width: int, height: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """LLaVA's anyres choice: the pinpoint (read as width, height) that keeps the most of the
    image at its downscaled size, then wastes the fewest pixels."""
    best, best_fit, best_waste = (0, 0), -1, float("inf")
    for w, h in pinpoints:
        scale = min(w / width, h / height)
        fit = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - fit
        if fit > best_fit or (fit == best_fit and waste < best_waste):
            best, best_fit, best_waste = (w, h), fit, waste
    return best


def anyres_unpad(feats: torch.Tensor, image_hw: tuple[int, int], cfg: dict, size: int,
                 patch: int, newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT's 'spatial_unpad' merge of projected crop features [crops, side*side, C]:
    the base crop's features, then the grid of the other crops laid out as one feature map,
    cropped back to the image's aspect ratio, with `image_newline` after each row."""
    side = size // patch
    height, width = image_hw
    best_w, best_h = best_resolution(width, height, cfg["image_grid_pinpoints"])
    cols, rows = best_w // size, best_h // size
    base, grid = feats[0], feats[1:]
    c = grid.shape[-1]
    fmap = grid.view(rows, cols, side, side, c).permute(4, 0, 2, 1, 3)
    fmap = fmap.reshape(c, rows * side, cols * side)
    cur_h, cur_w = fmap.shape[1:]
    if width / height > cur_w / cur_h:  # wider than the map: rows of padding top and bottom
        new_h = int(height * cur_w / width)
        pad = (cur_h - new_h) // 2
        fmap = fmap[:, pad:cur_h - pad, :]
    else:
        new_w = int(width * cur_h / height)
        pad = (cur_w - new_w) // 2
        fmap = fmap[:, :, pad:cur_w - pad]
    fmap = torch.cat([fmap, newline[:, None, None].expand(c, fmap.shape[1], 1)], dim=-1)
    return torch.cat([base, fmap.flatten(1, 2).transpose(0, 1)], dim=0)


def reference_logits(orig: Path, clip: Path, pixels: torch.Tensor, before: list[int],
                     after: list[int], image_hw: tuple[int, int] | None = None,
                     ) -> tuple[torch.Tensor, int]:
    """LLaVA's forward pass on the original checkpoint, from its definition (LLaVA-1.5; with
    ``image_hw``, LLaVA-NeXT's anyres + spatial_unpad)."""
    cfg = json.loads((orig / "config.json").read_text())
    state = original_state(orig)
    # The tower from its files (a CLIP saved by transformers 5 has no `vision_model.` prefix,
    # which 4.46's from_pretrained would silently ignore).
    vcfg = transformers.CLIPVisionConfig.from_pretrained(str(clip))
    vcfg._attn_implementation = "eager"
    tower = transformers.CLIPVisionModel(vcfg).float().eval()
    raw = load_file(str(clip / "model.safetensors"))
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) \
        else ""

    def norm(key: str) -> str:
        return prefix + key.removeprefix("vision_model.")

    # LLaVA's builder runs the tower in the checkpoint's dtype (float16 for these fixtures).
    dtype = state_dtype(orig)
    tower_state = {norm(k): v.to(dtype).float() for k, v in raw.items()}
    inside = {norm(k[len("model.vision_tower.vision_tower."):]): v for k, v in state.items()
              if k.startswith("model.vision_tower.vision_tower.")}
    tower_state.update(inside)  # LLaVA's merged outputs carry the tower: those weights are used
    missing, unexpected = tower.load_state_dict(tower_state, strict=False)
    assert not [m for m in missing if "position_ids" not in m] and not unexpected, missing
    llm_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items()
                                          if not k.startswith("mm_") and k != "architectures"})
    llm_cfg._attn_implementation = "eager"
    llm = transformers.LlamaForCausalLM(llm_cfg).float().eval()
    own = {k: v for k, v in state.items() if not k.startswith("model.mm_projector.")
           and not k.startswith("model.vision_tower.") and k != "model.image_newline"}
    missing, unexpected = llm.load_state_dict(own, strict=False)
    assert not [m for m in missing if "rotary" not in m] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        crops = pixels if image_hw is None else pixels[0]  # NeXT: [1, crops, 3, H, W]
        hidden = tower(pixel_values=crops, output_hidden_states=True).hidden_states
        feats = hidden[cfg["mm_vision_select_layer"]]
        if cfg.get("mm_vision_select_feature", "patch") == "patch":
            feats = feats[:, 1:]
        w0, b0 = state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"]
        w2, b2 = state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"]
        feats = torch.nn.functional.linear(
            torch.nn.functional.gelu(torch.nn.functional.linear(feats, w0, b0)), w2, b2)
        if image_hw is not None:
            feats = anyres_unpad(feats, image_hw, cfg, vcfg.image_size, vcfg.patch_size,
                                 state["model.image_newline"])[None]
        emb = llm.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor([before])), feats, emb(torch.tensor([after]))], 1)
        logits = llm(inputs_embeds=embeds).logits
    return logits, feats.shape[1]


def main() -> None:
    orig, clip, conv, inputs, result = map(Path, sys.argv[1:6])
    kind = sys.argv[6] if len(sys.argv) > 6 else "llava"
    data = torch.load(inputs)
    cfg = json.loads((conv / "config.json").read_text())
    cls = (transformers.LlavaNextForConditionalGeneration if kind == "next"
           else transformers.LlavaForConditionalGeneration)
    model, info = _load(cls, str(conv), output_loading_info=True, attn_implementation="eager")
    model.eval()
    out: dict[str, object] = {
        "transformers": transformers.__version__,
        "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
        "class": type(model).__name__,
    }
    tok = transformers.AutoTokenizer.from_pretrained(str(conv))
    out["image_token_id"] = tok.convert_tokens_to_ids("<image>")
    out["pad_token_id"] = tok.pad_token_id
    out["len_tokenizer"] = len(tok)
    out["chat"] = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False, add_generation_prompt=True)
    before, after = data["before"], data["after"]
    if kind == "load":  # loading only (no LLaVA reference for this tower)
        Path(result).write_text(json.dumps(out, indent=1))
        return
    if kind == "next":
        # a 30x50 (height x width) image: the 30x60 pinpoint, a base crop and 2 grid crops
        pixels, image_hw = data["crops"], (30, 50)
        extra = {"image_sizes": torch.tensor([list(image_hw)])}
    else:
        pixels, image_hw, extra = data["pixels"], None, {}
    ref, n = reference_logits(orig, clip, pixels, before, after, image_hw)
    ids = torch.tensor([before + [cfg["image_token_index"]] * n + after])
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels, **extra).logits
    vocab = ref.shape[-1]
    out["features"] = n
    out["max_abs_diff"] = float((got[..., :vocab] - ref).abs().max())
    out["ref_scale"] = float(ref.abs().max())
    try:
        from PIL import Image  # the image processors need it; not every venv has it
    except ImportError:
        out["processor"] = "no PIL in this environment"
    else:
        proc = transformers.AutoProcessor.from_pretrained(str(conv))
        size = cfg["vision_config"]["image_size"]
        image = Image.fromarray((data["image"].numpy()).astype("uint8"))
        prompt = "USER: <image>\nWhat is this? ASSISTANT:"
        enc = proc(images=image, text=prompt, return_tensors="pt")
        out["processor"] = type(proc).__name__
        out["image_tokens"] = int((enc["input_ids"] == cfg["image_token_index"]).sum())
        out["image_size"] = size
        with torch.no_grad():
            if kind == "next":
                feats = model.get_image_features(
                    enc["pixel_values"], enc["image_sizes"],
                    vision_feature_layer=cfg["vision_feature_layer"],
                    vision_feature_select_strategy=cfg["vision_feature_select_strategy"])
                feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
                packed = model.pack_image_features(
                    feats, enc["image_sizes"], cfg["vision_feature_select_strategy"],
                    image_newline=model.image_newline if hasattr(model, "image_newline")
                    else model.model.image_newline)
                out["model_features"] = int(packed[0].shape[0])
            else:
                model(**enc)  # raises when tokens and features disagree
                out["model_features"] = out["image_tokens"]
    Path(result).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
