"""LD1xx: is this a complete LLaVA LoRA output directory?"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from llava_doctor.artifacts.discovery import ADAPTER_WEIGHTS, NON_LORA, PROJECTOR, DirKind, classify
from llava_doctor.artifacts.llava import builder_branch, get_model_name_from_path
from llava_doctor.checks.base import BOTH, Hit, Skip, by_consumer, check
from llava_doctor.checks.context import Context
from llava_doctor.models import FixSafety, Severity

_CKPT = re.compile(r"^checkpoint-\d+$")
ERR, WARN, INFO = Severity.error, Severity.warning, Severity.info


def run_dir_of(ctx: Context) -> Path | None:
    """The final run dir a checkpoint belongs to (its parent, when that is a LoRA output)."""
    if ctx.kind == DirKind.checkpoint or _CKPT.match(ctx.path.name):
        parent = ctx.path.parent
        if parent != ctx.path and classify(parent) == DirKind.lora:
            return parent
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


@check("LD101", "lora-config-missing", Severity.error, fix=FixSafety.safe)
def lora_config_missing(ctx: Context) -> Iterable[Hit]:
    """The LoRA directory has no `config.json`, so LLaVA's loader stops at its first step.

    ## What it does
    Checks that a LoRA output directory or `checkpoint-N` holds the LLaVA `config.json`
    (`LlavaConfig`, with the `mm_*` fields) that `load_pretrained_model` reads first.

    ## Why is this bad?
    LLaVA writes `config.json` only at the very end of training and only into `output_dir`;
    Hugging Face Trainer's `checkpoint-N` folders never have one. The merge fails with
    `OSError: <dir> does not appear to have a file named config.json.` (LLaVA #729). Copying the
    base model's config instead drops the `mm_*` fields, and LLaVA then crashes or adds an
    `<im_patch>` token.

    ## Example
    `merge_lora_weights.py --model-path checkpoints/llava-v1.5-7b-lora/checkpoint-5000`.

    ## Fix
    Safe when the run's final directory (the parent of `checkpoint-N`) or the stage-1 pretrain
    directory has a matching `config.json`: `llava-doctor fix` copies it. Otherwise unsafe: the
    fix synthesises one from the base config plus `mm_*` fields inferred from the projector.
    """
    if ctx.file("config.json") is not None:
        return
    parent = run_dir_of(ctx)
    if parent is not None and (parent / "config.json").is_file():
        yield Hit(f"{ctx.path} has no config.json (Trainer checkpoints never get one); "
                  f"`llava-doctor fix` copies {parent / 'config.json'} from the run's final "
                  "directory (safe)", path=ctx.path / "config.json",
                  evidence={"copy_from": str(parent / "config.json")}, fix=FixSafety.safe)
        return
    pre = ctx.projector_resolved.path
    if pre is not None and (pre.parent / "config.json").is_file():
        yield Hit(f"{ctx.path} has no config.json; `llava-doctor fix` copies the stage-1 "
                  f"config {pre.parent / 'config.json'} when its dimensions match (safe)",
                  path=ctx.path / "config.json",
                  evidence={"copy_from": str(pre.parent / "config.json")}, fix=FixSafety.safe)
        return
    yield Hit(f"{ctx.path} has no config.json, and no final run directory or stage-1 config was "
              "found to copy it from; copy the run's config.json here, or run `llava-doctor fix "
              "--unsafe --base BASE` to synthesise one (never copy a vicuna base's config.json: "
              "it lacks the mm_* fields)", path=ctx.path / "config.json", fix=FixSafety.unsafe)


@check("LD102", "adapter-weights-missing", Severity.error, families=BOTH)
def adapter_weights_missing(ctx: Context) -> Iterable[Hit]:
    """No `adapter_model.safetensors` or `adapter_model.bin`: there is no LoRA to merge.

    ## What it does
    Checks that the directory holds the LoRA weights peft loads, and when it does not, says what
    the directory looks like instead (a stage-1 projector, a `checkpoint-N` with an adapter
    nearby, only `non_lora_trainables.bin`).

    ## Why is this bad?
    peft fails with `ValueError: Can't find weights for <dir>`; users often have only the ~42 MB
    `non_lora_trainables.bin` (the projector) after a partial copy, and ask where the LoRA went.

    ## Example
    A folder holding only `non_lora_trainables.bin` (41,959,424 bytes: a 7B mlp2x projector).

    ## Fix
    None automatic: copy the adapter from the run's output (or a `checkpoint-N` that has one).
    """
    if ctx.adapter_paths:
        return
    parts = []
    nl = ctx.non_lora_path
    if nl is not None:
        parts.append(f"it holds only {NON_LORA} ({_mb(nl.stat().st_size)}), which is the "
                     "fine-tuned projector, not the LoRA")
    if ctx.file(PROJECTOR) is not None:
        parts.append(f"{PROJECTOR} here means a stage-1 pretrain output, an input to fine-tuning "
                     "(--pretrain_mm_mlp_adapter), not a LoRA")
    nearby = sorted(p for n in ADAPTER_WEIGHTS for p in ctx.path.glob(f"checkpoint-*/{n}"))
    if nearby:
        parts.append(f"an adapter exists in {nearby[-1].parent}")
    desc = "; ".join(parts) if parts else "no LoRA files are present"
    yield Hit(f"{ctx.path} has no adapter_model.safetensors or adapter_model.bin: {desc}. Copy "
              "the adapter from the training output", path=ctx.path,
              evidence={"nearby_adapters": [str(p) for p in nearby]})


@check("LD103", "adapter-config-missing", Severity.error, families=BOTH)
def adapter_config_missing(ctx: Context) -> Iterable[Hit]:
    """The adapter weights have no `adapter_config.json` beside them.

    ## What it does
    Checks for peft's `adapter_config.json`, which records `r`, `lora_alpha`, the target modules
    and the base model.

    ## Why is this bad?
    peft cannot load the adapter: `ValueError: Can't find 'adapter_config.json' at '<dir>'`, and
    the LoRA scaling (`lora_alpha / r`) cannot be known from the weights alone.

    ## Example
    A dir with `adapter_model.safetensors` and `non_lora_trainables.bin` but no config.

    ## Fix
    None automatic: copy `adapter_config.json` from the same run (every `checkpoint-N` has one).
    """
    if ctx.file("adapter_config.json") is not None or ctx.kind == DirKind.lora_partial:
        return
    yield Hit(f"{ctx.path} has adapter weights but no adapter_config.json; copy it from the same "
              "training run (every checkpoint-N of the run has an identical one)",
              path=ctx.path / "adapter_config.json")


@check("LD104", "non-lora-trainables-missing", Severity.error, fix=FixSafety.unsafe)
def non_lora_missing(ctx: Context) -> Iterable[Hit]:
    """No `non_lora_trainables.bin`: the fine-tuned projector is not here.

    ## What it does
    Checks for the file LLaVA writes beside the adapter with every trainable non-LoRA
    parameter (the projector, sometimes `image_newline` or embeddings).

    ## Why is this bad?
    LLaVA writes it only in the final save, so `checkpoint-N` dirs lack it; the builder then tries
    `hf_hub_download` and fails with `HFValidationError: Repo id must be in the form ...`.
    Copying the final run's file into a checkpoint silently pairs another step's projector.

    ## Example
    `checkpoints/llava-v1.5-7b-lora/checkpoint-500/` (adapter, trainer state, no projector).

    ## Fix
    Unsafe: `llava-doctor fix --unsafe` copies the final run's file into the checkpoint, or
    builds one from the stage-1 projector with LLaVA's key names; neither is the fine-tuned
    projector of that step. With DeepSpeed shards, `zero_to_fp32.py` recovers the real one.
    """
    if ctx.non_lora_path is not None or not ctx.adapter_paths:
        return
    sources = []
    parent = run_dir_of(ctx)
    if parent is not None and (parent / NON_LORA).is_file():
        sources.append(f"copy {parent / NON_LORA} (the final step's projector)")
    if ctx.projector_resolved.path is not None:
        sources.append(f"build it from the stage-1 projector {ctx.projector_resolved.path}")
    ds = sorted(p.name for p in ctx.path.glob("global_step*"))
    hint = (f"; DeepSpeed shards {ds[0]} are here: `python zero_to_fp32.py` recovers this step's "
            "real projector" if ds else "")
    how = (" or ".join(sources) + " with `llava-doctor fix --unsafe`") if sources else \
        "pass --projector to let `llava-doctor fix --unsafe` build one"
    yield Hit(f"{ctx.path} has no {NON_LORA}, so the merge has no fine-tuned projector; {how}"
              f"{hint}", path=ctx.path / NON_LORA,
              evidence={"deepspeed_shards": ds, "sources": sources},
              fix=FixSafety.unsafe if sources else FixSafety.none)


@check("LD105", "adapter-weights-empty", Severity.error, families=BOTH)
def adapter_weights_empty(ctx: Context) -> Iterable[Hit]:
    """The adapter holds no LoRA tensors, or ZeRO-3 saved them as `[0]`-shaped placeholders.

    ## What it does
    Counts `lora_A`/`lora_B` tensors in the adapter and looks for tensors with zero elements in
    the adapter and in `non_lora_trainables.bin`.

    ## Why is this bad?
    An empty adapter (443-byte `adapter_model.bin`, 40-byte safetensors) merges into the unchanged
    base; ZeRO-3 partitions saved without gathering fail with `size mismatch ... copying a param
    with shape torch.Size([0])`.

    ## Example
    DeepSpeed ZeRO-3 with `stage3_gather_16bit_weights_on_model_save: false`.

    ## Fix
    None automatic: re-export from `global_stepN` with `zero_to_fp32.py`, or enable the gather flag
    and save again.
    """
    ad = ctx.adapter
    if ad is None:
        raise Skip("no readable adapter file")
    lora = [n for n in ad.tensors if ".lora_" in n]
    if not lora:
        yield Hit(f"{ad.path} holds no LoRA tensors ({len(ad.tensors)} tensors, "
                  f"{ad.size:,} bytes): merging it would leave the base unchanged. Re-export the "
                  "adapter (ZeRO-3: `zero_to_fp32.py` on global_stepN)", path=ad.path,
                  evidence={"tensors": len(ad.tensors), "bytes": ad.size})
    for wf in (ad, ctx.non_lora):
        if wf is None:
            continue
        empty = [n for n, t in wf.tensors.items() if t.numel == 0 and len(t.shape) > 0]
        if empty:
            yield Hit(f"{wf.path}: {len(empty)} tensor(s) have zero elements, e.g. '{empty[0]}' "
                      f"with shape {list(wf.tensors[empty[0]].shape)}: DeepSpeed ZeRO-3 saved its "
                      "partitions without gathering. Re-export with `zero_to_fp32.py`",
                      path=wf.path, evidence={"empty_tensors": empty[:20], "count": len(empty)})


@check("LD106", "loader-name-dispatch",
       by_consumer(llava=ERR, llava_doctor=INFO, peft=INFO), fix=FixSafety.safe)
def loader_name_dispatch(ctx: Context) -> Iterable[Hit]:
    """LLaVA's loader would pick the wrong branch from this folder's name.

    ## What it does
    Computes `get_model_name_from_path` exactly as LLaVA does (`<parent>_<checkpoint-N>` for
    checkpoints) and checks that it contains both `llava` and `lora`. The message says what the
    branch LLaVA takes instead does with this run's base.

    ## Why is this bad?
    `load_pretrained_model` dispatches on substrings of the name. Without `llava` it takes the
    plain-LLM branch: `AutoModelForCausalLM.from_pretrained(model_base)`, then peft merges the
    LoRA, and this dir's `config.json` and `non_lora_trainables.bin` are never read. On a
    vicuna base that silently writes a text-only model (no projector, no `mm_*` config); on a
    base whose `config.json` says `model_type: "llava"` (the released `liuhaotian/llava-v1.5-*`)
    transformers >= 4.36 raises `ValueError: Unrecognized configuration class ... LlavaConfig
    ... for this kind of AutoModel: AutoModelForCausalLM`. Without `lora` it takes the
    projector-only branch and fails with `FileNotFoundError` for `mm_projector.bin`. An error
    for LLaVA's merge; info for `llava-doctor merge` and peft, which never look at the name.

    ## Example
    `--model-path ./checkpoint-200/` gives the name `._checkpoint-200` (LLaVA #1552).

    ## Fix
    Safe: `llava-doctor fix` creates a sibling symlink whose name contains `llava` and `lora`
    and prints the `merge_lora_weights.py` command that uses it. Once such a symlink exists the
    finding is info and names it.
    """
    name = get_model_name_from_path(str(ctx.path))
    low = name.lower()
    if "llava" in low and "lora" in low:
        return
    branch = builder_branch(name)
    if branch == "projector-only":
        what = ("its projector-only branch and fails with FileNotFoundError for "
                f"{ctx.path / PROJECTOR}")
    else:
        what = f"its plain-LLM branch: {plain_llm_outcome(ctx)}"
    lacking = " and ".join(w for w in ("llava", "lora") if w not in low)
    ckpt = (f" (for a checkpoint LLaVA joins the parent folder's name: "
            f"'{ctx.path.parent.name}')" if _CKPT.match(ctx.path.name) else "")
    link = _named_link(ctx.path)
    if link is not None:
        # `llava-doctor fix` (or the user) made a sibling symlink LLaVA dispatches correctly.
        yield Hit(f"LLaVA computes the model name '{name}' for {ctx.path}{ckpt}, which lacks "
                  f"'{lacking}'; the symlink {link} reaches it under a name LLaVA sends to its "
                  f"LoRA branch: pass {link} as --model-path to merge_lora_weights.py",
                  path=ctx.path, severity=Severity.info, fix=FixSafety.none,
                  evidence={"model_name": name, "branch": branch, "symlink": str(link)})
        return
    yield Hit(f"LLaVA computes the model name '{name}' for {ctx.path}{ckpt}, which lacks "
              f"'{lacking}': merge_lora_weights.py would take {what}. `llava-doctor fix` creates "
              "a symlink named with both (safe), or use `llava-doctor merge`, which does not "
              "guess from names", path=ctx.path, evidence={"model_name": name, "branch": branch})


def _named_link(path: Path) -> Path | None:
    """A sibling symlink to `path` whose name LLaVA's loader sends to its LoRA branch."""
    path = Path(os.path.abspath(path))
    try:
        real = os.path.realpath(path)
        entries = list(os.scandir(path.parent))
    except OSError:
        return None
    for e in sorted(entries, key=lambda e: e.name):
        if not e.is_symlink() or os.path.realpath(e.path) != real:
            continue
        link_name = get_model_name_from_path(e.path).lower()
        if builder_branch(link_name) == "lora" and "mpt" not in link_name:
            return Path(e.path)
    return None


def plain_llm_outcome(ctx: Context) -> str:
    """What LLaVA's plain-LLM branch (`AutoModelForCausalLM` on the base, then peft) does with
    this run's base, from the base's config."""
    head = ("AutoModelForCausalLM.from_pretrained(model_base), then peft merges the LoRA; "
            f"{NON_LORA} and config.json here are never read")
    bc = ctx.base_config if ctx.base_resolved.path is not None else None
    if bc is None:
        return (f"{head}. On a plain-LLM base that silently writes a text-only model (no "
                "projector, no mm_* config); on a base whose config.json says model_type "
                "\"llava\", transformers >= 4.36 raises `ValueError: Unrecognized configuration "
                "class <class 'transformers.models.llava.configuration_llava.LlavaConfig'> for "
                "this kind of AutoModel: AutoModelForCausalLM`")
    base = ctx.base_path
    if bc.model_type == "llava":
        return (f"{head}, and the base {base}'s config.json says model_type \"llava\", which "
                "transformers >= 4.36 maps to its own llava-hf LlavaConfig, so it raises "
                "`ValueError: Unrecognized configuration class <class "
                "'transformers.models.llava.configuration_llava.LlavaConfig'> for this kind of "
                "AutoModel: AutoModelForCausalLM`")
    if bc.is_llava or bc.mm_vision_tower is not None:
        return (f"{head}. The base {base} is a LLaVA checkpoint (model_type "
                f"'{bc.model_type}', registered by LLaVA), so the merge completes and silently "
                "keeps the base's projector instead of this run's fine-tuned one")
    return (f"{head}. The base {base} is a plain LLM, so it silently writes a text-only model "
            "(no projector, no mm_* config)")


@check("LD107", "not-a-lora-dir", Severity.error, needs_lora=False, families=BOTH)
def not_a_lora_dir(ctx: Context) -> Iterable[Hit]:
    """The path is a stage-1 projector folder, a full model, or holds no LoRA files at all.

    ## What it does
    Classifies the directory from its files: LoRA output, `checkpoint-N`, stage-1 pretrain
    output (`mm_projector.bin`), full model, or unknown.

    ## Why is this bad?
    The merge needs a LoRA output; a pretrain folder goes through LLaVA's projector-only branch
    and a full model needs no merge at all.

    ## Example
    `llava-doctor check checkpoints/llava-v1.5-13b-pretrain`.

    ## Fix
    None: point the command at the LoRA output (the folder with `adapter_config.json`).
    """
    kind = ctx.kind
    if kind in (DirKind.lora, DirKind.checkpoint, DirKind.lora_partial):
        return
    if kind == DirKind.model and ctx.options.to == "llava-hf":
        return  # a full LLaVA checkpoint is what `convert` takes
    why = {
        DirKind.pretrain: f"a stage-1 pretrain output ({PROJECTOR}): it is the input to "
                          "fine-tuning via --pretrain_mm_mlp_adapter, or the --projector of a "
                          "check, not a LoRA",
        DirKind.model: "a full model (weights and config, no adapter): nothing to merge; pass it "
                       "as --base instead",
    }.get(kind, "a directory with no LoRA files (no adapter_config.json, adapter_model.* or "
                f"{NON_LORA})")
    yield Hit(f"{ctx.path} is {why}", path=ctx.path, evidence={"kind": kind.value})


@check("LD108", "duplicate-adapter-files", Severity.warning, families=BOTH)
def duplicate_adapter_files(ctx: Context) -> Iterable[Hit]:
    """Both `adapter_model.safetensors` and `adapter_model.bin` exist and they disagree.

    ## What it does
    Compares the two adapter files' tensor names, shapes and dtypes (and values unless
    `--fast`).

    ## Why is this bad?
    peft >= 0.4 silently prefers the safetensors file, older tools read the `.bin`: a stale
    copy means different tools merge different adapters.

    ## Example
    An old `adapter_model.bin` left beside a newer `adapter_model.safetensors`.

    ## Fix
    None automatic: delete the stale file once you know which one is current.
    """
    if len(ctx.adapter_paths) < 2:
        return
    st, binf = (ctx.weight(p) for p in ctx.adapter_paths)
    if st is None or binf is None:
        raise Skip("one of the adapter files is unreadable (see LD501/LD502/LD504)")
    sig_st = {n: (t.dtype, t.shape) for n, t in st.tensors.items()}
    sig_bin = {n: (t.dtype, t.shape) for n, t in binf.tensors.items()}
    diff = sorted(set(sig_st) ^ set(sig_bin)) + sorted(n for n in set(sig_st) & set(sig_bin)
                                                        if sig_st[n] != sig_bin[n])
    if not diff and ctx.read_values:
        diff = sorted(n for n in st.tensors if not all(
            bool((x == y).all()) for x, y in ctx.paired_values(st, n, binf, n)))
    if diff:
        yield Hit(f"{st.path} and {binf.path} disagree ({len(diff)} tensors differ, e.g. "
                  f"'{diff[0]}'); peft loads the .safetensors one, older tools the .bin. Delete "
                  "the stale file", path=binf.path, evidence={"differing": diff[:20]})
