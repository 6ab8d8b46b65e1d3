"""LD7xx: llava-hf runs (peft adapters on transformers' Llava / LlavaNext / LlavaOnevision).

Headers and configs only. The key layouts come from `artifacts.hf_layout`; the target
transformers is `--transformers-version`, else the installed one (`Options.transformers_version`).
Also here: the llava-hf implementations of LD403 and LD407 (same question, other files).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llava_doctor.artifacts import hf_layout
from llava_doctor.artifacts.configs import read_json, tokenizer_length
from llava_doctor.artifacts.discovery import Family
from llava_doctor.artifacts.hf_layout import Fate, Layout, Part
from llava_doctor.artifacts.peft_match import PEFT_PREFIX, parse_adapter_keys
from llava_doctor.checks.base import HF, Hit, Skip, check, variant
from llava_doctor.checks.context import Context
from llava_doctor.errors import DoctorError
from llava_doctor.models import FixSafety, Severity

PREPROCESSOR = "preprocessor_config.json"
PROCESSOR = "processor_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
NO_BASE = "no base model resolved (LD401 says how to pass --base)"
_SHOW = 20
_LAYOUT_TEXT = {
    Layout.canonical: "the canonical on-disk layout (transformers < 4.52 names)",
    Layout.runtime_4: "the transformers >= 4.52 runtime layout (`model.language_model.*`)",
    Layout.runtime_5: "the transformers 5 runtime layout (`model.vision_tower.*` without "
                      "`vision_model.`)",
    Layout.saved_5: "the layout transformers 5 saves (`vision_tower.*` without "
                    "`vision_model.`)",
}
_READERS = {Layout.canonical: "every transformers version (4.36 ... 5.x) and vLLM",
            Layout.runtime_4: "transformers >= 4.52 only",
            Layout.runtime_5: "transformers >= 5 only",
            Layout.saved_5: "transformers >= 5 only (4.x loads a randomly initialised vision "
                            "tower, with only a warning)"}


def target_version(ctx: Context) -> str | None:
    """The transformers version to check against (None: unknown or not a version)."""
    v = ctx.options.transformers_version
    if not v:
        return None
    try:
        hf_layout.parse_version(v)
    except ValueError:
        return None
    return v


def base_dir(ctx: Context) -> Path | None:
    p = ctx.base_path
    return p if p is not None and p.is_dir() else None


def pick(ctx: Context, name: str) -> Path | None:
    """A file from the adapter dir when training saved it there, else from the base: the one
    the merge carries over (and a loader of the merged model reads)."""
    if ctx.file(name) is not None:
        return ctx.path / name
    b = base_dir(ctx)
    if b is not None and (b / name).is_file():
        return b / name
    return None


def read(ctx: Context, path: Path | None) -> dict[str, Any] | None:
    return ctx._read(path, read_json) if path is not None else None


def base_hf_config(ctx: Context) -> dict[str, Any]:
    """The llava-hf base's config.json, or Skip."""
    if base_dir(ctx) is None:
        raise Skip(NO_BASE)
    cfg = ctx.base_config
    if cfg is None:
        raise Skip("the base has no readable config.json (LD401/LD501 report it)")
    raw = cfg.raw()
    if ctx.base_family != Family.llava_hf:
        raise Skip("the base is not a llava-hf model (LD407 reports it)")
    return raw


def base_config_path(ctx: Context) -> Path:
    b = base_dir(ctx)
    if b is None:
        raise Skip(NO_BASE)
    return b / "config.json"


def base_layout(ctx: Context) -> Layout | None:
    base = ctx.base
    if base is None:
        return None
    return hf_layout.detect_layout(set(base.tensor_names) | set(base.tensors))


