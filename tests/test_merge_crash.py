"""A merge that dies never leaves an OUT that looks complete, and the next run cleans up.

* `LLAVA_DOCTOR_TEST_ABORT_AFTER_WRITES=N` makes `python -m llava_doctor merge` SIGKILL itself
  right after its N-th write (tensor blocks, JSON files, copies, renames);
* a parent SIGKILLs the merge at random moments while it writes;
* `RLIMIT_FSIZE` (set in the child) makes the disk "full": exit 1, one line, no OUT.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_doctor.artifacts.safetensors_header import read_safetensors_header
from llava_doctor.fixtures import TINY, build_base, build_lora, build_pretrain
from llava_doctor.merge import build_plan, merge, resolve_inputs
from llava_doctor.merge.writer import ABORT_ENV


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-crash")
    base = build_base(root / "vicuna-tiny", TINY)
    pre = build_pretrain(root / "llava-v1.5-tiny-pretrain", TINY, base=base)
    lora = build_lora(root / "llava-v1.5-tiny-lora", TINY, base=base, projector_from=pre)
    return {"root": root, "base": base, "lora": lora}


def cli(run: dict[str, Path], out: Path, *extra: str, env: dict[str, str] | None = None,
        preexec=None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != ABORT_ENV}
    full_env["PYTHONDONTWRITEBYTECODE"] = "1"
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "llava_doctor", "merge", str(run["lora"]),
                           "--base", str(run["base"]), "--out", str(out), "-q", *extra],
                          capture_output=True, text=True, env=full_env, preexec_fn=preexec,
                          timeout=300)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f"{out.name}.*-*"))


def assert_complete(out: Path) -> None:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        header = read_safetensors_header(out / shard)  # full validation, size included
        total += sum(t.nbytes for t in header.tensors.values())
    assert total == index["metadata"]["total_size"]
    for name in ("config.json", "generation_config.json", "tokenizer.model"):
        assert (out / name).is_file(), name


def planned_writes(run: dict[str, Path]) -> int:
    """Writes a run makes before installing OUT: shard headers, blocks, side files."""
    inputs, _ = resolve_inputs(run["lora"], run["base"], None)
    plan = build_plan(inputs)
    side = 3 + len([n for n in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                "special_tokens_map.json", "added_tokens.json")
                    if (run["base"] / n).is_file()])  # index, config, generation config
    # every tensor is one block at these dims
    return len(plan.shards) + sum(1 for t in plan.tensors if t.nbytes) + side


def recover(run: dict[str, Path], out: Path) -> None:
    """The next merge (in-process: cheaper than another interpreter) cleans up and succeeds."""
    merge(run["lora"], run["base"], out, device="cpu", overwrite=True, durable=False)
    assert_complete(out)
    assert leftovers(out) == []


def test_abort_after_every_kind_of_write_leaves_no_out(run: dict[str, Path]) -> None:
    out = run["root"] / "llava-v1.5-tiny-merged"
    total = planned_writes(run)
    # The first write (a shard header), one in the middle (a tensor block), the last (a
    # tokenizer file, just before the install rename).
    for n in (1, total // 2, total):
        r = cli(run, out, env={ABORT_ENV: str(n)})
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr)
        assert not out.exists(), f"OUT exists after a kill at write {n}"
        # Exactly one work dir: this run's; the previous killed run's was removed at start.
        assert len(leftovers(out)) == 1 and ".partial-" in leftovers(out)[0]
    # Killed right after the install rename: OUT is there and complete.
    r = cli(run, out, env={ABORT_ENV: str(total + 1)})
    assert r.returncode == -signal.SIGKILL
    assert_complete(out)
    recover(run, out)


def test_kill_during_overwrite_restores_or_replaces_old_out(run: dict[str, Path]) -> None:
    from llava_doctor.errors import MergeError

    out = run["root"] / "llava-v1.5-tiny-overwritten"
    merge(run["lora"], run["base"], out, device="cpu", durable=False)
    (out / "MARKER").write_text("old")
    total = planned_writes(run)
    # total+1: killed right after moving the old OUT aside, before installing the new one.
    r = cli(run, out, "--overwrite", env={ABORT_ENV: str(total + 1)})
    assert r.returncode == -signal.SIGKILL
    assert not out.exists() and any(".old-" in n for n in leftovers(out))
    # The next run puts the old OUT back first, then (no overwrite) refuses to touch it.
    with pytest.raises(MergeError, match="already exists"):
        merge(run["lora"], run["base"], out, device="cpu", durable=False)
    assert (out / "MARKER").read_text() == "old"
    assert leftovers(out) == []
    # total+2: killed after installing: the new OUT is complete, the old one goes next time.
    r = cli(run, out, "--overwrite", env={ABORT_ENV: str(total + 2)})
    assert r.returncode == -signal.SIGKILL
    assert_complete(out)
    assert not (out / "MARKER").exists()
    recover(run, out)


def test_sigkill_at_random_moments_while_writing(run: dict[str, Path]) -> None:
    out = run["root"] / "llava-v1.5-tiny-killed"
    rng = random.Random(5)
    env = {k: v for k, v in os.environ.items() if k != ABORT_ENV}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    outcomes = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "llava_doctor", "merge", str(run["lora"]),
                                 "--base", str(run["base"]), "--out", str(out), "-q",
                                 "--overwrite"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Wait for the work directory to appear, then strike somewhere in the write phase.
        deadline = time.monotonic() + 120
        while not any(".partial-" in n for n in leftovers(out)) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        outcomes.append(proc.wait())
        if out.exists():
            assert_complete(out)  # a run that finished first; never a half-written OUT
    assert -signal.SIGKILL in outcomes
    recover(run, out)


def test_file_size_limit_is_a_clean_disk_full_error(run: dict[str, Path]) -> None:
    out = run["root"] / "llava-v1.5-tiny-full"

    def small_files() -> None:  # in the child: every file it writes stops at 64 KB
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = cli(run, out, preexec=small_files)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("llava-doctor: error: ")
    assert "file size limit exceeded while sizing the shard to" in lines[0]
    assert "nothing was written to --out" in lines[0]
    assert not out.exists() and leftovers(out) == []


def test_disk_full_in_the_middle_of_a_shard(run: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """A disk that fills while blocks are written (here: the up-front sizing skipped, so the
    file-size limit hits a block write in the writer thread): the error reaches the caller and
    the partial dir is removed."""
    import llava_doctor.merge.writer as writer

    monkeypatch.setattr(writer.ShardWriter, "_reserve", lambda self: None)
    out = tmp_path / "llava-v1.5-tiny-midway"
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    from llava_doctor.errors import MergeError

    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, hard))
        with pytest.raises(MergeError) as exc:
            merge(run["lora"], run["base"], out, device="cpu", durable=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "file size limit exceeded while writing the shard" in str(exc.value)
    assert not out.exists() and leftovers(out) == []


def test_sigterm_unwinds_cleanly(run: dict[str, Path]) -> None:
    """SIGTERM (and Ctrl-C) stop the merge like an error: work dir removed, one line, exit 130."""
    out = run["root"] / "llava-v1.5-tiny-terminated"
    env = {k: v for k, v in os.environ.items() if k != ABORT_ENV}
    for _ in range(3):  # the merge of the tiny run can finish before the signal lands: retry
        proc = subprocess.Popen([sys.executable, "-m", "llava_doctor", "merge", str(run["lora"]),
                                 "--base", str(run["base"]), "--out", str(out), "-q",
                                 "--overwrite"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not leftovers(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 130:
            assert err == f"llava-doctor: aborted; nothing was written to {out}\n"
            assert not out.exists() and leftovers(out) == []
            return
        assert proc.returncode == 0 and leftovers(out) == []  # finished first: complete
        assert_complete(out)
    pytest.fail("the merge finished before SIGTERM three times in a row")


def test_interrupt_just_after_the_work_dir_is_created_removes_it(
        run: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C/SIGTERM can land while pathlib's mkdir is still returning: the empty work dir it
    just made must not outlive the run (seen as an empty OUT.partial-<pid> after SIGTERM)."""
    out = run["root"] / "llava-v1.5-tiny-interrupted-mkdir"
    real_mkdir = Path.mkdir

    def mkdir_then_interrupt(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]
        if ".partial-" in self.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge(run["lora"], run["base"], out, device="cpu", durable=False)
    monkeypatch.undo()
    assert not out.exists() and leftovers(out) == []
