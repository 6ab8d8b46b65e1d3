"""LD4xx: is the base model the one the LoRA was trained on, complete, and loadable by LLaVA?

The base is `--base`, else `adapter_config.json`'s `base_model_name_or_path` when it is a local
dir or in the local Hugging Face cache (`Context.base_resolved`). When none resolves, LD401
reports it once (info) and the other base checks are skipped with that reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.configs import ModelConfig, read_json, tokenizer_length
from llava_doctor.artifacts.llava import (
    GENERATION_SAVE_REFUSED,
    LLAVA_CLASSES,
    NEXT_ONLY,
    llm_family_of,
)
from llava_doctor.artifacts.model_dir import ModelDir
from llava_doctor.checks.base import BOTH, Hit, Skip, by_consumer, check
from llava_doctor.checks.context import Context
from llava_doctor.checks.projector import PROJ, lora_config, non_lora_view
from llava_doctor.errors import DoctorError
from llava_doctor.models import FixSafety, Severity

ERR, WARN, INFO = Severity.error, Severity.warning, Severity.info

NO_BASE = "no base model resolved (LD401 says how to pass --base)"


def _source(ctx: Context) -> str:
    res = ctx.base_resolved
    return {"--base": "given with --base",
            "adapter_config.json": "adapter_config.json's base_model_name_or_path",
            "hf-cache": res.note or "the local Hugging Face cache"}.get(res.source, res.source)


def _need_base(ctx: Context) -> Path:
    """The base dir, or Skip when there is none to look at (LD401 reports why)."""
    p = ctx.base_resolved.path
    if p is None:
        raise Skip(NO_BASE)
    if not p.is_dir():
        raise Skip(f"the base {p} is not a directory (LD401 reports it)")
    return p


def _need_base_config(ctx: Context) -> ModelConfig:
    _need_base(ctx)
    if ctx.base_config is None:
        raise Skip("the base has no readable config.json (LD401/LD501 report it)")
    return ctx.base_config


def _recorded_base(ctx: Context) -> str | None:
    return ctx.adapter_config.base_model_name_or_path if ctx.adapter_config is not None else None


# --- LD401 -------------------------------------------------------------------------------------

@check("LD401", "base-incomplete", Severity.error, families=BOTH)
def base_incomplete(ctx: Context) -> Iterable[Hit]:
    """The base model is missing, incomplete, or not a model at all.

    ## What it does
    Resolves the base (`--base`, else `adapter_config.json`'s `base_model_name_or_path` when it
    is a local dir or in the local Hugging Face cache, offline) and checks that it is a
    directory with `config.json` and weights; that every shard its index names exists and holds
    the tensors the index promises; that it is not the LoRA dir itself nor another PEFT adapter
    dir (swapped arguments). When no base resolves, this check reports it once, as info, with
    how to pass `--base`; the other base checks are then skipped.

    ## Why is this bad?
    LLaVA's merge fails with `OSError: ... does not appear to have a file named config.json`,
    `HFValidationError: Repo id must be in the form ...` (a training-machine path recorded in
    `adapter_config.json`), `KeyError: 'LlavaConfig'` (the LoRA dir given as `--model-base`,
    LLaVA #410), or deep inside the shard loading.

    ## Example
    `adapter_config.json` records `./checkpoints/vicuna-7b-v1.5`, which exists only on the
    training machine.

    ## Fix
    None: pass the complete base the LoRA was trained on with `--base`.
    """
    res = ctx.base_resolved
    recorded = _recorded_base(ctx)
    if res.path is None:
        name = (recorded or "vicuna-7b-v1.5").rstrip("/").split("/")[-1]
        hub = (f", or put '{recorded}' into the local Hugging Face cache (`hf download "
               f"{recorded}`)" if recorded and recorded.count("/") == 1
               and not recorded.startswith((".", "/", "~")) else "")
        yield Hit(f"no base model for {ctx.path}: {res.note}. The base-model checks were "
                  f"skipped; pass the base the LoRA was trained on with `llava-doctor check "
                  f"{ctx.path} --base /path/to/{name}`{hub}",
                  path=ctx.file("adapter_config.json") or ctx.path, severity=Severity.info,
                  evidence={"recorded": recorded, "source": res.source})
        return
    p, how = res.path, _source(ctx)
    if not p.exists():
        yield Hit(f"the base {p} ({how}) does not exist on this machine; pass the base with "
                  "--base", path=p, evidence={"source": res.source})
        return
    if not p.is_dir():
        yield Hit(f"the base {p} ({how}) is a file, not a model directory; pass the directory "
                  "that holds config.json and the weights", path=p)
        return
    try:
        same = p.resolve() == ctx.path.resolve() or os.path.samefile(p, ctx.path)
    except OSError:
        same = False
    if same:
        yield Hit(f"the base {p} ({how}) is the LoRA dir itself: LLaVA then fails with "
                  "`KeyError: 'LlavaConfig'` loading its tokenizer (LLaVA #410). Pass the model "
                  f"the LoRA was trained on{f' ({recorded})' if recorded else ''}", path=p)
        return
    if (p / "adapter_config.json").is_file():
        yield Hit(f"the base {p} ({how}) is itself a PEFT adapter dir (it has "
                  "adapter_config.json): --model-path and --model-base are probably swapped. "
                  "Pass the full model the LoRA was trained on as the base", path=p)
        return
    if not (p / "config.json").is_file():
        yield Hit(f"the base {p} ({how}) has no config.json: LLaVA's merge fails with `OSError: "
                  f"{p} does not appear to have a file named config.json.` Pass a complete "
                  "Hugging Face model directory", path=p / "config.json")
        return
    md = ctx.base
    if md is None:
        errs = [e for q, e in ctx.file_errors.items() if q == p or p in q.parents]
        if errs:
            return  # an unreadable index: LD501 reports it with its rule
        yield Hit(f"the base {p} ({how}) holds no weights (no model.safetensors[.index.json] "
                  "or pytorch_model.bin[.index.json]); copy or download them", path=p)
        return
    for prob in md.problems:
        if prob.kind == "missing-shard":
            index = md.index_path.name if md.index_path else "index"
            yield Hit(f"{prob.path}: the base's {index} names this shard but it does not "
                      f"exist, so {len(prob.tensors)} tensor(s) "
                      f"(e.g. '{prob.tensors[0] if prob.tensors else '?'}') are missing; copy or "
                      "download the missing shard", path=prob.path,
                      evidence={"kind": prob.kind, "tensors": list(prob.tensors[:20]),
                                "count": len(prob.tensors)})
        elif prob.kind == "missing-tensor":
            yield Hit(f"{prob.path}: {prob.detail}; the shard is incomplete or the index belongs "
                      "to another copy of the model. Re-download the shard", path=prob.path,
                      evidence={"kind": prob.kind, "tensors": list(prob.tensors[:20]),
                                "count": len(prob.tensors)})
        # unreadable shards are LD501/LD504's findings (recorded by their read-everything pass)


# --- LD402 -------------------------------------------------------------------------------------

_DIM_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size")


def _dims(cfg: ModelConfig) -> dict[str, int | None]:
    d = cfg.llm_dims
    out = {k: d.get(k) for k in _DIM_FIELDS}
    if out["num_key_value_heads"] is None:  # transformers' default: no GQA
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


@check("LD402", "base-mismatch", Severity.error)
def base_mismatch(ctx: Context) -> Iterable[Hit]:
    """The base is a different size or shape of model than the one the LoRA was trained on.

    ## What it does
    Compares `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`
    and `intermediate_size` of the LoRA dir's `config.json` (inherited from the training base)
    with the base's `config.json`. The per-tensor adapter shapes are LD203's.

    ## Why is this bad?
    LLaVA builds the model from the LoRA's config and loads the base's weights into it: a 7B
    LoRA on a 13B base fails with `size mismatch ... copying a param with shape
    torch.Size([128, 4096]) from checkpoint, the shape in current model is
    torch.Size([128, 5120])`, and a same-width model with another layer count or head layout
    loads wrongly.

    ## Example
    A `llava-v1.5-7b-lora` merged with `--model-base lmsys/vicuna-13b-v1.5`.

    ## Fix
    None: pass the base the LoRA was trained on.
    """
    base_cfg = _need_base_config(ctx)
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101); per-tensor adapter shapes "
                   "are LD203's")
    ours, theirs = _dims(ctx.config), _dims(base_cfg)
    diff = {k: {"lora": ours[k], "base": theirs[k]} for k in _DIM_FIELDS
            if ours[k] is not None and theirs[k] is not None and ours[k] != theirs[k]}
    if not diff:
        return
    recorded = _recorded_base(ctx) or ctx.config.name_or_path
    listing = ", ".join(f"{k} {v['lora']} vs {v['base']}" for k, v in diff.items())
    path = _need_base(ctx) / "config.json"
    yield Hit(f"{path}: the base is not the model the LoRA was trained on (LoRA config.json vs "
              f"base: {listing}); LLaVA's merge fails with size mismatches or loads a wrongly "
              f"shaped model. Pass the base the LoRA was trained on"
              f"{f' ({recorded})' if recorded else ''}", path=path,
              evidence={"mismatch": diff, "recorded_base": recorded})


# --- LD403 -------------------------------------------------------------------------------------

_EMBED = ("model.embed_tokens.weight", "language_model.model.embed_tokens.weight",
          "model.language_model.embed_tokens.weight")
_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight")
IM_PATCH, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"


def _first_info(md: ModelDir, names: tuple[str, ...]) -> tuple[str, Path, tuple[int, ...]] | None:
    for n in names:
        hit = md.tensors.get(n)
        if hit is not None:
            return n, hit[0].path, tuple(hit[1].shape)
    return None


def known_added_tokens(model_dir: Path) -> set[str]:
    """Token strings a tokenizer dir already adds (added_tokens.json, tokenizer_config.json,
    tokenizer.json), so the ones LLaVA's merge adds again are not counted twice."""
    out: set[str] = set()
    for name, pick in (("added_tokens.json", lambda d: d.keys()),
                       ("tokenizer_config.json", lambda d: [
                           v.get("content") for v in (d.get("added_tokens_decoder") or {}).values()
                           if isinstance(v, dict)]),
                       ("tokenizer.json", lambda d: [
                           t.get("content") for t in (d.get("added_tokens") or [])
                           if isinstance(t, dict)])):
        f = model_dir / name
        if not f.is_file():
            continue
        try:
            out.update(s for s in pick(read_json(f)) if isinstance(s, str))
        except (DoctorError, AttributeError, TypeError):
            continue
    return out


@check("LD403", "vocab-mismatch", Severity.error, fix=FixSafety.safe)
def vocab_mismatch(ctx: Context) -> Iterable[Hit]:
    """Vocabulary sizes disagree between the LoRA config, the base, the tokenizer and non_lora.

    ## What it does
    Compares the LoRA `config.json`'s `vocab_size` (V) with the rows of the base's
    `embed_tokens`/`lm_head`, with `embed_tokens`/`lm_head` in `non_lora_trainables.bin` and in
    the adapter, and with the base tokenizer's length plus the tokens LLaVA's merge adds:
    `<im_patch>` when `mm_use_im_patch_token` is true **or absent** (LLaVA's default is True),
    `<im_start>`/`<im_end>` with `mm_use_im_start_end`.

    ## Why is this bad?
    LLaVA builds the model with V rows and loads the base into it: a base with other row counts
    fails with `ValueError: Trying to set a tensor of shape torch.Size([32000, 4096]) in
    "weight" (which has shape torch.Size([32003, 4096])), this looks incorrect.`; a non_lora
    `embed_tokens` of another size fails with `size mismatch`. When the merge's added tokens
    push the tokenizer past V, `resize_token_embeddings` grows the merged model with untrained
    rows and a new `vocab_size`: a config without `mm_use_im_patch_token` silently gets
    `<im_patch>` and V+1.

    ## Example
    A hand-written `config.json` without `mm_use_im_patch_token`, merged onto vicuna (32000):
    the merged model has 32001 rows.

    ## Fix
    Safe for the `<im_patch>` trap when the run's vocabulary has no room for it: `llava-doctor
    fix` sets `mm_use_im_patch_token: false` (what the v1.5 scripts pass). None otherwise: use
    the base and tokenizer the LoRA was trained with.
    """
    base_dir = _need_base(ctx)
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101)")
    vocab = ctx.config.llm_dims.get("vocab_size")
    if vocab is None:
        raise Skip("the LoRA config.json has no vocab_size")
    cfg_path = ctx.path / "config.json"
    md = ctx.base
    if md is not None:
        for names, what in ((_EMBED, "embed_tokens"), (_LM_HEAD, "lm_head")):
            got = _first_info(md, names)
            if got is None or not got[2] or got[2][0] == vocab:
                continue
            name, path, shape = got
            h = shape[1] if len(shape) > 1 else "H"
            yield Hit(f"{path}: the base's '{name}' has {shape[0]} rows, but the LoRA's "
                      f"config.json has vocab_size {vocab}: LLaVA builds the model with "
                      f"{vocab} rows and fails loading the base with `ValueError: Trying to set "
                      f"a tensor of shape torch.Size([{shape[0]}, {h}]) in \"weight\" (which has "
                      f"shape torch.Size([{vocab}, {h}])), this looks incorrect.` Use the base "
                      "the LoRA was trained on (a vocabulary grown during training needs its "
                      "embeddings)", path=path,
                      evidence={"tensor": name, "rows": shape[0], "vocab_size": vocab,
                                "which": what}, fix=FixSafety.none)
            break  # embed and lm_head of one base disagree together; one finding says it
    for label, wf, keymap in _extra_embeddings(ctx):
        for key, param in keymap.items():
            rows = wf.tensors[key].shape[0] if wf.tensors[key].shape else None
            if rows is None or rows == vocab or wf.tensors[key].numel == 0:
                continue
            yield Hit(f"{wf.path}: '{key}' ({param}) has {rows} rows, but the LoRA's "
                      f"config.json has vocab_size {vocab}: loading the {label} fails with "
                      f"`size mismatch for {param}: copying a param with shape "
                      f"torch.Size([{rows}, ...]) from checkpoint, the shape in current model "
                      f"is torch.Size([{vocab}, ...])`. The file and the config come from "
                      "different runs", path=wf.path,
                      evidence={"tensor": key, "rows": rows, "vocab_size": vocab},
                      fix=FixSafety.none)
    tok_len = tokenizer_length(base_dir)
    if tok_len is None:
        return  # no readable tokenizer: LD405
    if tok_len > vocab:
        yield Hit(f"{base_dir}: the base tokenizer has {tok_len} tokens but the LoRA's "
                  f"config.json has vocab_size {vocab}: token ids {vocab}..{tok_len - 1} index "
                  "past the embeddings. Use the tokenizer the LoRA was trained with",
                  path=base_dir, evidence={"tokenizer_length": tok_len, "vocab_size": vocab},
                  fix=FixSafety.none)
        return
    cfg = lora_config(ctx)
    patch_default = "mm_use_im_patch_token" not in cfg
    use_patch = bool(cfg.get("mm_use_im_patch_token", True))
    present = known_added_tokens(base_dir)
    start_end = bool(cfg.get("mm_use_im_start_end"))
    added = [t for t, on in ((IM_PATCH, use_patch), (IM_START, start_end), (IM_END, start_end))
             if on and t not in present]
    final = tok_len + len(added)
    if final <= vocab:
        return
    trap = patch_default and IM_PATCH in added
    fixable = trap and final - 1 <= vocab
    why = ("config.json has no mm_use_im_patch_token, and LLaVA's merge defaults it to True"
           if trap else "config.json asks for them")
    remedy = ("`llava-doctor fix` sets mm_use_im_patch_token: false, as the v1.5 scripts do "
              "(safe: the run's vocabulary has no room for <im_patch>, so training did not use "
              "it)" if fixable else "use the tokenizer the LoRA was trained with")
    yield Hit(f"{cfg_path}: LLaVA's merge adds {', '.join(added)} to the base tokenizer "
              f"({tok_len} tokens) because {why}, then resize_token_embeddings({final}) grows "
              f"the merged model past the vocab_size {vocab} it was trained with: "
              f"{final - vocab} untrained embedding row(s) and a different vocab_size in the "
              f"merged config (`llava-doctor merge` and peft add no tokens). {remedy}",
              path=cfg_path, severity=by_consumer(llava=WARN, llava_doctor=INFO, peft=INFO),
              evidence={"file": str(cfg_path), "field": "mm_use_im_patch_token",
                        "actual": None if patch_default else use_patch,
                        "expected": False if fixable else None, "tokenizer_length": tok_len,
                        "added": added, "vocab_size": vocab, "merged_vocab": final},
              fix=FixSafety.safe if fixable else FixSafety.none)