def embedding_rows(ctx: Context) -> tuple[int, str] | None:
    """Rows of the embedding matrix the merged model will have, and where that number is from:
    the adapter's full `embed_tokens` copy (modules_to_save / save_embedding_layers) if any,
    else the base's."""
    canon = hf_layout.TABLE[Layout.canonical][Part.language_model] + ".embed_tokens"
    ad = ctx.adapter
    if ad is not None:
        lay = hf_layout.detect_adapter_layout(ad.tensors) or Layout.canonical
        for mod in parse_adapter_keys(ad.tensors).modules.values():
            if hf_layout.to_canonical(mod.name, lay) == canon and mod.weight is not None:
                shape = ad.tensors[mod.weight].shape
                if len(shape) == 2 and shape[0] > 0:
                    return shape[0], f"{ad.path} ('{mod.weight}')"
    base = ctx.base
    blay = base_layout(ctx)
    if base is None or blay is None:
        return None
    name = hf_layout.to_layout(canon + ".weight", blay)
    info = base.info(name)
    if info is None or len(info.shape) != 2:
        return None
    return info.shape[0], f"the base's '{name}'"


def _json(v: Any) -> str:
    return json.dumps(v)


# --- LD701 -----------------------------------------------------------------------------------

def _adapter_fates(ctx: Context, version: str) -> tuple[Layout | None, dict[Fate, list[str]]]:
    ad = ctx.adapter
    if ad is None:
        return None, {}
    lay = hf_layout.detect_adapter_layout(ad.tensors)
    if lay is None:
        return None, {}
    out: dict[Fate, list[str]] = {}
    for mod in parse_adapter_keys(ad.tensors).modules.values():
        for key in mod.keys():
            full = key in (mod.weight, mod.bias)
            fate = hf_layout.adapter_fate(mod.name, lay, version, full=full)
            if fate != Fate.applied:
                out.setdefault(fate, []).append(key)
    return lay, out


def renamed_adapter_keys(keys: Iterable[str], version: str) -> dict[str, str]:
    """Adapter key -> its name in the layout transformers ``version`` runs (changed keys only).
    Shared by LD701 and its fix."""
    keys = list(keys)
    lay = hf_layout.detect_adapter_layout(keys)
    runs = hf_layout.runtime_layout(version)
    if lay is None or runs is None:
        return {}
    out = {}
    for k in keys:
        if not k.startswith(PEFT_PREFIX):
            continue
        new = PEFT_PREFIX + hf_layout.convert(k[len(PEFT_PREFIX):], lay, runs)
        if new != k:
            out[k] = new
    return out


