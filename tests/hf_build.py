"""Build llava-hf artifacts with the real libraries, under whichever transformers/peft runs it.

Run as a script (`python tests/hf_build.py JOBS.json`) by the tests, in this venv (transformers
5.x) or in the transformers-4.46.3 venv (LLAVA_DOCTOR_HF446_PYTHON), so that every file is
written by the version under test. JOBS.json is a list of jobs; each is a dict with an "op":

- ``base``: a tiny Llava / LlavaNext (tiny Llama text_config, tiny CLIP vision_config), seeded,
  ``save_pretrained`` into "out"; processor/tokenizer files copied from "proc" if given.
- ``processor``: tokenizer (the shipped 128-piece sentencepiece model + `<image>`, `<pad>`) and
  Llava/LlavaNext processors with a chat template, ``save_pretrained`` (needs PIL: 4.46 venv).
- ``adapter``: ``get_peft_model(base, LoraConfig(**lora))``, LoRA weights (and
  ``modules_to_save`` copies, DoRA magnitudes) perturbed as if trained, ``save_pretrained``.
- ``logits``: the base (+ the adapter through ``PeftModel.from_pretrained``, unmerged) or a merged
  dir on a fixed image + text input; writes {"logits": tensor} and the loading info.
- ``peft_merge``: ``PeftModel.from_pretrained(...).merge_and_unload().save_pretrained(out)``.

Writes a JSON result list to JOBS.json + ".out" (errors are recorded per job, not raised).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import traceback
from pathlib import Path

IMAGE_TOKEN = 128
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _configs(arch: str, **over):
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(vocab_size=192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=129)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=28, patch_size=14,
                              projection_dim=16)
    kw = dict(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
              image_seq_length=4)
    kw.update(over)
    if arch == "llava_next":
        from transformers import LlavaNextConfig

        return LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **kw)
    if arch == "llava_onevision":
        from transformers import LlavaOnevisionConfig

        # "default" drops CLIP's CLS feature, so the 2x2 feature grid matches the tiny tower.
        return LlavaOnevisionConfig(image_grid_pinpoints=PINPOINTS,
                                    vision_feature_select_strategy="default", **kw)
    from transformers import LlavaConfig

    return LlavaConfig(**kw)


def _cls(arch: str):
    if arch == "llava_next":
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration
    if arch == "llava_onevision":
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def op_base(job: dict) -> dict:
    import torch

    torch.manual_seed(job.get("seed", 0))
    model = _cls(job["arch"])(_configs(job["arch"], **job.get("config", {})))
    with torch.no_grad():
        # transformers initialises image_newline to zeros-ish; give every tensor real values.
        for p in model.parameters():
            if p.dim() == 1 and float(p.abs().max()) == 0.0:
                p.normal_(0, 0.02)
    model.save_pretrained(job["out"])
    if job.get("proc"):
        for f in Path(job["proc"]).iterdir():
            shutil.copyfile(f, Path(job["out"]) / f.name)
    return {}


def op_processor(job: dict) -> dict:
    from transformers import (
        CLIPImageProcessor,
        LlamaTokenizer,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tok = LlamaTokenizer(vocab_file=job["tokenizer_model"])
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}\n{% endfor %}")
    size = {"shortest_edge": 28}
    crop = {"height": 28, "width": 28}
    if job["arch"] == "llava_next":
        ip = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=PINPOINTS)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default",
                                  chat_template=template)
    else:
        ip = CLIPImageProcessor(size=size, crop_size=crop)
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", chat_template=template)
    proc.save_pretrained(job["out"])
    return {"tokens": len(tok)}


def _perturb(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def op_adapter(job: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(job.get("seed", 1))
    base = _cls(job["arch"]).from_pretrained(job["base"])
    pm = get_peft_model(base, LoraConfig(**job["lora"]))
    _perturb(pm, job.get("seed", 1))
    pm.save_pretrained(job["out"])
    for f in job.get("copy", []):
        shutil.copyfile(f, Path(job["out"]) / Path(f).name)
    return {}


def _inputs(model, arch: str):
    import torch

    g = torch.Generator().manual_seed(123)
    if arch in ("llava_next", "llava_onevision"):
        if arch == "llava_next":
            from transformers.models.llava_next.modeling_llava_next import (
                image_size_to_num_patches,
            )
        else:
            from transformers.models.llava_onevision.modeling_llava_onevision import (
                image_size_to_num_patches,
            )

        sizes = [[56, 28]]
        n = image_size_to_num_patches(sizes[0], PINPOINTS, 28)
        pixels = torch.randn((1, n, 3, 28, 28), generator=g)
        extra = {"image_sizes": torch.tensor(sizes)}
    else:
        pixels = torch.randn((1, 3, 28, 28), generator=g)
        extra = {}
    text = [5, 17, 42, 99, 3]
    count = 4
    for _ in range(2):  # the feature count of an anyres image: ask the model
        ids = torch.tensor([[1] + [IMAGE_TOKEN] * count + text])
        try:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            pixel_values=pixels, **extra)
            return out.logits
        except ValueError as e:
            m = re.search(r"tokens:? (\d+), features:? (\d+)", str(e))
            if m is None:
                raise
            count = int(m.group(2))
    raise RuntimeError("could not match the image token count")


def op_logits(job: dict) -> dict:
    import torch

    cls = _cls(job["arch"])
    model, info = cls.from_pretrained(job["model"], output_loading_info=True)
    if job.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job["adapter"])
    model.eval()
    logits = _inputs(model, job["arch"])
    torch.save({"logits": logits.detach().float()}, job["out"])
    return {"loading_info": {k: sorted(str(x) for x in v) for k, v in info.items()}}


def op_peft_merge(job: dict) -> dict:
    from peft import PeftModel

    model = _cls(job["arch"]).from_pretrained(job["model"])
    merged = PeftModel.from_pretrained(model, job["adapter"]).merge_and_unload()
    merged.save_pretrained(job["out"])
    return {}


OPS = {"base": op_base, "processor": op_processor, "adapter": op_adapter, "logits": op_logits,
       "peft_merge": op_peft_merge}


def main(path: str) -> int:
    import warnings

    warnings.simplefilter("ignore")
    jobs = json.loads(Path(path).read_text())
    results = []
    for job in jobs:
        try:
            results.append({"ok": True, **OPS[job["op"]](job)})
        except Exception as e:  # recorded: a test may expect peft/transformers to fail
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()})
    Path(path + ".out").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