def _extra_embeddings(ctx: Context) -> list[tuple[str, Any, dict[str, str]]]:
    """Full embed_tokens / lm_head tensors that the merge loads from the LoRA dir."""
    out: list[tuple[str, Any, dict[str, str]]] = []
    wanted = ("model.embed_tokens.weight", "lm_head.weight")
    nl = non_lora_view(ctx)
    if nl is not None:
        got = {k: v for k, v in nl.landed.items() if v in wanted}
        if got:
            out.append(("non_lora_trainables.bin (strict=False still checks shapes)", nl.wf, got))
    ad = ctx.adapter
    if ad is not None:
        # peft's save_embedding_layers: `base_model.model.<module path>[.base_layer].weight`,
        # the PeftModel's own prefix over the model's parameter name.
        got = {}
        for k in ad.tensors:
            name = k.replace(".base_layer.", ".")
            if name.startswith("base_model.model.") and name[len("base_model.model."):] in wanted:
                got[k] = name[len("base_model.model."):]
        if got:
            out.append(("adapter", ad, got))
    return out


# --- LD404 -------------------------------------------------------------------------------------

def generation_problems(raw: dict[str, Any]) -> list[tuple[str, Any]]:
    """(field, value) pairs `GenerationConfig.validate()` warns about in greedy mode.

    The rules of transformers' `validate()` (4.37, unchanged since): with `do_sample` false or
    absent, sampling knobs away from their defaults; with one beam, beam knobs away from theirs.
    """
    out: list[tuple[str, Any]] = []
    if not raw.get("do_sample", False):
        for f, default in (("temperature", 1.0), ("top_p", 1.0), ("typical_p", 1.0),
                           ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0), ("min_p", None)):
            v = raw.get(f)
            if v is not None and v != default:
                out.append((f, v))
        top_k = raw.get("top_k")
        if top_k is not None and top_k != 50 and raw.get("penalty_alpha") is None:
            out.append(("top_k", top_k))
    if raw.get("num_beams", 1) == 1:
        for f, default in (("early_stopping", False), ("num_beam_groups", 1),
                           ("diversity_penalty", 0.0), ("length_penalty", 1.0)):
            v = raw.get(f)
            if v is not None and v != default:
                out.append((f, v))
    return out