@check("LD701", "hf-key-layout", Severity.error, fix=FixSafety.safe, families=HF)
def hf_key_layout(ctx: Context) -> Iterable[Hit]:
    """Adapter or checkpoint keys in a layout the target transformers does not read.

    ## What it does
    Reads the layout of the adapter's keys (peft saves the module paths of the transformers that
    trained it: `language_model.model.*` before 4.52, `model.language_model.*` from 4.52,
    `model.vision_tower.*` without `vision_model.` from 5) and of the base checkpoint's keys
    (canonical `vision_tower.vision_model.*`, runtime `model.*`, or 5.x's `vision_tower.*`), and
    checks them against the target transformers (`--transformers-version`, else the installed
    one). Error when the target cannot read them; info when no target is known and the layout
    only some versions read.

    ## Why is this bad?
    Nothing converts newer adapter keys for an older transformers: they match no module and
    the LoRA is silently not applied. peft + transformers 5 convert the language-model and
    vision-tower keys of a pre-4.52 adapter but not the projector's: a `modules_to_save`
    projector crashes the load (`KeyError:
    'base_model.model.model.multi_modal_projector.linear_1.weight'`), and projector LoRA
    (`target_modules="all-linear"`) is silently not applied, so the merged model is wrong. A
    checkpoint saved by transformers 5 (`vision_tower.embeddings.*`) loads in 4.x with a
    randomly initialised vision tower, reported only as a warning.

    ## Example
    An adapter trained with TRL under transformers 4.46 with `modules_to_save=
    ["multi_modal_projector"]`, merged with peft under transformers 5.

    ## Fix
    Safe for the adapter: `llava-doctor fix --transformers-version V` renames its keys into the
    layout transformers V runs (exact: the tensors are unchanged; backed up as usual). The base
    is never modified: `llava-doctor merge` writes the canonical layout every version reads.
    """
    version = target_version(ctx)
    ad = ctx.adapter
    if version is not None:
        lay, fates = _adapter_fates(ctx, version)
        if fates and ad is not None and lay is not None:
            runs = hf_layout.runtime_layout(version)
            assert runs is not None
            crash, dropped = fates.get(Fate.crash, []), fates.get(Fate.dropped, [])
            parts = []
            if crash:
                first = PEFT_PREFIX + hf_layout.convert(crash[0][len(PEFT_PREFIX):], lay, runs)
                parts.append(f"{len(crash)} full tensor(s) (modules_to_save) that peft cannot "
                             f"place: loading fails with `KeyError: '{first}'` (e.g. "
                             f"'{crash[0]}')")
            if dropped:
                parts.append(f"{len(dropped)} tensor(s) that match no module of transformers "
                             f"{version}, so peft drops them and that LoRA is silently not "
                             f"applied (e.g. '{dropped[0]}')")
            yield Hit(f"{ad.path}: the keys are in {_LAYOUT_TEXT[lay]}, which transformers "
                      f"{version} (module names: {runs.value}) does not fully read: "
                      f"{'; '.join(parts)}. `llava-doctor fix --transformers-version {version}` "
                      f"renames the keys into the {runs.value} layout (safe), or merge with "
                      "`llava-doctor merge`, which reads every layout", path=ad.path,
                      evidence={"what": "adapter", "layout": lay.value, "target": version,
                                "target_layout": runs.value, "crash": crash[:_SHOW],
                                "dropped": dropped[:_SHOW],
                                "count": len(crash) + len(dropped)})
    elif ad is not None:
        lay = hf_layout.detect_adapter_layout(ad.tensors)
        if lay is not None:
            yield from _adapter_info(ad.path, lay, list(ad.tensors))
    blay = base_layout(ctx)
    b = base_dir(ctx)
    if blay is None or b is None or ctx.base_family != Family.llava_hf:
        return
    if version is not None:
        if hf_layout.checkpoint_readable(blay, version):
            return
        what = ("a randomly initialised vision tower (its `vision_tower.*` keys lack "
                "`vision_model.`), reported only as a warning" if blay == Layout.saved_5 else
                "every weight missing (runtime names it does not map)")
        yield Hit(f"{b}: the base checkpoint is in {_LAYOUT_TEXT[blay]}; transformers {version} "
                  f"loads it with {what}. The base is never modified: merge with `llava-doctor "
                  "merge`, which writes the canonical layout every version reads, or load it "
                  "with transformers >= 5", path=b, fix=FixSafety.none,
                  evidence={"what": "base", "layout": blay.value, "target": version})
    elif blay != Layout.canonical:
        yield Hit(f"{b}: the base checkpoint is in {_LAYOUT_TEXT[blay]}, which "
                  f"{_READERS[blay]} read(s); no target transformers is known (pass "
                  "--transformers-version). `llava-doctor merge` writes the canonical layout",
                  path=b, severity=Severity.info, fix=FixSafety.none,
                  evidence={"what": "base", "layout": blay.value, "target": None})


def _adapter_info(path: Path, lay: Layout, keys: list[str]) -> Iterable[Hit]:
    """No target known: say which versions read this adapter as it is."""
    mods = parse_adapter_keys(keys).modules.values()
    if lay == Layout.canonical:
        risky = [k for m in mods for k in m.keys()
                 if hf_layout.adapter_fate(m.name, lay, "5.0.0", full=k in (m.weight, m.bias))
                 != Fate.applied]
        if not risky:
            return
        yield Hit(f"{path}: the adapter was saved by transformers < 4.52 and holds "
                  f"{len(risky)} projector or modules_to_save tensor(s) (e.g. "
                  f"'{risky[0]}') that peft under transformers >= 5 does not map (it crashes "
                  "or silently skips them); no target transformers is known (pass "
                  "--transformers-version). `llava-doctor merge` reads it as it is",
                  path=path, severity=Severity.info, fix=FixSafety.none,
                  evidence={"what": "adapter", "layout": lay.value, "target": None,
                            "keys": risky[:_SHOW]})
        return
    yield Hit(f"{path}: the adapter keys are in {_LAYOUT_TEXT[lay]}, which {_READERS[lay]} "
              "read(s); no target transformers is known (pass --transformers-version to check "
              "it, and `llava-doctor fix --transformers-version V` renames them)", path=path,
              severity=Severity.info, fix=FixSafety.none,
              evidence={"what": "adapter", "layout": lay.value, "target": None})


