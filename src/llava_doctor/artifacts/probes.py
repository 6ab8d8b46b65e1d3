"""Questions only an import can answer, asked in a child process with a timeout.

Whether `from llava.model import LlavaLlamaForCausalLM` works, and which GPUs torch sees, can only
be learned by importing LLaVA or torch: seconds of work that may fail, hang or crash the
interpreter. The child gets the parent's `sys.path` (so it sees exactly what the metadata was
read from), prints one JSON line after a marker, and is killed at the timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from llava_doctor.models import Gpu, GpuQuery, LlavaImport

MARKER = "LLAVA_DOCTOR_PROBE:"

# The child: import as a user would, and when that fails, import the module that defines the
# class without the package __init__s (LLaVA's llava/model/__init__.py swallows the real error
# with a bare `except: pass`, failure mode F31), so the report shows what actually broke.
_LLAVA_SCRIPT = r"""
import importlib, importlib.machinery, json, os, sys, types
sys.path[:] = json.loads(sys.argv[1])
MARKER = sys.argv[2]
def one(e):
    return f"{type(e).__name__}: {e}".strip()
out = {"ok": False, "error": None, "real_error": None}
try:
    from llava.model import LlavaLlamaForCausalLM  # noqa: F401
    out["ok"] = True
except BaseException as e:
    out["error"] = one(e)
    spec = importlib.machinery.PathFinder.find_spec("llava", sys.path)
    for name in [n for n in sys.modules if n == "llava" or n.startswith("llava.")]:
        del sys.modules[name]
    if spec is not None and spec.submodule_search_locations:
        roots = list(spec.submodule_search_locations)
        for name, paths in (("llava", roots),
                            ("llava.model", [os.path.join(r, "model") for r in roots])):
            mod = types.ModuleType(name)
            mod.__path__ = paths
            sys.modules[name] = mod
        try:
            mod = importlib.import_module("llava.model.language_model.llava_llama")
            if not hasattr(mod, "LlavaLlamaForCausalLM"):
                out["real_error"] = ("llava/model/language_model/llava_llama.py imports but "
                                     "defines no LlavaLlamaForCausalLM")
        except BaseException as e2:
            out["real_error"] = one(e2)
sys.stdout.flush()
print(MARKER + json.dumps(out), flush=True)
"""

_TORCH_SCRIPT = r"""
import json, sys
sys.path[:] = json.loads(sys.argv[1])
MARKER = sys.argv[2]
import torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"index": i, "name": torch.cuda.get_device_name(i),
                     "memory_total_bytes": int(total), "memory_free_bytes": int(free)})
print(MARKER + json.dumps({"gpus": gpus}), flush=True)
"""


# Another interpreter's import path and version: nothing imported but the standard library, so
# its packages' metadata can then be read from here (`llava-doctor env --python PY`).
_INTERPRETER_SCRIPT = r"""
import json, platform, sys
MARKER = sys.argv[2]
print(MARKER + json.dumps({"path": sys.path, "version": platform.python_version(),
                           "executable": sys.executable}), flush=True)