def _validation_text(problems: list[tuple[str, Any]]) -> str:
    warns = []
    for f, v in problems:
        if f in ("early_stopping", "num_beam_groups", "diversity_penalty", "length_penalty"):
            warns.append(f"UserWarning('`num_beams` is set to 1. However, `{f}` is set to "
                         f"`{v}` -- this flag is only used in beam-based generation modes. You "
                         f"should set `num_beams>1` or unset `{f}`.')")
        else:
            warns.append(f"UserWarning('`do_sample` is set to `False`. However, `{f}` is set "
                         f"to `{v}` -- this flag is only used in sample-based generation modes. "
                         f"You should set `do_sample=True` or unset `{f}`.')")
    return ("ValueError: The generation config instance is invalid -- `.validate()` throws "
            "warnings and/or exceptions. Fix these issues to save the configuration. Thrown "
            "during validation: [" + ", ".join(warns) + "]")


@check("LD404", "generation-config-invalid", by_consumer(llava=ERR, llava_doctor=INFO, peft=ERR))
def generation_config_invalid(ctx: Context) -> Iterable[Hit]:
    """`generation_config.json` sets sampling fields without `do_sample`: saving it raises.

    ## What it does
    Applies the rules of transformers' `GenerationConfig.validate()` to the base's
    `generation_config.json` (and the LoRA dir's, which LLaVA-NeXT writes): with `do_sample`
    false or absent, `temperature`, `top_p`, `typical_p`, `top_k` (≠ 50), `epsilon_cutoff`,
    `eta_cutoff` must keep their defaults; with one beam, the beam-search knobs too.

    ## Why is this bad?
    vicuna v1.5 ships `temperature: 0.9, top_p: 0.6` without `do_sample`. With
    transformers 4.37.2 (the version LLaVA pins; LLaVA #1144) and later, `model.save_pretrained`
    raises `ValueError: The generation config instance is invalid -- .validate() throws
    warnings and/or exceptions. Fix these issues to save the configuration.` after `config.json`
    is written and before any weights: the merged dir holds only `config.json` (LLaVA #1406).
    An error for LLaVA's merge and for peft's `save_pretrained`; info for `llava-doctor merge`,
    which writes a valid generation config. The LoRA dir's own file is read by neither LLaVA's
    merge (it takes the base's) nor peft's: a warning for them.

    ## Example
    Any merge onto `lmsys/vicuna-7b-v1.5` with LLaVA's `merge_lora_weights.py`.

    ## Fix
    None here (the base is never modified): `llava-doctor merge` writes a valid
    `generation_config.json` into its output and reports what it changed. With LLaVA's script,
    set `do_sample: true` in the base's file first (keeps vicuna's defaults).
    """
    files: list[Path] = []
    if ctx.file("generation_config.json") is not None:
        files.append(ctx.path / "generation_config.json")
    if ctx.base_resolved.path is not None and ctx.base_resolved.path.is_dir():
        g = ctx.base_resolved.path / "generation_config.json"
        if g.is_file():
            files.append(g)
    elif not files:
        raise Skip(NO_BASE)
    for f in files:
        raw = ctx._read(f, read_json)
        if raw is None:
            continue  # unreadable JSON: LD501
        problems = generation_problems(raw)
        if not problems:
            continue
        fields = ", ".join(f"{k}={v!r}" for k, v in problems)
        ours = f.parent == ctx.path
        whose = "the LoRA dir's" if ours else "the base's"
        state = "false" if "do_sample" in raw else "unset"
        if ours:
            # LLaVA's merge and peft take the generation config from the base.
            yield Hit(f"{f}: {whose} generation config sets {fields} while do_sample is "
                      f"{state}. Neither LLaVA's merge nor peft's reads this file (they take the "
                      "base's), but anything that saves a model loaded from this dir with "
                      f"{GENERATION_SAVE_REFUSED} fails with `{_validation_text(problems)}`. "
                      "Set \"do_sample\": true in it", path=f,
                      severity=by_consumer(llava=WARN, llava_doctor=INFO, peft=WARN),
                      evidence={"fields": {k: v for k, v in problems},
                                "do_sample": raw.get("do_sample")})
            continue
        yield Hit(f"{f}: {whose} generation config sets {fields} while do_sample is "
                  f"{state}: LLaVA's merge ({GENERATION_SAVE_REFUSED}) writes config.json and "
                  f"then fails in save_pretrained with `{_validation_text(problems)}`, leaving "
                  "no weights. `llava-doctor merge` writes a valid generation_config.json; with "
                  "LLaVA's script, set \"do_sample\": true in this file first", path=f,
                  evidence={"fields": {k: v for k, v in problems},
                            "do_sample": raw.get("do_sample")})