# --- LD702 / LD703 ---------------------------------------------------------------------------

def _dirs(ctx: Context) -> list[Path]:
    b = base_dir(ctx)
    return [ctx.path] + ([b] if b is not None else [])


@check("LD702", "processor-missing", Severity.warning, families=HF)
def processor_missing(ctx: Context) -> Iterable[Hit]:
    """No `preprocessor_config.json` / `processor_config.json` in the adapter dir or the base.

    ## What it does
    Looks for the processor files in the adapter dir (where trainers often save them) and in
    the base, the two places the merged model's files come from. With a target transformers
    below 5, also wants the classic `preprocessor_config.json`: transformers 5 folds the
    image-processor settings into `processor_config.json`, which 4.x cannot build from.

    ## Why is this bad?
    The merged model loads, but `AutoProcessor.from_pretrained(merged)` fails, so it cannot be
    served or evaluated on images (LLaMA-Factory PR #3651, EasyR1 PR #48).

    ## Example
    A base downloaded with only `*.safetensors` and `config.json`.

    ## Fix
    None automatic (the tool never invents a processor): copy `preprocessor_config.json` and
    `processor_config.json` from the hub repository of the base (e.g. `llava-hf/llava-1.5-7b-hf`)
    into the base or the adapter dir.
    """
    dirs = _dirs(ctx)
    have = {n: [d for d in dirs if (d / n).is_file()] for n in (PREPROCESSOR, PROCESSOR)}
    if not any(have.values()):
        if base_dir(ctx) is None:
            raise Skip(NO_BASE)
        yield Hit(f"neither {ctx.path} nor the base {base_dir(ctx)} has {PREPROCESSOR} or "
                  f"{PROCESSOR}: the merged model gets no processor and "
                  "`AutoProcessor.from_pretrained` fails on it. Copy both files from the base's "
                  "hub repository (e.g. llava-hf/llava-1.5-7b-hf) into the base or the adapter "
                  "dir", path=base_dir(ctx), evidence={"looked_in": [str(d) for d in dirs]})
        return
    version = target_version(ctx)
    if version is not None and hf_layout.parse_version(version) < (5, 0, 0) \
            and not have[PREPROCESSOR]:
        src = have[PROCESSOR][0] / PROCESSOR
        yield Hit(f"{src} is the only processor file (transformers 5 writes the image-processor "
                  f"settings into it and no {PREPROCESSOR}); transformers {version} cannot build "
                  f"the image processor from it. Add the classic {PREPROCESSOR} (from the base's "
                  "hub repository)", path=src,
                  evidence={"target": version, "looked_in": [str(d) for d in dirs]})


def _has_template(path: Path) -> bool:
    if path.name in CHAT_TEMPLATE_FILES:
        return path.is_file()
    try:
        data = read_json(path)
    except DoctorError:
        return False
    return bool(data.get("chat_template"))