"""


class ProbeFailed(Exception):
    """The child did not answer: timed out, crashed, or printed no result."""


def run_probe(script: str, path: Sequence[str], timeout: float,
              python: str | None = None) -> dict[str, object]:
    """Run `script` in a child interpreter (default: this one) with `path` as its sys.path;
    its JSON answer."""
    cmd = [python or sys.executable, "-c", script, json.dumps(list(path)), MARKER]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        raise ProbeFailed(f"did not finish within {timeout:g} s") from None
    except OSError as e:
        raise ProbeFailed(f"could not start {cmd[0]} ({e.strerror})") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                answer = json.loads(line[len(MARKER):])
            except ValueError:
                break
            if isinstance(answer, dict):
                return answer
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise ProbeFailed(f"exited with status {proc.returncode}: {tail}")


def interpreter_info(python: str, timeout: float) -> tuple[list[str], str, str]:
    """(sys.path, version, executable) of another Python; ProbeFailed when it does not run."""
    ans = run_probe(_INTERPRETER_SCRIPT, [], timeout, python)
    path, version, exe = ans.get("path"), ans.get("version"), ans.get("executable")
    if not isinstance(path, list):
        raise ProbeFailed("printed no sys.path")
    return [str(p) for p in path], str(version), str(exe)


def probe_llava(location: str | None, path: Sequence[str], timeout: float,
                python: str | None = None) -> LlavaImport:
    """Try `from llava.model import LlavaLlamaForCausalLM` in a child (only when llava exists)."""
    if location is None:
        return LlavaImport(location=None)
    t0 = time.monotonic()
    try:
        ans = run_probe(_LLAVA_SCRIPT, path, timeout, python)
    except ProbeFailed as e:
        return LlavaImport(location=location, ok=None, error=f"the import probe {e}",
                           seconds=round(time.monotonic() - t0, 2))
    return LlavaImport(location=location, ok=bool(ans.get("ok")),
                       error=_str(ans.get("error")), real_error=_str(ans.get("real_error")),
                       seconds=round(time.monotonic() - t0, 2))


def _str(v: object) -> str | None:
    return None if v is None else str(v)


def visible_filter(gpus: list[Gpu], uuids: dict[int, str], visible: str | None) -> list[Gpu]:
    """The GPUs `CUDA_VISIBLE_DEVICES` leaves visible (indices or GPU-UUID prefixes), renumbered
    as CUDA numbers them; all of them when the variable is unset."""
    if visible is None:
        return gpus
    out: list[Gpu] = []
    for item in (v.strip() for v in visible.split(",")):
        if not item:
            break
        match = None
        if item.isdigit() or (item.startswith("-") and item[1:].isdigit()):
            if int(item) < 0:
                break  # CUDA stops at the first invalid entry
            match = next((g for g in gpus if g.index == int(item)), None)
        else:
            match = next((g for g in gpus if uuids.get(g.index, "").startswith(item)), None)
        if match is None:
            break
        out.append(match.model_copy(update={"index": len(out)}))
    return out


def parse_nvidia_smi(text: str) -> tuple[list[Gpu], dict[int, str]]:
    """`nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.free --format=csv,noheader,
    nounits` output (MiB) -> GPUs and their UUIDs."""
    gpus, uuids = [], {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5 or not parts[0].isdigit():
            continue
        idx = int(parts[0])

        def mib(s: str) -> int | None:
            return int(float(s) * 2**20) if s.replace(".", "", 1).isdigit() else None

        gpus.append(Gpu(index=idx, name=parts[2], memory_total_bytes=mib(parts[3]),
                        memory_free_bytes=mib(parts[4])))
        uuids[idx] = parts[1]
    return gpus, uuids


def query_nvidia_smi(exe: str, timeout: float) -> GpuQuery:
    cmd = [exe, "--query-gpu=index,uuid,name,memory.total,memory.free",
           "--format=csv,noheader,nounits"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        return GpuQuery(method="nvidia-smi", error=f"nvidia-smi did not answer within "
                                                   f"{timeout:g} s")
    except OSError as e:
        return GpuQuery(method="nvidia-smi", error=f"could not run {exe} ({e.strerror})")
    said = (proc.stdout + proc.stderr).strip()
    if "No devices were found" in said:
        return GpuQuery(method="nvidia-smi", gpus=[])
    if proc.returncode != 0:
        first = said.splitlines()[0] if said else f"exit status {proc.returncode}"
        return GpuQuery(method="nvidia-smi", error=f"nvidia-smi failed: {first}")
    gpus, uuids = parse_nvidia_smi(proc.stdout)
    return GpuQuery(method="nvidia-smi",
                    gpus=visible_filter(gpus, uuids, os.environ.get("CUDA_VISIBLE_DEVICES")))


def query_torch(path: Sequence[str], timeout: float, python: str | None = None) -> GpuQuery:
    try:
        ans = run_probe(_TORCH_SCRIPT, path, timeout, python)
    except ProbeFailed as e:
        return GpuQuery(method="torch", error=f"the torch probe {e}")
    raw = ans.get("gpus")
    gpus = [Gpu.model_validate(g) for g in raw] if isinstance(raw, list) else []
    return GpuQuery(method="torch", gpus=gpus)


def query_gpus(method: str, torch_build: str, path: Sequence[str], timeout: float,
               python: str | None = None) -> GpuQuery:
    """The visible GPUs. `method`: auto (nvidia-smi when on PATH, else torch in a child for a
    CUDA/ROCm build; a CPU build is not asked), nvidia-smi, torch or none."""
    if method == "none":
        return GpuQuery(method="none")
    exe = shutil.which("nvidia-smi")
    if method == "nvidia-smi" or (method == "auto" and exe and not torch_build.startswith("rocm")):
        if exe is None:
            return GpuQuery(method="nvidia-smi", error="nvidia-smi is not on PATH")
        return query_nvidia_smi(exe, timeout)
    if method == "torch" or torch_build.startswith(("cuda", "rocm")):
        return query_torch(path, timeout, python)
    return GpuQuery(method="none")