# --- LD405 -------------------------------------------------------------------------------------

_SLOW_SP = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer",
            "CodeLlamaTokenizerFast"}


@check("LD405", "tokenizer-missing", by_consumer(llava=ERR, llava_doctor=WARN, peft=WARN))
def tokenizer_missing(ctx: Context) -> Iterable[Hit]:
    """The base has no tokenizer LLaVA's merge can load (`use_fast=False` needs tokenizer.model).

    ## What it does
    Checks that the base has `tokenizer.model` or `tokenizer.json`, and for Llama tokenizers
    (`tokenizer_class` LlamaTokenizer) specifically `tokenizer.model`: LLaVA loads
    `AutoTokenizer.from_pretrained(base, use_fast=False)`, whose slow Llama tokenizer reads the
    sentencepiece file.

    ## Why is this bad?
    LLaVA's merge fails at its second step with `OSError: Can't load tokenizer for '<base>'` or
    sentencepiece's `TypeError: not a string` (an error for it). `llava-doctor merge` and peft
    do not load the tokenizer: they complete, and the merged dir gets no tokenizer files
    (warning).

    ## Example
    A base copied with only `*.safetensors` and `config.json`.

    ## Fix
    None automatic: copy the tokenizer files from the base's source (a `checkpoint-N` of the run
    also has them: HF Trainer saves the tokenizer there).
    """
    base = _need_base(ctx)
    has_sp = (base / "tokenizer.model").is_file()
    has_json = (base / "tokenizer.json").is_file()
    if has_sp:
        return
    tok_class = None
    if (base / "tokenizer_config.json").is_file():
        try:
            tok_class = read_json(base / "tokenizer_config.json").get("tokenizer_class")
        except DoctorError:
            tok_class = None
    if has_json and tok_class not in _SLOW_SP:
        return
    donors = sorted(p.parent for p in ctx.path.glob("checkpoint-*/tokenizer.model"))
    if ctx.path.name.startswith("checkpoint-") and (ctx.path / "tokenizer.model").is_file():
        donors.insert(0, ctx.path)
    copy = f"; {donors[-1]} has the run's tokenizer files to copy" if donors else \
        "; copy them from the base's source"
    what = ("has tokenizer.json but no tokenizer.model, and its tokenizer_class is "
            f"{tok_class}: LLaVA's AutoTokenizer(use_fast=False) needs the sentencepiece file"
            if has_json else "has no tokenizer.model and no tokenizer.json")
    yield Hit(f"the base {base} {what}; LLaVA's merge fails with `OSError: Can't load tokenizer "
              f"for '{base}'` and the merged model gets no tokenizer{copy}",
              path=base / "tokenizer.model",
              evidence={"tokenizer_class": tok_class, "tokenizer_json": has_json,
                        "copy_from": str(donors[-1]) if donors else None})


