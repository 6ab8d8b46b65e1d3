"""LD9xx: will the merge run in *this* environment? Checks on what is installed, not on files.

They run once per `llava-doctor env` / `check --env` on an `envinfo.EnvContext` (package
metadata, the torch build, the GPU query, the llava import probe, and each RUN's recorded
versions), never per target. What a RUN needs of the environment that a target check already
judges (LD201 peft fields, LD208 QLoRA config, LD602 RAM, LD701 key layout) is reported by
those checks, run on the RUN with the environment's versions.

Severities are per consumer, like every check's: what breaks LLaVA's own merge (its `llava`
import, its pins, its `device="cuda"` default, old peft on CPU in float16) is harmless to
`llava-doctor merge`, which imports neither llava nor peft and falls back to the CPU; peft's
merge shares the peft and bitsandbytes questions but not llava's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from llava_doctor.artifacts.installed import requirements, satisfies, version_at_least
from llava_doctor.checks.base import ENVIRONMENT, Hit, Skip, by_consumer, check
from llava_doctor.models import Severity

if TYPE_CHECKING:
    from llava_doctor.envinfo import EnvContext

_W, _I = Severity.warning, Severity.info

# The packages LLaVA's merge and loading code imports: a mismatch with llava's pins there is what
# breaks `merge_lora_weights.py`. (llava also pins gradio, fastapi, ... for its demo; irrelevant.)
MERGE_RELEVANT = ("torch", "transformers", "tokenizers", "sentencepiece", "accelerate", "peft",
                  "bitsandbytes", "safetensors", "protobuf", "einops", "timm")


@check("LD901", "llava-import-broken",
       by_consumer(llava=Severity.error, llava_doctor=_I, peft=_I),
       needs_lora=False, scope=ENVIRONMENT)
def llava_import_broken(ctx: EnvContext) -> Iterable[Hit]:
    """`from llava.model import LlavaLlamaForCausalLM` fails with the installed `llava` package.

    ## What it does
    When a `llava` package is importable, runs `from llava.model import LlavaLlamaForCausalLM` in a
    child Python (with a timeout, so a broken install cannot take the tool down). When it fails,
    imports `llava.model.language_model.llava_llama` directly, past the package `__init__`s, to
    report the exception LLaVA hides.

    ## Why is this bad?
    LLaVA's `llava/model/__init__.py` wraps its model imports in `try: ... except: pass`, so a
    transformers, flash-attn, peft or protobuf mismatch surfaces only as `ImportError: cannot
    import name 'LlavaLlamaForCausalLM' from 'llava.model'` (or a `NameError`) in
    `merge_lora_weights.py`, the builder and every eval script (failure mode F31). The real cause
    is nowhere in the message.

    ## Example
    LLaVA installed with `pip install -e .` (transformers 4.37.2) and later `pip install -U
    transformers` for another project: `llava_llama.py` fails on a changed transformers import.

    ## Fix
    None automatic: install the versions the message names (LD902 lists llava's pins that are
    not met), e.g. `pip install -e .` again in the LLaVA checkout, or merge with `llava-doctor
    merge`, which does not import llava.
    """
    llava = ctx.facts.llava
    if llava.location is None:
        raise Skip("no llava package is importable here")
    if llava.ok is not False:
        return
    real = (f"; the error llava/model/__init__.py swallowed is `{llava.real_error}`"
            if llava.real_error else "")
    yield Hit(f"`from llava.model import LlavaLlamaForCausalLM` fails with the llava package at "
              f"{llava.location}: `{llava.error}`{real}. LLaVA's merge_lora_weights.py, model "
              "builder and eval scripts all stop there. Install the versions LLaVA pins (`pip "
              "install -e .` in the LLaVA checkout; LD902 lists pins that are not met), or merge "
              "with `llava-doctor merge`, which does not import llava",
              path=llava.location,
              evidence={"error": llava.error, "real_error": llava.real_error,
                        "location": llava.location})


@check("LD902", "llava-requirements-unmet", by_consumer(llava=_W, llava_doctor=_I, peft=_I),
       needs_lora=False, scope=ENVIRONMENT)
def llava_requirements_unmet(ctx: EnvContext) -> Iterable[Hit]:
    """Installed versions do not meet the pins of the installed `llava` distribution.

    ## What it does
    Reads the `Requires-Dist` lines of the installed `llava` distribution's metadata (LLaVA pins
    e.g. `transformers==4.37.2`, `torch==2.1.2`, `accelerate==0.21.0`) and compares the packages
    its model and merge code use (torch, transformers, tokenizers, sentencepiece, accelerate,
    peft, bitsandbytes, safetensors, protobuf, einops, timm) with what is installed, from
    metadata. `--transformers-version` / `--peft-version` stand for the installed ones.

    ## Why is this bad?
    LLaVA leaves some packages unpinned and pins others exactly; its code breaks on other
    versions of the pinned ones, often behind the swallowed import of LD901, and training and
    merging environments drift apart (LLaVA #1406: different environments for merging and
    evaluating).

    ## Example
    llava 1.2.2.post1 (requires `transformers==4.37.2`) with transformers 4.46.3 installed.

    ## Fix
    None automatic: `pip install` the versions listed, or use a separate environment for
    LLaVA's scripts.
    """
    if ctx.facts.llava.location is None and ctx.facts.package("llava") is None:
        raise Skip("no llava package installed")
    reqs = requirements("llava", ctx.path)
    if not reqs:
        raise Skip("the llava package has no distribution metadata (a checkout on the path)")
    unmet: dict[str, str] = {}
    wanted: dict[str, str] = {}
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        if req.marker is not None or name not in MERGE_RELEVANT:
            continue
        have = ctx.version(name)
        if have is None:
            wanted[name], unmet[name] = req.text, "not installed"
            continue
        try:
            ok = satisfies(have, req.clauses)
        except ValueError:
            continue
        if not ok:
            wanted[name], unmet[name] = req.text, have
    if not unmet:
        return
    listing = ", ".join(f"{wanted[n]} (installed: {v})" for n, v in unmet.items())
    llava_version = ctx.facts.package("llava")
    yield Hit(f"llava {llava_version.version if llava_version else ''} requires {listing}; "
              "LLaVA's code is written against those versions and breaks on others, often as "
              "the swallowed import error of LD901. `pip install "
              + " ".join(f"'{wanted[n]}'" for n in unmet)
              + "` (or keep a separate environment for LLaVA's scripts)",
              path=ctx.facts.llava.location,
              evidence={"required": wanted, "installed": unmet})


@check("LD903", "bitsandbytes-missing", by_consumer(llava=_W, llava_doctor=_I, peft=_W),
       scope=ENVIRONMENT)
def bitsandbytes_missing(ctx: EnvContext) -> Iterable[Hit]:
    """A RUN's config asks for bitsandbytes quantization, and bitsandbytes is not installed.

    ## What it does
    For each RUN, reads `quantization_config` from the LoRA dir's `config.json` (LLaVA's QLoRA
    runs write it there) and from the base's `config.json` (pre-quantized bases), and reports
    when it is a bitsandbytes config (`load_in_4bit`, `load_in_8bit`, `quant_method:
    bitsandbytes`) and no bitsandbytes distribution is installed.

    ## Why is this bad?
    transformers builds the model from that config and refuses to load it without bitsandbytes
    (`ImportError: Using bitsandbytes 4-bit quantization requires ...`), so LLaVA's builder stops
    before anything is merged; resuming the QLoRA training fails the same way.

    ## Example
    A `--bits 4` LLaVA run merged on a CPU machine without bitsandbytes.

    ## Fix
    None automatic: `llava-doctor fix` removes the QLoRA `quantization_config` from the LoRA
    dir's config.json (LD208), which a merge wants anyway; or `pip install bitsandbytes`.
    """
    if ctx.version("bitsandbytes") is not None:
        return
    for run in ctx.facts.runs:
        if run.quantization is None:
            continue
        yield Hit(f"{run.path} is configured for {run.quantization} quantization but "
                  "bitsandbytes is not installed: transformers refuses to build the model from "
                  "this config, so LLaVA's builder stops before merging. Run `llava-doctor fix` "
                  "(LD208 removes the QLoRA quantization_config, which a merge does not want), "
                  "or `pip install bitsandbytes`", path=run.path,
                  evidence={"run": run.path, "quantization": run.quantization})


@check("LD904", "cuda-build-without-gpu", by_consumer(llava=_W, llava_doctor=_I, peft=_I),
       needs_lora=False, scope=ENVIRONMENT)
def cuda_build_without_gpu(ctx: EnvContext) -> Iterable[Hit]:
    """torch is a CUDA or ROCm build but no GPU is visible.

    ## What it does
    Reads torch's build from `torch/version.py` (as text, without importing torch) and compares
    it with the GPU query (`nvidia-smi`, or torch in a child process with a timeout; honours
    `CUDA_VISIBLE_DEVICES`). Reports a CUDA/ROCm build that sees no GPU.

    ## Why is this bad?
    LLaVA's builder and eval scripts default to `device="cuda"`; with no GPU they fail with
    `RuntimeError: Found no NVIDIA driver on your system` or `No CUDA GPUs are available` after
    loading for minutes. It also usually means the job landed on a node without GPUs, or
    `CUDA_VISIBLE_DEVICES` is empty.

    ## Example
    A merge job submitted to a CPU node of a cluster whose environment has `torch 2.1.2+cu121`.

    ## Fix
    None automatic: run on a GPU node, check `CUDA_VISIBLE_DEVICES`, or merge on CPU with
    `llava-doctor merge --device cpu` (its `--device auto` falls back to CPU by itself).
    """
    torch = ctx.facts.torch
    gpus = ctx.facts.gpus
    if not torch.build.startswith(("cuda", "rocm")):
        raise Skip(f"torch is {torch.build}")
    if gpus.gpus is None:
        raise Skip("the GPU query did not run or failed")
    if gpus.gpus:
        return
    visible = ctx.cuda_visible_devices
    why = (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    yield Hit(f"torch {torch.version} is a {torch.build} build but {gpus.method} sees no GPU"
              f"{why}: LLaVA's builder and eval scripts default to device='cuda' and fail after "
              "loading the model. Run on a GPU node, or merge on CPU with `llava-doctor merge "
              "--device cpu`", path=ctx.package_location("torch"),
              evidence={"torch": torch.version, "build": torch.build, "method": gpus.method,
                        "cuda_visible_devices": visible})


@check("LD905", "peft-cpu-half-merge", by_consumer(llava=_W, llava_doctor=_I, peft=_W),
       needs_lora=False, scope=ENVIRONMENT)
def peft_cpu_half_merge(ctx: EnvContext) -> Iterable[Hit]:
    """The peft that will merge is older than 0.6, which cannot merge float16 LoRA on CPU.

    ## What it does
    Compares the installed peft (or `--peft-version`) with 0.6.0.

    ## Why is this bad?
    LLaVA's `merge_lora_weights.py` loads on CPU (`device_map='cpu'`) in float16; peft before 0.6
    computes `B @ A` in float16 on CPU and fails with `RuntimeError: "addmm_impl_cpu_" not
    implemented for 'Half'` (failure mode F27, fixed by peft PR #1017 in 0.6.0).

    ## Example
    An environment pinned to peft 0.4.0 by an old fork of LLaVA.

    ## Fix
    None automatic: `pip install 'peft>=0.6'` (check LD201 for fields the adapter needs), merge
    on a GPU, or use `llava-doctor merge`, which computes the delta in float32.
    """
    version = ctx.version("peft")
    at_least = version_at_least(version, "0.6.0")
    if at_least is None:
        raise Skip("peft is not installed and no --peft-version was given")
    if at_least:
        return
    yield Hit(f"peft {version} computes LoRA deltas in float16 on CPU, which torch does not "
              "support: LLaVA's merge_lora_weights.py (device_map='cpu', float16) fails with "
              "`RuntimeError: \"addmm_impl_cpu_\" not implemented for 'Half'`. `pip install "
              "'peft>=0.6'`, merge on a GPU, or use `llava-doctor merge` (float32 deltas)",
              path=ctx.package_location("peft"), evidence={"peft": version, "minimum": "0.6.0"})


@check("LD906", "env-probe-incomplete", Severity.info, needs_lora=False, scope=ENVIRONMENT)
def env_probe_incomplete(ctx: EnvContext) -> Iterable[Hit]:
    """A question about the environment could not be answered (a probe timed out or failed).

    ## What it does
    Reports when the llava import probe or the GPU query (both run in child processes with a
    timeout) did not answer, so that a missing LD901 or LD904 is not read as a clean bill.

    ## Why is this bad?
    An import that hangs (a network filesystem, a CUDA initialisation that stalls) or crashes
    the interpreter is itself a sign of a broken environment, and the checks that depend on the
    answer could not run.

    ## Example
    `llava-doctor env --timeout 5` where importing llava (torch, transformers) takes longer.

    ## Fix
    None: rerun with a larger `--timeout`, or run the import by hand to see what happens.
    """
    llava = ctx.facts.llava
    if llava.location is not None and llava.ok is None and llava.error:
        yield Hit(f"could not tell whether llava imports: {llava.error}. LD901 could not run; "
                  "rerun with a larger --timeout, or try `python -c \"from llava.model import "
                  "LlavaLlamaForCausalLM\"` by hand", path=llava.location,
                  evidence={"probe": "llava", "error": llava.error})
    gpus = ctx.facts.gpus
    if gpus.error:
        yield Hit(f"could not list the GPUs: {gpus.error}. LD904 could not run",
                  evidence={"probe": gpus.method, "error": gpus.error})
