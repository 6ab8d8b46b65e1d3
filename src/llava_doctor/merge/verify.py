"""Check a written merge before it is renamed into place.

Three independent checks, each of which would catch a different way of being wrong:

1. every shard's header is re-read and validated with the same rules as safetensors' own
   validator (`artifacts.safetensors_header`), and must list exactly the planned tensors;
2. every file is re-read from disk and its sha256 compared with the hash taken from the bytes
   as they were written (a short write, a concurrent writer, a bad disk);
3. a sample of merged tensors is recomputed from the inputs with peft's formula applied to
   whole tensors (`lora_math.reference_merge`, read through the ordinary loaders, not the
   streaming reader) and compared with what the output file holds.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava_doctor.artifacts.safetensors_header import read_safetensors_header
from llava_doctor.artifacts.weights import load_tensors
from llava_doctor.errors import DoctorError, MergeError
from llava_doctor.merge.lora_math import reference_merge
from llava_doctor.merge.plan import MergePlan, PlannedTensor
from llava_doctor.merge.sources import torch_dtype

if TYPE_CHECKING:
    import torch

_HINT = "the output was not installed; re-run the merge, and check the disk if it repeats"


@dataclass(frozen=True)
class Verification:
    """What verification looked at."""

    files: int
    bytes_hashed: int
    sampled: tuple[str, ...]


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file, read in chunks (hashlib releases the GIL on large updates)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def check_headers(plan: MergePlan, out_dir: Path) -> None:
    """Each shard's header is valid and lists exactly the planned tensors, dtypes and shapes."""
    for shard in plan.shards:
        path = out_dir / shard.filename
        try:
            header = read_safetensors_header(path)
        except DoctorError as e:
            raise MergeError(f"verification failed: {e.message}", path=path, hint=_HINT) from None
        want = {t.name: (t.dtype, t.shape, t.nbytes) for t in shard.tensors}
        got = {n: (i.dtype, i.shape, i.nbytes) for n, i in header.tensors.items()}
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()))
            raise MergeError(f"verification failed: header does not list the planned tensors "
                             f"(first difference: {diff[0][0]})", path=path, hint=_HINT)
        if (header.metadata or {}).get("format") != "pt":
            raise MergeError("verification failed: header metadata lacks format=pt", path=path,
                             hint=_HINT)


def check_hashes(out_dir: Path, hashes: dict[str, str], jobs: int = 2) -> int:
    """Re-hash every file named in ``hashes``; returns the bytes read."""
    names = sorted(hashes)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        got = list(pool.map(lambda n: file_sha256(out_dir / n), names))
    for name, digest in zip(names, got):
        if digest != hashes[name]:
            raise MergeError("verification failed: the file on disk differs from the bytes that "
                             f"were written (sha256 {digest[:12]}... != {hashes[name][:12]}...)",
                             path=out_dir / name, hint=_HINT)
    return sum((out_dir / n).stat().st_size for n in names)


def sample_tensors(plan: MergePlan, count: int = 4) -> list[PlannedTensor]:
    """A deterministic spread of LoRA-merged tensors plus one of each other kind of change."""
    tensors = plan.tensors
    lora = [t for t in tensors if t.lora is not None]
    picked: list[PlannedTensor] = []
    if lora:
        k = min(count, len(lora))
        idx = sorted({round(i * (len(lora) - 1) / max(1, k - 1)) for i in range(k)})
        picked += [lora[i] for i in idx]
    for pred in (lambda t: t.lora is not None and t.lora.dora,
                 lambda t: t.lora is not None and t.lora.kind == "embedding",
                 lambda t: t.lora_bias is not None,
                 lambda t: t.source.origin != "base",
                 lambda t: t.source.origin == "base" and t.lora is None):
        extra = next((t for t in tensors if pred(t) and t not in picked), None)
        if extra is not None:
            picked.append(extra)
    return picked


def expected_value(plan: MergePlan, t: PlannedTensor) -> torch.Tensor:
    """The output tensor recomputed from the inputs with whole-tensor maths (CPU, float32
    for float outputs)."""
    import torch

    src = plan.files[t.source.file]
    value = load_tensors(src, [t.source.key])[t.source.key]
    adapter = plan.files[plan.adapter_path]
    if t.lora is not None:
        keys = [t.lora.a, t.lora.b] + ([t.lora.magnitude] if t.lora.magnitude else [])
        ad = load_tensors(adapter, keys)
        mag = ad[t.lora.magnitude].reshape(-1) if t.lora.magnitude else None
        value = reference_merge(value, t.lora, ad[t.lora.a], ad[t.lora.b], mag)
    if t.lora_bias is not None:
        lb = load_tensors(adapter, [t.lora_bias])[t.lora_bias]
        value = value.float() + lb.float() * t.bias_scaling
    return value.to(torch_dtype(t.dtype))


def check_sample(plan: MergePlan, out_dir: Path, count: int = 4) -> tuple[str, ...]:
    """Recompute a sample of output tensors and compare with the written ones."""
    import torch
    from safetensors import safe_open

    where = {t.name: s.filename for s in plan.shards for t in s.tensors}
    picked = sample_tensors(plan, count)
    for t in picked:
        path = out_dir / where[t.name]
        with safe_open(str(path), framework="pt") as f:
            got = f.get_tensor(t.name)
        want = expected_value(plan, t)
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            raise MergeError(f"verification failed: '{t.name}' is {got.dtype} {list(got.shape)}, "
                             f"expected {want.dtype} {list(want.shape)}", path=path, hint=_HINT)
        if not want.is_floating_point():
            ok = torch.equal(got, want)
        else:
            g, w = got.float(), want.float()
            # Both sides round the same float32 value once; the streamed one sums in another
            # order, so allow one unit in the last place of the output dtype.
            eps = torch.finfo(want.dtype).eps
            atol = 1e-6 * float(w.abs().max()) if w.numel() else 0.0
            ok = bool(torch.isclose(g, w, rtol=2 * eps, atol=atol, equal_nan=True).all())
        if not ok:
            diff = float((got.float() - want.float()).abs().max())
            raise MergeError(f"verification failed: '{t.name}' differs from its recomputation "
                             f"from the inputs (max abs difference {diff:.3g})", path=path,
                             hint=_HINT)
    return tuple(t.name for t in picked)


def verify_output(plan: MergePlan, out_dir: Path, hashes: dict[str, str], *,
                  sample: int = 4) -> Verification:
    """Run the three checks; raises MergeError on the first failure."""
    check_headers(plan, out_dir)
    hashed = check_hashes(out_dir, hashes)
    sampled = check_sample(plan, out_dir, sample)
    return Verification(files=len(hashes), bytes_hashed=hashed, sampled=sampled)