# --- LD406 -------------------------------------------------------------------------------------

@check("LD406", "model-type-collision", Severity.info, fix=FixSafety.safe)
def model_type_collision(ctx: Context) -> Iterable[Hit]:
    """The LoRA's `config.json` says `model_type: "llava"`, which transformers claims for llava-hf.

    ## What it does
    Flags an original-LLaVA config (Llama fields such as `hidden_size` at the top level, not in
    `text_config`) whose `model_type` is `"llava"`, the value LLaVA's code wrote before the v1.6
    release (2024-01-31, including the released `liuhaotian/llava-v1.5-*-lora`).

    ## Why is this bad?
    transformers >= 4.36 maps `"llava"` to its own `LlavaConfig` (llava-hf), so
    `AutoConfig.from_pretrained` returns the wrong class: `AttributeError: 'LlavaConfig' object
    has no attribute 'attention_dropout'` (LLaVA #1075), `KeyError: 'llava'` on older
    transformers. LLaVA's own loader reads the config with its own class
    (`LlavaConfig.from_pretrained`, since commit 04fb03d) and its merge writes `llava_llama`,
    so this is info for every merge; it matters to `AutoConfig` users such as vLLM, LLaVA-NeXT's
    loader (which calls `AutoConfig` first) and LLaVA code older than 04fb03d.

    ## Example
    `liuhaotian/llava-v1.5-7b-lora`'s `config.json`.

    ## Fix
    Safe: `llava-doctor fix` sets `model_type` to the LLaVA type of the run's LLM
    (`llava_llama`, `llava_mistral`, `llava_mpt`, `llava_qwen`, ...: what LLaVA writes today).
    None when the config does not say which LLM it is.
    """
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101/LD501)")
    cfg = ctx.config
    if cfg.model_type != "llava" or cfg.text_config is not None:
        return
    if cfg.hidden_size is None and cfg.num_hidden_layers is None:
        return
    path = ctx.path / "config.json"
    expected = llava_model_type(cfg.raw())
    remedy = (f"`llava-doctor fix` sets it to \"{expected}\" (safe)" if expected else
              "set it to the LLaVA type of this run's LLM (llava_llama, llava_mistral, "
              "llava_mpt, llava_qwen, ...): config.json does not say which LLM it is, so there "
              "is no automatic fix")
    yield Hit(f"{path}: model_type is \"llava\" on an original-LLaVA config (Llama fields at the "
              "top level): transformers >= 4.36 resolves \"llava\" to its own llava-hf "
              "LlavaConfig, so AutoConfig-based loaders (vLLM, LLaVA-NeXT's builder, LLaVA "
              "before commit 04fb03d) fail with `AttributeError: 'LlavaConfig' object has no "
              "attribute 'attention_dropout'`. LLaVA's own merge reads it with its own class "
              f"and is unaffected. {remedy}", path=path,
              evidence={"file": str(path), "field": "model_type", "actual": "llava",
                        "expected": expected},
              fix=FixSafety.safe if expected else FixSafety.none)