@check("LD703", "chat-template-missing", Severity.warning, families=HF)
def chat_template_missing(ctx: Context) -> Iterable[Hit]:
    """No chat template in the adapter dir or the base.

    ## What it does
    Looks for `chat_template.jinja`, the older `chat_template.json`, or a `chat_template` in
    `tokenizer_config.json` / `processor_config.json`, in the adapter dir and in the base.

    ## Why is this bad?
    `apply_chat_template` on the merged model fails, or chat inference silently uses no
    template (transformers #33459): the model answers in a format it was not trained on.

    ## Example
    A base whose tokenizer files were copied without `chat_template.json`.

    ## Fix
    None automatic: copy the chat template the adapter was trained with (the trainer's
    `tokenizer_config.json` or `chat_template.jinja`) into the adapter dir.
    """
    dirs = _dirs(ctx)
    names = (*CHAT_TEMPLATE_FILES, "tokenizer_config.json", PROCESSOR)
    if any(_has_template(d / n) for d in dirs for n in names if (d / n).is_file()):
        return
    if base_dir(ctx) is None:
        raise Skip(NO_BASE)
    yield Hit(f"no chat template in {ctx.path} or the base {base_dir(ctx)} (looked for "
              f"{', '.join(names[:2])} and a chat_template in tokenizer_config.json/"
              f"{PROCESSOR}): chat inference on the merged model uses no template. Copy the "
              "template the adapter was trained with into the adapter dir",
              path=ctx.path, evidence={"looked_in": [str(d) for d in dirs]})


# --- LD704 -----------------------------------------------------------------------------------

def _image_hw(pre: dict[str, Any] | None) -> tuple[int, int] | None:
    """The pixel size of one image (one tile for NeXT) the image processor produces."""
    if pre is None:
        return None
    for key in ("crop_size", "size"):
        v = pre.get(key)
        if isinstance(v, dict):
            if isinstance(v.get("height"), int) and isinstance(v.get("width"), int):
                return v["height"], v["width"]
            if isinstance(v.get("shortest_edge"), int) and key == "size":
                return v["shortest_edge"], v["shortest_edge"]
        if isinstance(v, int):
            return v, v
    return None


def _image_processor(ctx: Context) -> tuple[Path | None, dict[str, Any] | None]:
    """The image-processor settings: `preprocessor_config.json`, else the `image_processor`
    section transformers 5 writes into `processor_config.json`."""
    p = pick(ctx, PREPROCESSOR)
    if p is not None:
        return p, read(ctx, p)
    q = pick(ctx, PROCESSOR)
    data = read(ctx, q)
    sub = data.get("image_processor") if data else None
    return (q, sub) if isinstance(sub, dict) else (None, None)


