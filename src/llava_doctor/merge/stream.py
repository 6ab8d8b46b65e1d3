"""Execute a `MergePlan`: read each tensor in row blocks, merge on the device in float32, cast
once to the output dtype, and write the bytes at their planned offset.

Memory: a handful of row blocks (a few MB each), the LoRA matrices of the module being merged,
and, only for tensors that cannot be split into rows (DoRA on a transposed weight, 1-d tensors,
files that are not readable in place), that one tensor. Nothing scales with the model.

Threads: this one walks the plan and reads each block's input bytes; on a CPU, one compute
worker per core merges blocks (each worker runs torch single-threaded, so no OpenMP pool spins
waiting for a core another thread holds); a writer thread `pwrite`s finished blocks in file
order and reads each one back from the file to compare it byte for byte with what it handed
the kernel; a hasher thread feeds the blocks to the shard's sha256 (one pass: the bytes hashed
are the ones proven to be in the file). All release the GIL in the heavy parts, so reading,
maths, writing and hashing overlap. Queues and buffer pools are bounded, so a slow disk slows
the reader instead of filling memory.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_doctor.errors import FileCorruptError, MergeError
from llava_doctor.merge.lora_math import LoraTensors, apply_bias, apply_rows
from llava_doctor.merge.plan import MergePlan, PlannedShard, PlannedTensor
from llava_doctor.merge.sources import TensorSource, byte_view, read_exact, row_bytes, torch_dtype
from llava_doctor.merge.writer import ShardWriter

if TYPE_CHECKING:
    import torch

# Elements per row block: 1M float32 = 4 MB, small enough for L2/L3-friendly passes and large
# enough that per-block overhead is noise (measured: 512x2048 blocks beat whole 5504x2048
# matrices on a 2-core machine, because nothing has to be page-faulted in afresh).
BLOCK_ELEMS = 1 << 20
QUEUE_DEPTH = 4


@dataclass(frozen=True)
class MergeEvent:
    """Progress, sent to the observer the caller passes (the CLI draws a bar from it)."""

    phase: str          # "checks" | "plan" | "write" | "verify" | "finalize" | "done"
    done: int = 0       # tensors finished in this phase
    total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    tensor: str | None = None


Observer = Callable[[MergeEvent], None]


class _Pool:
    """Reusable output buffers; a block larger than the pool's size gets its own."""

    def __init__(self, count: int, nbytes: int, alive: Callable[[], None],
                 pinned: bool = False):
        import torch

        self.nbytes = nbytes
        self._alive = alive
        self._pinned = pinned
        self._free: queue.Queue[Any] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned))

    def take(self, nbytes: int) -> torch.Tensor:
        import torch

        if nbytes > self.nbytes:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pinned)
        while True:
            try:
                return self._free.get(timeout=0.2)
            except queue.Empty:
                self._alive()  # the writer died: stop waiting for buffers it will never return

    def give(self, buf: torch.Tensor) -> None:
        if buf.numel() == self.nbytes:
            self._free.put(buf)


class _Stage(threading.Thread):
    """One pipeline stage: takes items from its queue in order, hands them to the next stage.

    A failure is kept and re-raised in the main thread by `check`; after one, the stage only
    drains its queue so no producer blocks forever.
    """

    def __init__(self, name: str, work: Callable[[Any], None], nxt: _Stage | None = None):
        super().__init__(name=f"llava-doctor-{name}", daemon=True)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.work = work
        self.nxt = nxt
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is not None and self.error is None:
                try:
                    self.work(item)
                except BaseException as e:  # surfaced in the main thread by check()
                    self.error = e
            if self.nxt is not None:
                self.nxt.put(item, check=False)  # errors are the main thread's to raise
            if item is None:
                return

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.nxt is not None:
            self.nxt.check()

    def put(self, item: Any, check: bool = True) -> None:
        """Queue ``item``; with ``check``, first raise any stage's failure (main thread)."""
        while True:
            if check and item is not None:
                self.check()
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self.is_alive():
                    return  # nobody will ever take it
                continue


class _Task:
    """One block's maths, run by a compute worker; the writer waits for it in file order."""

    __slots__ = ("done", "error", "fn")

    def __init__(self, fn: Callable[[Any], None]):
        self.fn = fn  # called with the worker's float32 scratch buffer (or None)
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self, alive: Callable[[], None]) -> None:
        """Block until the maths is done; re-raise its failure (on the writer thread)."""
        while not self.done.wait(0.2):
            alive()
        if self.error is not None:
            raise self.error