def llava_model_type(config: dict[str, Any]) -> str | None:
    """The LLaVA `model_type` for a config's LLM (`llava_llama`, `llava_qwen`, ...), or None
    when the config names no LLM family LLaVA has a class for."""
    family = llm_family_of(config)
    return LLAVA_CLASSES[family][0] if family is not None else None


# --- LD407 -------------------------------------------------------------------------------------

def base_kind(ctx: Context) -> str | None:
    """'llava', 'llava-hf' or 'llm' for the resolved base, from its config and weight index."""
    bc = ctx.base_config
    if bc is None:
        return None
    if bc.is_llava_hf:
        return "llava-hf"
    if bc.mm_vision_tower is not None or bc.is_llava:
        return "llava"
    md = ctx.base
    if md is not None and any(n.startswith(PROJ) for n in md.tensor_names):
        return "llava"
    return "llm"


def _name(s: str | None) -> str | None:
    return s.rstrip("/").split("/")[-1] if s else None


_KIND_TEXT = {"llava": "a LLaVA checkpoint (LlavaLlamaForCausalLM, with a projector)",
              "llava-hf": "a llava-hf LlavaForConditionalGeneration checkpoint",
              "llm": "a plain language model (no mm_* fields, no projector)"}


@check("LD407", "wrong-base-kind", Severity.error)
def wrong_base_kind(ctx: Context) -> Iterable[Hit]:
    """The base is a plain LLM where the LoRA was trained on a LLaVA checkpoint, or vice versa.

    ## What it does
    The LoRA dir's `config.json` keeps the training base's `architectures` (LLaVA saves it with
    `model.config.save_pretrained`, which does not rewrite it): `LlamaForCausalLM` means trained
    from a plain LLM (`finetune_lora.sh` from vicuna), `LlavaLlamaForCausalLM` from a LLaVA
    checkpoint (`finetune_task_lora.sh`). The base is a LLaVA checkpoint when its config has
    `mm_vision_tower` or its weights `model.mm_projector.*`. Without `architectures`, a recorded
    base name containing `llava` decides. The recorded and given base names are shown.

    ## Why is this bad?
    LoRA deltas are relative to the exact weights they were trained on ("The model base should
    be the base you finetuned from", LLaVA #740). The merge completes without an error and the
    model is degraded, repetitive or nonsensical: an error for every merge.

    ## Example
    A task LoRA trained from `liuhaotian/llava-v1.5-7b` merged with
    `--model-base lmsys/vicuna-7b-v1.5`.

    ## Fix
    None: pass the recorded base (`adapter_config.json`'s `base_model_name_or_path`).
    """
    _need_base_config(ctx)
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101)")
    arch = ctx.config.architectures or []
    recorded = _recorded_base(ctx) or ctx.config.name_or_path
    if any(a.startswith("Llava") and a.endswith("ForCausalLM") for a in arch):
        trained, signal = "llava", f"architectures {arch}"
    elif "LlavaForConditionalGeneration" in arch:
        trained, signal = "llava-hf", f"architectures {arch}"
    elif arch:
        trained, signal = "llm", f"architectures {arch}"
    elif recorded and "llava" in (_name(recorded) or "").lower():
        trained, signal = "llava", f"the recorded base '{recorded}'"
    else:
        return
    given = base_kind(ctx)
    if given is None or given == trained:
        return
    names = f" (recorded base '{recorded}', given '{ctx.base_path}')" if recorded else ""
    path = _need_base(ctx) / "config.json"
    # Across families (an original-LLaVA LoRA on a llava-hf model) nothing lines up at all.
    across = "llava-hf" in (given, trained)
    yield Hit(f"{path}: the base is {_KIND_TEXT[given]}, but the LoRA was trained on "
              f"{_KIND_TEXT[trained]} ({signal} in its config.json){names}. LoRA deltas only "
              "make sense on the weights they were trained on: the merge completes and the "
              "model is degraded. Pass the base the LoRA was trained on", path=path,
              evidence={"trained_on": trained, "given": given, "recorded_base": recorded,
                        "architectures": arch},
              severity=Severity.error if across else None)


