"""Check a written merge before it is renamed into place.

Three independent checks, each of which would catch a different way of being wrong:

1. every shard's header is re-read and validated with the same rules as safetensors' own
   validator (`artifacts.safetensors_header`), and must list exactly the planned tensors;
2. every byte of every file is read back and compared with the bytes handed to the kernel (a
   short or misplaced write, a buffer reused too early, a concurrent writer): the executor's
   writer reads each block back right after writing it and compares it byte for byte while it
   still holds it (`stream._ReadBack`), so this is a memcmp, not a second sha256 pass; the one
   sha256 per file (reported in `MergeResult.files`) is taken from those same bytes, and
   `compare_hashes` checks every shard was read back whole. Without the executor's read-back,
   `check_hashes` re-reads and re-hashes every file. Either way the re-read is served by the
   page cache: it proves what the kernel returns for the file, not what the platter holds
   (that is fsync's promise, and fsync errors fail the merge);
3. a sample of merged tensors is recomputed from the inputs with peft's formula applied to
   whole tensors (`lora_math.reference_merge`, not the block code) and compared with what the
   output file holds, located through its re-read header. In a merge this runs on its own
   thread while the rest is written (`SampleChecker`).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava_doctor.artifacts.safetensors_header import read_safetensors_header
from llava_doctor.artifacts.weights import SAFETENSORS, WeightFile
from llava_doctor.errors import DoctorError, MergeError
from llava_doctor.merge.lora_math import reference_merge
from llava_doctor.merge.plan import MergePlan, PlannedTensor
from llava_doctor.merge.sources import TensorSource, byte_view, torch_dtype
from llava_doctor.merge.stream import same_bytes

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
    for name, digest in zip(names, got, strict=True):
        if digest != hashes[name]:
            raise MergeError("verification failed: the file on disk differs from the bytes that "
                             f"were written (sha256 {digest[:12]}... != {hashes[name][:12]}...)",
                             path=out_dir / name, hint=_HINT)
    return sum((out_dir / n).stat().st_size for n in names)


def sample_tensors(plan: MergePlan, count: int = 3) -> list[PlannedTensor]:
    """A deterministic spread of ``count`` LoRA-merged tensors (first, last, evenly between),
    plus the smallest tensor of each other kind of change the plan makes."""
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
                 lambda t: t.pad_rows > 0,
                 lambda t: t.source.origin != "base",
                 lambda t: t.source.origin == "base" and t.lora is None):
        if any(pred(t) for t in picked):
            continue
        extra = min((t for t in tensors if pred(t)), key=lambda t: t.nbytes, default=None)
        if extra is not None:
            picked.append(extra)
    return picked


def expected_value(plan: MergePlan, t: PlannedTensor, start: int | None = None,
                   stop: int | None = None) -> torch.Tensor:
    """The output tensor (or its rows ``[start, stop)``) recomputed from the inputs with peft's
    formula (`lora_math.reference_merge`), in the output dtype, on the CPU."""
    import torch

    rows = start is not None and stop is not None
    if t.pad_rows:
        # The source's rows, then their mean (float64, whole tensor) for each appended row.
        with TensorSource(plan.files[t.source.file]) as src:
            value = src.tensor(t.source.key)
        mean = value.double().mean(dim=0, keepdim=True)
        full = torch.cat([value.to(torch_dtype(t.dtype)),
                          mean.expand(t.pad_rows, *value.shape[1:]).to(torch_dtype(t.dtype))])
        return full[start:stop] if rows else full
    with TensorSource(plan.files[t.source.file]) as src:
        value = src.rows(t.source.key, start, stop) if rows else src.tensor(t.source.key)  # type: ignore[arg-type]
    if t.lora is not None or t.lora_bias is not None:
        with TensorSource(plan.files[plan.adapter_path]) as adapter:
            if t.lora is not None:
                A, B = adapter.tensor(t.lora.a), adapter.tensor(t.lora.b)
                mag = (adapter.tensor(t.lora.magnitude).reshape(-1)
                       if t.lora.magnitude is not None else None)
                if rows:  # only for specs whose rows are independent (not `whole_tensor`)
                    if t.lora.transposed:
                        A = A[:, start:stop]
                    else:
                        B = B[start:stop]
                        mag = mag[start:stop] if mag is not None else None
                value = reference_merge(value, t.lora, A, B, mag)
            if t.lora_bias is not None:
                value = value.float() + adapter.tensor(t.lora_bias).float() * t.bias_scaling
    return value.to(torch_dtype(t.dtype))


def check_sample(plan: MergePlan, out_dir: Path, count: int = 3, chunk: int = 1 << 21,
                 ) -> tuple[str, ...]:
    """Recompute a sample of output tensors and compare them with the written ones.

    Row by row chunks of about ``chunk`` elements where the maths allows it, so checking a
    7B ``down_proj`` does not hold several float32 copies of it at once.
    """
    picked = sample_tensors(plan, count)
    for t in picked:
        check_tensor(plan, out_dir, t, chunk)
    return tuple(t.name for t in picked)


def check_tensor(plan: MergePlan, out_dir: Path, t: PlannedTensor, chunk: int = 1 << 21,
                 ) -> None:
    """Recompute one output tensor from the inputs and compare it with the written one
    (`check_sample`'s unit; its bytes must be in the file, the rest of the shard need not)."""
    where = next(s.filename for s in plan.shards if any(x.name == t.name for x in s.tensors))
    path = out_dir / where
    # Located through the header as it is on disk now, read with pread: safetensors'
    # safe_open would pull the whole shard into memory for one tensor.
    header = read_safetensors_header(path)
    wf = WeightFile(path=path, format=SAFETENSORS, tensors=header.tensors,
                    size=path.stat().st_size)
    info = header.tensors.get(t.name)
    if info is None:
        raise MergeError(f"verification failed: '{t.name}' is missing", path=path, hint=_HINT)
    splittable = len(t.shape) >= 2 and t.shape[0] > 0 and not (
        t.lora is not None and t.lora.whole_tensor)
    step = max(1, chunk // max(1, info.numel // t.shape[0])) if splittable else 0
    with TensorSource(wf) as out_src:
        parts = ([(s, min(t.shape[0], s + step)) for s in range(0, t.shape[0], step)]
                 if splittable else [(None, None)])
        for s, e in parts:
            got = out_src.rows(t.name, s, e) if s is not None else out_src.tensor(t.name)  # type: ignore[arg-type]
            want = expected_value(plan, t, s, e)
            if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
                raise MergeError(f"verification failed: '{t.name}' is {got.dtype} "
                                 f"{list(got.shape)}, expected {want.dtype} "
                                 f"{list(want.shape)}", path=path, hint=_HINT)
            diff = _mismatch(got, want)
            if diff is not None:
                raise MergeError(f"verification failed: '{t.name}' differs from its "
                                 "recomputation from the inputs (max abs difference "
                                 f"{diff:.3g})", path=path, hint=_HINT)


class SampleChecker:
    """`check_sample` run while the merge still writes: each sampled tensor is checked on a
    thread of its own as soon as the executor has written and read it back (its
    ``after_tensor`` hook), so the recomputation fills idle CPU instead of adding a phase.
    `finish` waits for the checks (any tensor not yet reported is checked then) and raises the
    first failure."""

    def __init__(self, plan: MergePlan, out_dir: Path, count: int = 3, chunk: int = 1 << 20):
        # Half `check_sample`'s chunk: this runs beside the executor's buffers, not after.
        import queue
        import threading

        self.plan, self.out_dir, self.chunk = plan, out_dir, chunk
        self.picked = sample_tensors(plan, count)
        self._names = {t.name for t in self.picked}
        self._checked: set[str] = set()
        self._error: BaseException | None = None
        self._q: queue.Queue[PlannedTensor | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="llava-doctor-sample",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (t := self._q.get()) is not None:
            if self._error is not None:
                continue
            try:
                check_tensor(self.plan, self.out_dir, t, self.chunk)
                self._checked.add(t.name)
            except BaseException as e:  # re-raised by finish() in the caller's thread
                self._error = e

    def written(self, t: PlannedTensor) -> None:
        """Executor hook: ``t``'s bytes are in the file."""
        if t.name in self._names:
            self._q.put(t)

    def close(self) -> None:
        """Stop the thread (after a failed merge, or before `finish`'s own checks)."""
        self._q.put(None)
        self._thread.join()

    def finish(self) -> tuple[str, ...]:
        """Names of the sampled tensors, all checked; raises the first failure."""
        self.close()
        if self._error is not None:
            raise self._error
        for t in self.picked:
            if t.name not in self._checked:
                check_tensor(self.plan, self.out_dir, t, self.chunk)
        return tuple(t.name for t in self.picked)


def _same_bytes(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and bytes: a memcmp, where `torch.equal`
    on float16 compares element by element (measured: 3.7 ms per million elements, a third of
    the sampled recomputation's time). Equal values with other bits (0.0 and -0.0) are left to
    `_mismatch`'s tolerance, which accepts them."""
    import torch

    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.device.type != "cpu" or want.device.type != "cpu":
        return bool(torch.equal(got, want))
    g = got.contiguous().reshape(-1).view(torch.uint8)
    w = want.contiguous().reshape(-1).view(torch.uint8)
    return same_bytes(byte_view(g), byte_view(w))


def _mismatch(got: torch.Tensor, want: torch.Tensor, chunk: int = 1 << 20) -> float | None:
    """None when ``got`` equals ``want`` up to one rounding of the output dtype, else the largest
    difference."""
    import torch

    if _same_bytes(got, want):
        return None  # the usual case: bit for bit
    if not want.is_floating_point():
        return float("nan")
    g, w = got.reshape(-1), want.reshape(-1)
    # Both sides round a float32 value once, but the streamed one comes from another matmul
    # (row blocks, fused add, maybe a GPU): allow one unit in the last place of the output dtype,
    # plus float32 accumulation error over a rank-128 sum for values that cancel to ~0
    # (~K * eps32 relative to the tensor's scale). A wrong delta is off by far more.
    rtol = 2 * torch.finfo(want.dtype).eps
    scale = max((float(w[i:i + chunk].float().abs().max()) for i in range(0, w.numel(), chunk)),
                default=0.0)
    worst: float | None = None
    for i in range(0, w.numel(), chunk):
        gc, wc = g[i:i + chunk].float(), w[i:i + chunk].float()
        if not bool(torch.isclose(gc, wc, rtol=rtol, atol=1e-5 * scale, equal_nan=True).all()):
            d = float(torch.nan_to_num((gc - wc).abs(), nan=float("inf")).max())
            worst = d if worst is None else max(worst, d)
    return worst


def compare_hashes(out_dir: Path, written: dict[str, str], reread: dict[str, str]) -> int:
    """Compare the hashes of the written bytes with those of the files as re-read from disk
    (by the executor, right behind its writer); returns the bytes that were re-read."""
    for name in sorted(written):
        got = reread.get(name)
        if got != written[name]:
            raise MergeError("verification failed: the file on disk differs from the bytes that "
                             f"were written (sha256 {str(got)[:12]}... != {written[name][:12]}...)",
                             path=out_dir / name, hint=_HINT)
    return sum((out_dir / n).stat().st_size for n in written)


def verify_output(plan: MergePlan, out_dir: Path, hashes: dict[str, str], *,
                  reread: dict[str, str] | None = None, sample: int = 3,
                  sampler: SampleChecker | None = None) -> Verification:
    """Run the three checks; raises MergeError on the first failure.

    ``reread``: sha256 of each shard as re-read from disk while it was written (the executor's
    read-back); without it every file is re-read and hashed here. ``sampler``: the sample was
    checked during the merge (`SampleChecker`); its result is collected here.
    """
    check_headers(plan, out_dir)
    if reread is not None:
        hashed = compare_hashes(out_dir, hashes, reread)
    else:
        hashed = check_hashes(out_dir, hashes)
    sampled = sampler.finish() if sampler is not None else check_sample(plan, out_dir, sample)
    return Verification(files=len(hashes), bytes_hashed=hashed, sampled=sampled)