class _Computer:
    """Compute workers taking `_Task`s first in, first out; each owns a float32 scratch buffer
    (``scratch`` elements; none for devices that are not the plain CPU)."""

    def __init__(self, workers: int, scratch: int):
        import torch

        self.q: queue.Queue[_Task | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.aborted = False
        self._scratch = scratch
        self._threads = [threading.Thread(target=self._run, args=(torch,), daemon=True,
                                          name=f"llava-doctor-compute-{i}")
                         for i in range(workers)]
        for th in self._threads:
            th.start()

    def _run(self, torch: Any) -> None:
        work = torch.empty(self._scratch, dtype=torch.float32) if self._scratch else None
        while (task := self.q.get()) is not None:
            try:
                if self.aborted:
                    raise RuntimeError("aborted")
                task.fn(work)
            except BaseException as e:  # re-raised by the writer, in file order
                task.error = e
            finally:
                task.done.set()

    def submit(self, task: _Task, alive: Callable[[], None]) -> None:
        while True:
            alive()
            try:
                self.q.put(task, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self, abort: bool = False) -> None:
        """Finish the queued tasks (or, with ``abort``, fail them at once) and stop."""
        self.aborted = self.aborted or abort
        for _ in self._threads:
            self.q.put(None)
        for th in self._threads:
            th.join(timeout=30)


@dataclass
class _Ctx:
    """What the executor's per-tensor code hands blocks to."""

    sw: ShardWriter
    sources: SourcePool
    writer: _Stage
    pool: _Pool          # output buffers (returned by the hasher)
    inputs: _Pool        # input bytes of blocks in flight (returned by the compute workers)
    computer: _Computer
    alive: Callable[[], None]


def _memcmp() -> Callable[..., int] | None:
    import ctypes

    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


_MEMCMP = _memcmp()


def same_bytes(a: memoryview, b: memoryview) -> bool:
    """Whether two equally long buffers hold the same bytes (memcmp speed: `memoryview ==`
    compares item by item, 100x slower)."""
    import numpy as np

    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    if x.size != y.size:
        return False
    if _MEMCMP is None or x.size == 0:
        return bool(np.array_equal(x, y))
    return _MEMCMP(x.ctypes.data, y.ctypes.data, x.size) == 0


class _ReadBack:
    """Reads a shard back through its own descriptor right after each write and compares it,
    byte for byte, with the bytes handed to the kernel (still in hand, so no hash is needed for
    the comparison: a memcmp, where hashing the re-read bytes cost as much as the maths).

    What this proves: every byte the file returns now is the byte we meant to write there (no
    short or misplaced write, no buffer reused too early, no other writer in between). It reads
    what the kernel holds for the file, normally the page cache: it does not prove the platter
    has it; that is `fsync`'s promise, whose errors the writer reports. The header is compared
    too, so the whole file is covered; `pos` says how far.
    """

    def __init__(self, path: Path, header: bytes):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._buf = bytearray(len(header))
        self.pos = 0
        self.check(0, memoryview(header))

    def check(self, offset: int, data: memoryview) -> None:
        """Compare the file at ``offset`` (where the last check ended) with ``data``."""
        if offset != self.pos:
            raise AssertionError(f"{self.path.name}: read-back at {offset}, expected "
                                 f"{self.pos}")  # a bug in the executor
        n = len(data)
        if len(self._buf) < n:
            self._buf = bytearray(n)
        view = memoryview(self._buf)[:n]
        read_exact(self._fd, view, offset, self.path)
        if not same_bytes(view, data):
            raise MergeError("verification failed: the file on disk differs from the bytes "
                             f"that were written (at bytes {offset:,}-{offset + n:,}, read "
                             "back right after writing them)", path=self.path,
                             hint="the output was not installed; re-run the merge, and check "
                                  "the disk if it repeats")
        self.pos += n
        if n and hasattr(os, "posix_fadvise"):
            # Done with these pages: start their write-back now (so the final fsync has little
            # left: measured 2.7 s -> 2.3 s for a 1 GB merge) and let the kernel drop them once
            # clean, so a 26 GB merge does not push everything else out of the page cache.
            os.posix_fadvise(self._fd, offset, n, os.POSIX_FADV_DONTNEED)

    def close(self) -> int:
        """Close; returns the bytes compared (the file size once every block was checked)."""
        os.close(self._fd)
        return self.pos


class SourcePool:
    """Open input files; a base shard's fallback tensors are freed when the next one starts."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self._open: dict[Path, TensorSource] = {}
        self._last_base: Path | None = None

    def get(self, path: Path, origin: str) -> TensorSource:
        if origin == "base" and path != self._last_base:
            if self._last_base is not None and self._last_base in self._open:
                self._open[self._last_base].close()  # fds reopen lazily; frees fallback loads
            self._last_base = path
        src = self._open.get(path)
        if src is None:
            src = self._open[path] = TensorSource(self.plan.files[path])
        return src

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()


# (quota file, period file or None when the quota file holds both): cgroup v2, then v1.
CGROUP_QUOTA_FILES: tuple[tuple[str, str | None], ...] = (
    ("/sys/fs/cgroup/cpu.max", None),
    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us"),
)


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``, v1 ``cfs_quota_us``), in cores;
    None when there is none. A container limited to 4 CPUs on a 64-core host sees 64 cores in
    its affinity mask, and 63 torch threads there would mostly wait for quota."""
    for quota_file, period_file in CGROUP_QUOTA_FILES:
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file is not None:
                with open(period_file) as f:
                    fields.append(f.read().strip())
        except OSError:
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, int(quota + 0.5)))
    return max(1, n)