# --- LD408 -------------------------------------------------------------------------------------

#: Which loader can merge a run of each non-Llama family, in words (failure-modes.md §0, F11).
_WHO_MERGES = {
    "mistral": "LLaVA-NeXT's builder builds LlavaMistralForCausalLM when the model name contains "
               "'mistral'",
    "mixtral": "LLaVA-NeXT's builder builds LlavaMixtralForCausalLM when the model name contains "
               "'mixtral'",
    "gemma": "LLaVA-NeXT's builder builds LlavaGemmaForCausalLM when the model name contains "
             "'gemma'",
    "qwen": "no stock LoRA branch builds LlavaQwenForCausalLM: LLaVA-NeXT's has no 'qwen' case "
            "either (LLaVA-NeXT #253, PR #277), so it loads the run like haotian-liu's",
    "mpt": "no stock LoRA branch merges an MPT LoRA (LLaVA #1313)",
}


@check("LD408", "llava-class-unsupported", by_consumer(llava=ERR, llava_doctor=INFO, peft=INFO))
def llava_class_unsupported(ctx: Context) -> Iterable[Hit]:
    """The run's LLM is not Llama, but LLaVA's LoRA branch always builds `LlavaLlamaForCausalLM`.

    ## What it does
    Reads the LLM family of the LoRA dir's `config.json` (`model_type` such as `llava_qwen`,
    `llava_mistral`, `llava_mixtral`, `llava_gemma`, `llava_mpt`, or `architectures` such as
    `LlavaQwenForCausalLM` / `Qwen2ForCausalLM`): LLaVA-NeXT runs, onevision included.

    ## Why is this bad?
    haotian-liu/LLaVA's `load_pretrained_model` builds `LlavaLlamaForCausalLM` in its LoRA
    branch whatever the LLM, and `merge_lora_weights.py` saves it as `llava_llama`: a Qwen2
    model loses its q/k/v biases (LD409), a Mixtral its experts, a Gemma its norm and
    activation, a Mistral its sliding window (LLaVA #1586) - silently, or with size mismatches.
    An error for that merge. `llava-doctor merge` keeps every base tensor and writes the
    family's LLaVA class into the merged config (info); peft merges on the class you load (info).

    ## Example
    A onevision-qwen2 task LoRA (`model_type: "llava_qwen"`) merged with LLaVA's
    `scripts/merge_lora_weights.py`.

    ## Fix
    None here: merge with `llava-doctor merge`, or with a loader that builds the run's class
    (the message says which one can).
    """
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101/LD501)")
    raw = ctx.config.raw()
    if ctx.config.text_config is not None:
        return  # llava-hf: not LLaVA's loader at all
    family = llm_family_of(raw)
    if family is None or family == "llama":
        return
    model_type, cls = LLAVA_CLASSES[family]
    path = ctx.path / "config.json"
    where = ("a LLaVA-NeXT run (haotian-liu/LLaVA has no class for it)" if family in NEXT_ONLY
             else "a run of a LLaVA class haotian-liu/LLaVA's LoRA branch never builds")
    yield Hit(f"{path}: model_type {raw.get('model_type')!r} / architectures "
              f"{raw.get('architectures')} make this {where}: its LLM is {family}, whose LLaVA "
              f"class is {cls} ({model_type}). haotian-liu/LLaVA's merge_lora_weights.py builds "
              "LlavaLlamaForCausalLM in its LoRA branch whatever the LLM and saves it as "
              f"llava_llama, so the merged model is wrong. Who can merge it: "
              f"{_WHO_MERGES[family]}; `llava-doctor merge` keeps every base tensor and writes "
              f"{cls}", path=path,
              evidence={"family": family, "model_type": raw.get("model_type"),
                        "architectures": raw.get("architectures"), "llava_class": cls})