def model_image_features(cfg: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """Features the vision tower produces per image (per tile), and the processor fields that
    make the processor agree: `(image_size/patch)^2`, plus CLIP's CLS token, minus one with the
    `default` strategy (which drops CLS). SigLIP towers have no CLS token."""
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict):
        return None
    size, patch = vc.get("image_size"), vc.get("patch_size")
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0:
        return None
    cls = 0 if "siglip" in str(vc.get("model_type", "")).lower() else 1
    strategy = cfg.get("vision_feature_select_strategy", "default")
    n = (size // patch) ** 2 + cls - (1 if strategy == "default" else 0)
    return n, {"patch_size": patch, "vision_feature_select_strategy": strategy,
               "num_additional_image_tokens": cls}


def image_token_count(ctx: Context) -> dict[str, Any] | None:
    """What the processor expands `<image>` into versus what the model produces (None: cannot
    tell). Shared by LD704 and its fix."""
    cfg = base_hf_config(ctx)
    model = model_image_features(cfg)
    proc_path = pick(ctx, PROCESSOR)
    proc = read(ctx, proc_path)
    pre_path, pre = _image_processor(ctx)
    hw = _image_hw(pre)
    if model is None or proc is None or hw is None:
        return None
    patch = proc.get("patch_size")
    strategy = proc.get("vision_feature_select_strategy")
    if not isinstance(patch, int) or patch <= 0 or strategy is None:
        return None  # legacy processing: the model expands the token itself
    nadd = proc.get("num_additional_image_tokens")
    version = target_version(ctx)
    if nadd is None:
        # transformers 4.46 added the CLS token implicitly; >= 4.47 reads a missing field as 0.
        old = version is not None and hf_layout.parse_version(version) < (4, 47, 0)
        nadd_used = 1 if old else 0
    else:
        nadd_used = int(nadd)
    tokens = (hw[0] // patch) * (hw[1] // patch) + nadd_used - (1 if strategy == "default" else 0)
    features, want = model
    return {"processor_config": str(proc_path), "image_processor": str(pre_path),
            "tokens": tokens, "features": features, "image_hw": list(hw),
            "patch_size": patch, "vision_feature_select_strategy": strategy,
            "num_additional_image_tokens": nadd, "expected": want, "target": version,
            "fixable": hw[0] // want["patch_size"] * (hw[1] // want["patch_size"])
            == (cfg["vision_config"]["image_size"] // want["patch_size"]) ** 2}


@check("LD704", "image-token-count", Severity.error, fix=FixSafety.safe, families=HF)
def image_token_count_mismatch(ctx: Context) -> Iterable[Hit]:
    """The processor expands `<image>` into another number of tokens than the model's features.

    ## What it does
    Computes the processor's expansion, `(H/patch_size)*(W/patch_size) +
    num_additional_image_tokens`, minus 1 with the `default` strategy (H, W from the image
    processor's crop size; a missing `num_additional_image_tokens` is 1 for transformers 4.46
    and 0 from 4.47), and the features of the base's vision tower, `(image_size/patch)^2` plus
    CLIP's CLS token, minus 1 with config.json's `default` strategy. Reads the adapter dir's
    processor files first, else the base's (what the merge carries over).

    ## Why is this bad?
    Generation fails with `Image features and image tokens do not match: tokens: 575, features
    576` (transformers #36002, unsloth #2225, LLaMA-Factory #8434), typically a processor saved
    by transformers 4.46 loaded by a newer one.

    ## Example
    `processor_config.json` without `num_additional_image_tokens` and a CLIP tower, under
    transformers >= 4.47: 575 tokens for 576 features.

    ## Fix
    Safe when the image size agrees: `llava-doctor fix` writes the adapter dir's
    `processor_config.json` with `patch_size`, `vision_feature_select_strategy` and
    `num_additional_image_tokens` taken from config.json's vision settings (the base is never
    modified). Otherwise none: use the base's own image processor.
    """
    facts = image_token_count(ctx)
    if facts is None:
        raise Skip("no processor_config.json with patch_size/strategy, image size or vision "
                   "config to compare (LD702)")
    if facts["tokens"] == facts["features"]:
        return
    path = Path(facts["processor_config"])
    fixable = facts["fixable"]
    want = facts["expected"]
    how = (f"`llava-doctor fix` writes {ctx.path / PROCESSOR} with "
           + ", ".join(f"{k}={_json(v)}" for k, v in want.items()) + " (safe)"
           if fixable else "the image processor's size does not fit the vision tower: use the "
                           "base's own preprocessor_config.json")
    nadd = facts["num_additional_image_tokens"]
    under = f" under transformers {facts['target']}" if facts["target"] else ""
    yield Hit(f"{path}: the processor expands each <image> into {facts['tokens']} tokens"
              f"{under} (patch_size {facts['patch_size']}, strategy "
              f"{facts['vision_feature_select_strategy']}, num_additional_image_tokens "
              f"{'missing' if nadd is None else nadd}, image {facts['image_hw'][0]}x"
              f"{facts['image_hw'][1]}) but the model produces {facts['features']} features: "
              f"generation fails with `Image features and image tokens do not match: tokens: "
              f"{facts['tokens']}, features {facts['features']}`. {how}", path=path,
              evidence=facts, fix=FixSafety.safe if fixable else FixSafety.none)


# --- LD705 -----------------------------------------------------------------------------------

def tokenizer_dir(ctx: Context) -> Path | None:
    """The tokenizer the merged model gets: the adapter dir's when training saved one there."""
    for d in _dirs(ctx):
        if any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            return d
    return None


def token_id(tok_dir: Path, token: str) -> int | None:
    """The id of an added token, from added_tokens.json, tokenizer_config.json's
    added_tokens_decoder or tokenizer.json's added_tokens (None: not an added token)."""
    for name in ("added_tokens.json", "tokenizer_config.json", "tokenizer.json"):
        p = tok_dir / name
        if not p.is_file():
            continue
        try:
            data = read_json(p)
        except DoctorError:
            continue
        if name == "added_tokens.json" and isinstance(data.get(token), int):
            return int(data[token])
        if name == "tokenizer_config.json":
            for k, v in (data.get("added_tokens_decoder") or {}).items():
                if isinstance(v, dict) and v.get("content") == token and str(k).isdigit():
                    return int(k)
        if name == "tokenizer.json":
            for t in data.get("added_tokens") or []:
                if isinstance(t, dict) and t.get("content") == token and isinstance(t.get("id"),
                                                                                      int):
                    return int(t["id"])
    return None


@check("LD705", "image-token-invalid", Severity.error, families=HF)
def image_token_invalid(ctx: Context) -> Iterable[Hit]:
    """`image_token_index` is not a row of the embeddings, or not the tokenizer's id of `<image>`.

    ## What it does
    Reads `image_token_index` (`image_token_id` in newer configs) from the base's config.json
    and checks it against the rows of the embedding matrix the merged model will have (the
    adapter's saved `embed_tokens` if any, else the base's) and against the id the tokenizer
    (the adapter dir's, else the base's) gives the processor's image token (`<image>`).

    ## Why is this bad?
    An index past the embeddings fails with `IndexError: index out of range in self`; an index
    that is not the tokenizer's `<image>` id means the image features replace ordinary text
    tokens, or never replace anything (`Image features and image tokens do not match`).

    ## Example
    A tokenizer re-saved after adding tokens in another order, so `<image>` became 32001 while
    config.json says 32000.

    ## Fix
    None automatic: use the tokenizer saved with the base (or training), or correct
    `image_token_index` to the tokenizer's id when the embeddings have that row.
    """
    cfg = base_hf_config(ctx)
    idx = cfg.get("image_token_index", cfg.get("image_token_id"))
    if not isinstance(idx, int):
        raise Skip("the base config.json has no image_token_index")
    cfg_path = base_config_path(ctx)
    rows = embedding_rows(ctx)
    if rows is not None and not 0 <= idx < rows[0]:
        yield Hit(f"{cfg_path}: image_token_index is {idx} but the embeddings the merged model "
                  f"gets have {rows[0]} rows ({rows[1]}): the forward pass fails with "
                  "`IndexError: index out of range in self`. Use the base and tokenizer the "
                  "adapter was trained with", path=cfg_path,
                  evidence={"image_token_index": idx, "rows": rows[0]})
    tok = tokenizer_dir(ctx)
    if tok is None:
        return
    proc = read(ctx, pick(ctx, PROCESSOR)) or {}
    token = str(proc["image_token"]) if isinstance(proc.get("image_token"), str) else "<image>"
    tid = token_id(tok, token)
    if tid == idx:
        return
    what = (f"gives {token} the id {tid}" if tid is not None else
            f"has no added token {token}")
    yield Hit(f"{cfg_path}: image_token_index is {idx} but the tokenizer in {tok} {what}: the "
              "image features do not land on the image tokens (`Image features and image tokens "
              "do not match`, or text tokens overwritten). Use the tokenizer saved with the "
              "base, or set image_token_index to the tokenizer's id", path=cfg_path,
              evidence={"image_token_index": idx, "tokenizer": str(tok), "token": token,
                        "tokenizer_id": tid})


# --- LD706 -----------------------------------------------------------------------------------

@check("LD706", "grid-pinpoints-mismatch", Severity.error, families=HF)
def grid_pinpoints_mismatch(ctx: Context) -> Iterable[Hit]:
    """NeXT's `image_grid_pinpoints` differ between config.json and the image processor.

    ## What it does
    Compares `image_grid_pinpoints` of the base's config.json (LlavaNext, LlavaOnevision) with
    the image processor's (`preprocessor_config.json` from the adapter dir, else the base).

    ## Why is this bad?
    The processor tiles the image on one grid and the model unpads on another: the number of
    image tokens disagrees with the features (`Image features and image tokens do not match`)
    or, when the counts happen to agree, the features land in the wrong places.

    ## Example
    A processor from llava-v1.6-mistral-7b-hf (pinpoints up to 672x672) beside a model config
    with pinpoints up to 1008x1008.

    ## Fix
    None automatic: use the preprocessor_config.json saved with the base.
    """
    cfg = base_hf_config(ctx)
    grid = cfg.get("image_grid_pinpoints")
    if grid is None:
        raise Skip("not a LlavaNext/OneVision config (no image_grid_pinpoints)")
    path, pre = _image_processor(ctx)
    if pre is None or path is None:
        raise Skip("no image processor settings to compare (LD702)")
    theirs = pre.get("image_grid_pinpoints")
    if theirs is None:
        raise Skip(f"{path.name} has no image_grid_pinpoints")
    norm = [list(p) for p in grid if isinstance(p, (list, tuple))]
    other = [list(p) for p in theirs if isinstance(p, (list, tuple))]
    if norm == other:
        return
    cfg_path = base_config_path(ctx)
    yield Hit(f"{path}: image_grid_pinpoints {_json(other)} differ from {cfg_path}'s "
              f"{_json(norm)}: the processor tiles images on another grid than the model "
              "unpads, so image tokens and features disagree. Use the preprocessor_config.json "
              "saved with the base", path=path,
              evidence={"config": norm, "processor": other, "config_path": str(cfg_path)})


# --- LD403 and LD407 on llava-hf runs ---------------------------------------------------------

@variant("LD403", Family.llava_hf)
def vocab_mismatch_hf(ctx: Context) -> Iterable[Hit]:
    """A tokenizer longer than the embedding rows the merge will have."""
    rows = embedding_rows(ctx)
    if rows is None:
        raise Skip(NO_BASE if base_dir(ctx) is None else "no embedding matrix found in the base")
    tok = tokenizer_dir(ctx)
    if tok is None:
        raise Skip("no tokenizer in the adapter dir or the base")
    n = tokenizer_length(tok)
    if n is None or n <= rows[0]:
        return
    yield Hit(f"{tok}: the tokenizer has {n} tokens but the merged model's embeddings have "
              f"{rows[0]} rows ({rows[1]}): token ids {rows[0]}..{n - 1} index past them "
              "(`IndexError: index out of range in self`). Tokens were added for training "
              "without saving the resized embed_tokens/lm_head (add them to modules_to_save, or "
              "save_embedding_layers=True), or ZeRO-3 saved them empty (LD105)", path=tok,
              evidence={"tokenizer_length": n, "rows": rows[0], "rows_from": rows[1]},
              fix=FixSafety.none)


_FAMILY_TEXT = {Family.llava: "an original-LLaVA checkpoint (LlavaLlamaForCausalLM, mm_* "
                              "fields)",
                Family.llava_hf: "a llava-hf checkpoint (Llava*ForConditionalGeneration)",
                Family.llm: "a plain language model"}


@variant("LD407", Family.llava_hf)
def wrong_base_kind_hf(ctx: Context) -> Iterable[Hit]:
    """A llava-hf adapter on an original-LLaVA base or a plain LLM."""
    if base_dir(ctx) is None:
        raise Skip(NO_BASE)
    given = ctx.base_family
    if given is None:
        raise Skip("the base has no readable config.json (LD401/LD501 report it)")
    if given == Family.llava_hf:
        return
    path = base_config_path(ctx)
    yield Hit(f"{path}: the base is {_FAMILY_TEXT[given]}, but the adapter was trained on a "
              "llava-hf model (its keys and adapter_config.json name llava-hf modules): peft "
              "finds none of its modules there, and no merge of the two is meaningful. Pass the "
              "llava-hf base the adapter was trained on (e.g. llava-hf/llava-1.5-7b-hf)",
              path=path, severity=Severity.error,
              evidence={"trained_on": Family.llava_hf.value, "given": given.value})
