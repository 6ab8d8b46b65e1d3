"""llava-hf fixtures built by the real libraries (tests/hf_build.py), in this venv (transformers
5.x, peft 0.2x), in the transformers-4.46.3 + peft-0.13.2 venv named by
LLAVA_DOCTOR_HF446_PYTHON (canonical keys everywhere) and in the transformers-4.57.6 +
peft-0.17.1 venv named by LLAVA_DOCTOR_HF457_PYTHON (4.52-4.57: adapters in the runtime-4.52
layout, checkpoints saved canonical). Without a variable its parts skip, except under CI=true,
where they fail (the cross-version convention of this project)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BUILD = Path(__file__).with_name("hf_build.py")
HF446_VAR = "LLAVA_DOCTOR_HF446_PYTHON"
HF457_VAR = "LLAVA_DOCTOR_HF457_PYTHON"

# LM-only LoRA written the portable way: matches `language_model.model.layers...` (< 4.52) and
# `model.language_model.layers...` (>= 4.52) alike.
LM_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ADAPTERS: dict[str, dict[str, Any]] = {
    "lm": {"r": 4, "lora_alpha": 8, "target_modules": LM_REGEX},
    "mts": {"r": 4, "lora_alpha": 8, "target_modules": LM_REGEX,
            "modules_to_save": ["multi_modal_projector"]},
    "all-linear": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "names": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "gate_proj"]},
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": LM_REGEX, "use_dora": True,
             "use_rslora": True},
}


def _venv_python(var: str, venv: str) -> str | None:
    """The python that ``var`` names, or None (then the caller skips; under CI=true it fails)."""
    p = os.environ.get(var)
    if p and Path(p).exists():
        return p
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{var} is not set (or does not exist) under CI: .ci/run creates "
                    f"{venv} and exports it")
    return None


def hf446_python() -> str | None:
    """The 4.46 venv's python, or None."""
    return _venv_python(HF446_VAR, ".ci/venv-hf446")


def need_hf446() -> str:
    p = hf446_python()
    if p is None:
        pytest.skip(f"{HF446_VAR} not set: no transformers-4.46.3 venv")
    return p


def need_hf457() -> str:
    p = _venv_python(HF457_VAR, ".ci/venv-hf457")
    if p is None:
        pytest.skip(f"{HF457_VAR} not set: no transformers-4.57.6 venv")
    return p


def run_jobs(python: str, jobs: list[dict[str, Any]], where: Path) -> list[dict[str, Any]]:
    """Run tests/hf_build.py jobs under ``python``; their results (ok/error per job)."""
    where.mkdir(parents=True, exist_ok=True)
    n = len(list(where.glob("jobs-*.json")))
    path = where / f"jobs-{n}.json"
    path.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([python, str(BUILD), str(path)], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{python} hf_build.py failed:\n{proc.stderr[-4000:]}")
    return json.loads((where / (path.name + ".out")).read_text())


def ok(results: list[dict[str, Any]]) -> None:
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad[0]["traceback"]


@dataclass
class World:
    """The artifacts one transformers version wrote: bases (llava, next) and adapters."""

    root: Path
    python: str
    version: str            # transformers version that wrote them
    bases: dict[str, Path]
    adapters: dict[str, Path]
    proc: dict[str, Path]   # processor + tokenizer files per arch (may be empty)

    def copy(self, name: str, dest: Path) -> Path:
        """A private copy of an adapter dir (tests that edit files use one)."""
        out = dest / name
        shutil.copytree(self.adapters[name], out)
        return out

    def copy_base(self, arch: str, dest: Path) -> Path:
        out = dest / f"base-{arch}"
        shutil.copytree(self.bases[arch], out)
        return out


def _tokenizer_model() -> str:
    from llava_doctor.fixtures.builder import tokenizer_model_path

    return str(tokenizer_model_path())


def build_processors(python: str, root: Path) -> dict[str, Path]:
    """Tokenizer + processor files per arch, written by transformers 4.46.3 (the 5.x image
    processors need PIL/torchvision, which this venv lacks). `raw-*` are as 4.46 saves them;
    the others add `num_additional_image_tokens: 1`, as transformers >= 4.47 saves it (4.46
    adds the CLS token implicitly, >= 4.47 reads a missing field as 0: LD704)."""
    jobs = [{"op": "processor", "arch": a, "out": str(root / f"raw-{a}"),
             "tokenizer_model": _tokenizer_model()} for a in ("llava", "llava_next")]
    ok(run_jobs(python, jobs, root / "jobs"))
    out: dict[str, Path] = {}
    for a in ("llava", "llava_next"):
        raw = root / f"raw-{a}"
        fixed = root / f"proc-{a}"
        shutil.copytree(raw, fixed)
        pc = fixed / "processor_config.json"
        data = json.loads(pc.read_text())
        data["num_additional_image_tokens"] = 1
        pc.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        out[a] = fixed
        out[f"raw-{a}"] = raw
    return out


def build_world(python: str, version: str, root: Path, proc: dict[str, Path],
                adapters: tuple[str, ...] = tuple(ADAPTERS)) -> World:
    """Bases for both archs and every adapter of ``adapters`` on the llava base, plus `next-mts`
    (projector as modules_to_save) and `next-all-linear` on the NeXT base."""
    bases = {a: root / f"base-{a}" for a in ("llava", "llava_next")}
    jobs: list[dict[str, Any]] = [
        {"op": "base", "arch": a, "out": str(p), "seed": 0,
         **({"proc": str(proc[a])} if a in proc else {})} for a, p in bases.items()]
    ads = {name: root / f"lora-{name}" for name in adapters}
    for i, (name, out) in enumerate(ads.items()):
        jobs.append({"op": "adapter", "arch": "llava", "base": str(bases["llava"]),
                     "out": str(out), "lora": ADAPTERS[name], "seed": 10 + i})
    for i, name in enumerate(("mts", "all-linear")):
        ads[f"next-{name}"] = root / f"lora-next-{name}"
        jobs.append({"op": "adapter", "arch": "llava_next", "base": str(bases["llava_next"]),
                     "out": str(ads[f"next-{name}"]), "seed": 30 + i, "lora": ADAPTERS[name]})
    ok(run_jobs(python, jobs, root / "jobs"))
    return World(root=root, python=python, version=version, bases=bases, adapters=ads, proc=proc)


def installed_transformers() -> str:
    from importlib.metadata import version

    return version("transformers")


def hf446_version() -> str:
    return "4.46.3"


def hf457_version() -> str:
    return "4.57.6"


def logits(python: str, arch: str, model: Path, adapter: Path | None, where: Path,
           name: str) -> tuple[Any, dict[str, Any]]:
    """(logits, result) of one model (+ unmerged adapter) under ``python``."""
    res = logits_many(python, [(arch, model, adapter, name)], where)
    return res[name]


def logits_many(python: str, items: list[tuple[str, Path, Path | None, str]], where: Path
                ) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Batch of `logits` jobs in one interpreter start: name -> (logits or None, result)."""
    import torch

    jobs = [{"op": "logits", "arch": arch, "model": str(model),
             "adapter": str(adapter) if adapter is not None else None,
             "out": str(where / f"logits-{name}.pt")} for arch, model, adapter, name in items]
    results = run_jobs(python, jobs, where)
    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    for (_, _, _, name), r in zip(items, results, strict=True):
        t = torch.load(where / f"logits-{name}.pt", weights_only=True)["logits"] if r["ok"] \
            else None
        out[name] = (t, r)
    return out


def python_here() -> str:
    return sys.executable