# --- LD409 -------------------------------------------------------------------------------------

_LLAMA_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Top-level tensors of LlavaLlamaForCausalLM; the multimodal parts have their own checks.
_LLAMA_TOP = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_MM_PREFIXES = ("model.mm_projector.", "model.image_newline", "model.vision_tower.",
                "model.vision_resampler.")


def llama_drops(names: Iterable[str], attention_bias: bool) -> tuple[list[str], list[str]]:
    """(tensors `LlavaLlamaForCausalLM` (transformers 4.37.2) has no parameter for, parameters
    of its decoder layers the names lack) for a base's tensor names."""
    layer_params = set(_LLAMA_LAYER)
    if attention_bias:
        layer_params |= {f"self_attn.{p}_proj.bias" for p in "qkvo"}
    dropped: list[str] = []
    present: dict[str, set[str]] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            present.setdefault(m.group(1), set()).add(m.group(2))
            if m.group(2) not in layer_params and not m.group(2).endswith("rotary_emb.inv_freq"):
                dropped.append(n)
        elif n.startswith("model.") and n not in _LLAMA_TOP and not n.startswith(_MM_PREFIXES):
            dropped.append(n)
    missing = [f"model.layers.{i}.{p}" for i in sorted(present, key=int)
               for p in _LLAMA_LAYER if p not in present[i]]
    return sorted(dropped), missing


@check("LD409", "base-tensors-dropped", by_consumer(llava=ERR, llava_doctor=INFO, peft=INFO))
def base_tensors_dropped(ctx: Context) -> Iterable[Hit]:
    """Base tensors that LLaVA's `LlavaLlamaForCausalLM` has no parameter for: dropped silently.

    ## What it does
    Compares the base's tensor names (headers only) with the parameters of the Llama class
    LLaVA's LoRA branch builds from the LoRA dir's `config.json` with transformers 4.37.2:
    per decoder layer `q/k/v/o_proj`, `gate/up/down_proj` and the two norms, with q/k/v/o biases
    only when the config sets `attention_bias: true`; plus `embed_tokens`, `norm`, `lm_head` and
    the multimodal parts. Extra tensors are dropped on load; missing ones stay randomly
    initialised.

    ## Why is this bad?
    `from_pretrained` drops unexpected checkpoint tensors with only a log line. Qwen2 keeps
    biases on q/k/v but its config has no `attention_bias` (Qwen2Attention hard-codes them), so
    a Qwen2/onevision base loaded through `LlavaLlamaForCausalLM` loses every q/k/v bias and the
    merged model is silently wrong; a Mixtral base loses its experts and keeps random MLPs. An
    error for LLaVA's merge; info for `llava-doctor merge`, which copies every base tensor, and
    for peft, which merges on the model's own class.

    ## Example
    A `lmms-lab/llava-onevision-qwen2-7b-ov` task LoRA merged with LLaVA's script.

    ## Fix
    None here: merge with `llava-doctor merge` or a loader that builds the LLM's own class
    (LD408 says which).
    """
    _need_base(ctx)
    if ctx.config is None:
        raise Skip("no readable config.json in the LoRA dir (LD101)")
    bc = ctx.base_config
    if bc is not None and bc.is_llava_hf:
        raise Skip("a llava-hf base: LLaVA's Llama class does not load it (LD407)")
    md = ctx.base
    if md is None:
        raise Skip("the base's weights are unreadable (LD401 reports it)")
    raw = ctx.config.raw()
    dropped, missing = llama_drops(md.tensor_names, bool(raw.get("attention_bias")))
    if not dropped and not missing:
        return
    parts = []
    if dropped:
        biases = [n for n in dropped if n.endswith("_proj.bias")]
        why = (" (the LoRA's config.json has no attention_bias: true, so the Llama class has "
               "no q/k/v/o biases)" if biases else "")
        parts.append(f"{len(dropped)} base tensor(s) have no parameter to load into and are "
                     f"dropped without an error, e.g. '{dropped[0]}'{why}")
    if missing:
        parts.append(f"{len(missing)} parameter(s) of its decoder layers are not in the base and "
                     f"stay randomly initialised, e.g. '{missing[0]}'")
    yield Hit(f"{ctx.base_path}: LLaVA's LoRA branch loads this base into LlavaLlamaForCausalLM "
              f"(transformers 4.37.2): {'; '.join(parts)}. The merged model is silently wrong. "
              "`llava-doctor merge` copies every base tensor", path=ctx.base_path,
              evidence={"dropped": dropped[:20], "missing": missing[:20],
                        "count": len(dropped) + len(missing)})