def compute_threads() -> int:
    """Torch threads for CPU merging: every core but one, which the writer and hasher threads
    share (together they cost about as much CPU as the maths: reading back, hashing, writing).

    An OpenMP pool that spins waiting for a core the writer holds runs an order of magnitude
    slower (measured on 2 cores: a 1M-element float16->float32 copy takes 0.5 ms on one thread,
    1.5 ms on two, 15 ms on two next to a sha256 thread).
    """
    return max(1, cores() - 1)


# Beyond this many workers the maths outruns the one sha256 stream per shard (1-2 GB/s) and
# the disk, and each worker holds a float32 scratch block and an input buffer (8 MB together).
MAX_WORKERS = 8


def compute_workers() -> int:
    """Compute workers for a merge on the plain CPU device: one per core (at most
    `MAX_WORKERS`), each running torch on a single thread. The writer and hasher threads share
    those cores with them; the kernel schedules blocking threads fairly, where an OpenMP pool
    spinning at a barrier would not (measured on 2 cores, whole command: see bench/merge.md)."""
    return min(cores(), MAX_WORKERS)


def _row_plan(t: PlannedTensor, direct: bool) -> tuple[int, int]:
    """(rows in the tensor, rows per block); one block when the tensor cannot be split."""
    shape = t.shape
    if len(shape) < 2 or shape[0] == 0:
        return 1, 1
    rows = shape[0]
    if not direct or (t.lora is not None and t.lora.whole_tensor):
        return rows, rows
    cols = prod(shape[1:])
    return rows, max(1, min(rows, BLOCK_ELEMS // max(1, cols)))


class Executor:
    """Streams one plan into a partial directory."""

    def __init__(self, plan: MergePlan, out_dir: Path, device: str, *,
                 observer: Observer | None = None, durable: bool = True,
                 check_finite: bool = True, read_back: bool = True,
                 after_tensor: Callable[[PlannedTensor], None] | None = None):
        self.check_finite = check_finite
        # Called on the writer thread once a tensor's bytes are written (and read back).
        self.after_tensor = after_tensor
        self.read_back = read_back
        self.reread: dict[str, str] | None = None
        self.plan = plan
        self.out_dir = out_dir
        self.device = device
        self.observer = observer
        self.durable = durable

    def _emit(self, **kw: Any) -> None:
        if self.observer is not None:
            self.observer(MergeEvent(**kw))

    def run(self) -> dict[str, str]:
        """Write every shard; returns {shard file name: sha256 of the bytes written}.

        With ``read_back`` (the default) every block is read back from the file right after it
        is written and compared byte for byte with what was written (a mismatch raises
        MergeError at once); `self.reread` then holds, for each shard read back completely, the
        sha256 of the file as read back, which is the written bytes' sha256 since both are the
        same bytes. `verify.verify_output` compares the two.
        """
        import torch

        sources = SourcePool(self.plan)
        hashes: dict[str, str] = {}
        readers: dict[str, _ReadBack] = {}
        self.reread = {} if self.read_back else None
        stages: list[_Stage] = []

        def alive() -> None:
            for st in stages:
                st.check()

        pool = _Pool(QUEUE_DEPTH * 2 + 2, BLOCK_ELEMS * 4, alive)

        # Three threads: this one reads and computes; `writer` pwrites blocks in order, reads
        # each back and compares it, and fsyncs finished shards; `hasher` feeds the blocks to
        # each shard's sha256 (about 1 GB/s per core here: as costly as the maths, so it gets a
        # thread of its own) and returns the buffers to the pool.
        copy_fds: dict[Path, int] = {}  # the writer's own descriptors for plain copies

        def write_item(item: Any) -> None:
            kind, sw, *rest = item
            if kind == "block":
                offset, buf, nbytes, copy_from, task = rest
                if task is not None:
                    task.wait(alive)  # the compute workers fill blocks out of order
                data = byte_view(buf)[:nbytes]
                if copy_from is not None:
                    # A plain copy: read here, so the compute thread goes on to the next
                    # tensor meanwhile (an embedding matrix is a quarter of a small model).
                    path, at = copy_from
                    fd = copy_fds.get(path)
                    if fd is None:
                        try:
                            fd = copy_fds[path] = os.open(path, os.O_RDONLY)
                        except OSError as e:
                            raise FileCorruptError(f"cannot open for reading ({e.strerror})",
                                                   path=path, rule="unreadable") from None
                    read_exact(fd, data, at, path)
                sw.write(data, offset)
                if self.reread is not None:
                    rb = readers.get(sw.path.name)
                    if rb is None:
                        rb = readers[sw.path.name] = _ReadBack(sw.path, sw.header)
                    rb.check(offset, data)
            elif kind == "tensor":
                if self.after_tensor is not None:
                    self.after_tensor(rest[0])
            else:
                sw.finish()
                if self.reread is not None:
                    rb = readers.pop(sw.path.name, None) or _ReadBack(sw.path, sw.header)
                    if rb.close() != sw.size:
                        raise AssertionError(f"{sw.path.name}: read back {rb.pos} of "
                                             f"{sw.size} bytes")  # a bug in the executor

        def hash_item(item: Any) -> None:
            kind, sw, *rest = item
            if kind == "block":
                _, buf, nbytes, _, _ = rest
                sw.hash(byte_view(buf)[:nbytes])
                pool.give(buf)
            elif kind == "finish":
                hashes[sw.path.name] = sw.digest()
                if self.reread is not None:
                    self.reread[sw.path.name] = hashes[sw.path.name]  # compared byte for byte

        hasher = _Stage("hasher", hash_item)
        writer = _Stage("writer", write_item, hasher)
        stages += [writer, hasher]
        hasher.start()
        writer.start()
        open_shards: list[ShardWriter] = []
        total = len(self.plan.tensors)
        bytes_total = self.plan.total_size
        done = 0
        bytes_done = 0
        cuda = self.device.startswith("cuda")
        plain_cpu = self.device == "cpu"
        # Input bytes of blocks in flight, reused (a fresh 4 MB allocation per block costs page
        # faults that show up in the profile); pinned, so host-to-GPU copies run asynchronously.
        workers = compute_workers() if plain_cpu else 1
        inputs = _Pool(QUEUE_DEPTH + workers + 1, BLOCK_ELEMS * 4, alive, pinned=cuda)
        # Each worker owns a float32 scratch block on the plain "cpu" device. Any other device
        # (cuda:N; "cpu:0" in the tests, which runs this same device path on the CPU) gets each
        # block with `.to(device, float32)`, from one worker that feeds it.
        computer = _Computer(workers, BLOCK_ELEMS if plain_cpu else 0)
        threads = torch.get_num_threads()
        if not cuda:
            torch.set_num_threads(1)  # per worker: the workers are the parallelism
        ctx = _Ctx(sw=None, sources=sources, writer=writer, pool=pool, inputs=inputs,  # type: ignore[arg-type]
                   computer=computer, alive=alive)
        try:
            self._emit(phase="write", done=0, total=total, bytes_total=bytes_total)
            for shard in self.plan.shards:
                sw = ShardWriter(self.out_dir / shard.filename, shard.header, shard.data_size,
                                 durable=self.durable)
                open_shards.append(sw)
                ctx.sw = sw
                for t in shard.tensors:
                    self._tensor(t, shard, ctx)
                    if self.after_tensor is not None:
                        writer.put(("tensor", sw, t))
                    done += 1
                    bytes_done += t.nbytes
                    self._emit(phase="write", done=done, total=total, bytes_done=bytes_done,
                               bytes_total=bytes_total, tensor=t.name)
                writer.put(("finish", sw))
            computer.close()
            writer.put(None)
            writer.join()
            hasher.join()
            alive()
            return hashes
        except BaseException:
            computer.close(abort=True)
            writer.error = writer.error or RuntimeError("aborted")
            hasher.error = hasher.error or RuntimeError("aborted")
            writer.put(None)
            writer.join(timeout=10)
            hasher.join(timeout=10)
            for sw in open_shards:
                sw.abort()
            for rb in readers.values():
                rb.close()
            raise
        finally:
            sources.close()
            for fd in copy_fds.values():
                os.close(fd)
            torch.set_num_threads(threads)

    # --- one tensor ---------------------------------------------------------------------------
    def _tensor(self, t: PlannedTensor, shard: PlannedShard, ctx: _Ctx) -> None:
        if t.nbytes == 0:
            return  # an empty tensor has a header entry and no bytes
        if t.pad_rows:
            self._padded(t, shard, ctx)
            return
        info = t.source.info
        src = ctx.sources.get(t.source.file, t.source.origin)
        direct = src.direct(t.source.key)
        rows, step = _row_plan(t, direct)
        in_row = row_bytes(info)
        out_row = (t.nbytes // rows) if rows else 0
        base_offset = len(shard.header) + t.begin
        if not t.needs_compute and direct:
            # A plain copy: the file's bytes go to the writer untouched, no float round trip;
            # the writer thread reads them (`write_item`).
            first = src.file_offset(info)
            assert first is not None  # direct
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                n = (stop - start) * in_row if len(t.shape) >= 2 else info.nbytes
                ctx.writer.put(("block", ctx.sw, base_offset + start * out_row,
                                ctx.pool.take(n), n, (t.source.file, first + start * in_row),
                                None))
            return
        self._blocks(t, src, ctx, direct, rows, step, base_offset)

    def _lora_tensors(self, t: PlannedTensor, adapter: TensorSource) -> LoraTensors | None:
        if t.lora is None:
            return None
        dev = self.device

        def get(key: str) -> torch.Tensor:
            import torch

            return adapter.tensor(key).to(device=dev, dtype=torch.float32)

        spec = t.lora
        mag = get(spec.magnitude).reshape(-1) if spec.magnitude is not None else None
        return LoraTensors(A=get(spec.a), B=get(spec.b), magnitude=mag)

    def _blocks(self, t: PlannedTensor, src: TensorSource, ctx: _Ctx, direct: bool,
                rows: int, step: int, base_offset: int) -> None:
        """Read the tensor block by block (this thread), merge and cast each block into a pool
        buffer (a compute worker), and queue it for the writer in file order."""
        import torch

        info = t.source.info
        adapter = (ctx.sources.get(self.plan.adapter_path, "adapter")
                   if t.lora is not None or t.lora_bias is not None else None)
        lt = self._lora_tensors(t, adapter) if adapter is not None else None
        lbias = (adapter.tensor(t.lora_bias).to(device=self.device, dtype=torch.float32)  # type: ignore[union-attr]
                 if t.lora_bias is not None else None)
        in_dt = torch_dtype(info.dtype)
        out_dt = torch_dtype(t.dtype)
        narrows = (in_dt.is_floating_point and out_dt.is_floating_point
                   and torch.finfo(out_dt).max < torch.finfo(in_dt).max)
        whole = None if direct else src.tensor(t.source.key)
        in_row = row_bytes(info)
        out_row = (t.nbytes // rows) if rows else 0
        shape_tail = t.shape[1:] if len(t.shape) >= 2 else t.shape
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            n_out = (stop - start) * out_row if len(t.shape) >= 2 else t.nbytes
            n_in = (stop - start) * in_row if len(t.shape) >= 2 else info.nbytes
            block_shape = ((stop - start), *shape_tail) if len(t.shape) >= 2 else t.shape
            out_buf = ctx.pool.take(n_out)
            in_buf = None
            if whole is not None:
                x = whole[start:stop] if len(t.shape) >= 2 else whole
            else:
                in_buf = ctx.inputs.take(n_in)
                if n_in:
                    src.read_into(t.source.key, start, stop - start, byte_view(in_buf)[:n_in])
                x = in_buf[:n_in].view(in_dt).view(block_shape)
            out_view = out_buf[:n_out].view(out_dt).view(block_shape)

            def merge_block(work: torch.Tensor | None, x: torch.Tensor = x,
                            out_view: torch.Tensor = out_view, in_buf: Any = in_buf,
                            block_shape: tuple[int, ...] = block_shape, start: int = start,
                            stop: int = stop) -> None:
                try:
                    if lt is None and lbias is None:
                        # A dtype change only: one rounding; narrowing (bf16 -> fp16) can
                        # overflow.
                        if (self.check_finite and narrows and x.is_floating_point()
                                and not self._in_range(x, out_dt)):
                            raise self._overflow(t)
                        out_view.copy_(x)
                        return
                    w = self._float32(x, block_shape, work)
                    if lt is not None:
                        apply_rows(w.view(stop - start, -1), t.lora, lt, start, stop)  # type: ignore[arg-type]
                    if lbias is not None:
                        apply_bias(w, lbias, t.bias_scaling)
                    finite = not self.check_finite or self._in_range(w, out_dt)
                    if w.device.type != "cpu":
                        w = w.to(out_dt)  # round on the device, move half the bytes
                    out_view.copy_(w)  # the one rounding to the output dtype
                    if not finite:
                        raise self._overflow(t)
                finally:
                    if in_buf is not None:
                        ctx.inputs.give(in_buf)  # the input bytes are no longer needed

            task = _Task(merge_block)
            ctx.computer.submit(task, ctx.alive)
            ctx.writer.put(("block", ctx.sw, base_offset + start * out_row, out_buf, n_out,
                            None, task))

    def _padded(self, t: PlannedTensor, shard: PlannedShard, ctx: _Ctx) -> None:
        """The source's rows in the output dtype, then ``t.pad_rows`` rows of their mean.

        Two passes over the source in row blocks (the mean first); no LoRA (the planner refuses
        LoRA on a padded tensor).
        """

        from llava_doctor.merge.padding import mean_row

        src = ctx.sources.get(t.source.file, t.source.origin)
        key = t.source.key
        out_dt = torch_dtype(t.dtype)
        in_rows = t.source.info.shape[0]
        out_row = t.nbytes // t.shape[0]
        step = max(1, BLOCK_ELEMS // max(1, prod(t.shape[1:])))
        mean = mean_row(src, key, step).to(out_dt)
        if self.check_finite and out_dt.is_floating_point and not self._in_range(mean, out_dt):
            raise self._overflow(t)
        base_offset = len(shard.header) + t.begin
        for start in range(0, t.shape[0], step):
            stop = min(t.shape[0], start + step)
            n_out = (stop - start) * out_row
            out_buf = ctx.pool.take(n_out)
            out_view = out_buf[:n_out].view(out_dt).view((stop - start, *t.shape[1:]))
            if start < in_rows:
                own = min(stop, in_rows)
                x = src.rows(key, start, own)
                if (self.check_finite and x.is_floating_point() and out_dt.is_floating_point
                        and not self._in_range(x, out_dt)):
                    raise self._overflow(t)
                out_view[:own - start].copy_(x)
                out_view[own - start:].copy_(mean)
            else:
                out_view.copy_(mean)
            ctx.writer.put(("block", ctx.sw, base_offset + start * out_row, out_buf, n_out,
                            None, None))

    def _overflow(self, t: PlannedTensor) -> MergeError:
        where = self.plan.adapter_path if t.lora is not None else t.source.file
        return MergeError(
            f"merged tensor '{t.name}' has values that are NaN or too large for {t.dtype}"
            + (" (the LoRA delta overflows it)" if t.lora is not None else ""), path=where,
            hint="merge with --dtype bfloat16 or float32 (LD503), or check the inputs for "
                 "NaN/Inf (LD205)")

    @staticmethod
    def _in_range(w: torch.Tensor, out_dt: torch.dtype) -> bool:
        """No NaN and nothing the output dtype rounds to infinity (one reduction pass;
        `isfinite(...).all()` is ten times slower on CPU)."""
        import torch

        if w.numel() == 0:
            return True
        lo, hi = torch.aminmax(w)
        top = torch.finfo(out_dt).max if out_dt.is_floating_point else float("inf")
        return bool(-top <= float(lo) and float(hi) <= top)  # False for NaN

    def _float32(self, x: torch.Tensor, shape: tuple[int, ...],
                 work: torch.Tensor | None) -> torch.Tensor:
        import torch

        if work is not None:
            n = x.numel()
            w = work[:n] if n <= work.numel() else torch.empty(n, dtype=torch.float32)
            w = w.view(shape)
            w.copy_(x)
            return w
        # copy=True: the block is merged in place, and `x` may be a cached source tensor.
        return x.to(device=self.device, dtype=torch.float32, non_blocking=True, copy=True)
