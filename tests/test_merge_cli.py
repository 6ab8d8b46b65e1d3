"""`llava-doctor merge` on the command line: exit codes, one-line errors, refusals, summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_doctor.cli import main
from llava_doctor.fixtures import TINY, build_base, build_lora, build_pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-cli")
    base = build_base(root / "vicuna-tiny", TINY)
    pre = build_pretrain(root / "llava-v1.5-tiny-pretrain", TINY, base=base)
    lora = build_lora(root / "llava-v1.5-tiny-lora", TINY, base=base, projector_from=pre)
    # A run whose projector was frozen (non_lora_trainables empty), alone in its folder so no
    # sibling *-pretrain/ is found: nothing provides a projector (LD302).
    frozen = build_lora(root / "alone" / "llava-v1.5-tiny-frozen-lora", TINY, base=base,
                        non_lora_style="empty")
    return {"root": root, "base": base, "lora": lora, "pretrain": pre, "frozen": frozen}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["merge", *argv])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_success_prints_the_summary(run: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-v1.5-tiny-merged"
    rc, stdout, stderr = _run([str(run["lora"]), "--base", str(run["base"]), "--out", str(out),
                               "--device", "cpu"], capsys)
    assert rc == 0, stderr
    assert stderr == ""  # no progress bar without a terminal
    assert f"merged {run['lora']} -> {out}" in stdout
    assert "25 written in 1 shard(s)" in stdout
    assert "14 received a LoRA delta (14 LoRA modules applied)" in stdout
    assert "projector  non_lora_trainables.bin" in stdout
    assert ("verified   header and sha256 of 1 shard(s) as re-read from disk; 5 sampled "
            "tensors recomputed from the inputs") in stdout
    assert "device     cpu" in stdout and "peak memory" in stdout
    # The vicuna generation config is fixed and said so; the check that warned about it
    # (LD404) is not repeated since the merge handled it.
    assert "set do_sample=true" in stdout and "LD404" not in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"]
    assert cfg["model_type"] == "llava_llama" and cfg["torch_dtype"] == "float16"
    assert "quantization_config" not in cfg
    assert json.loads((out / "generation_config.json").read_text())["do_sample"] is True
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (run["base"] / name).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert index["metadata"]["total_size"] == sum(
        (2 * torch.Size(s).numel()) for s in _shapes(out))


def _shapes(out: Path) -> list[list[int]]:
    from llava_doctor.artifacts.safetensors_header import read_safetensors_header

    return [list(t.shape) for p in sorted(out.glob("model-*.safetensors"))
            for t in read_safetensors_header(p).tensors.values()]


def test_refuses_on_check_errors_and_shows_them(run: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "llava-v1.5-tiny-empty-lora"
    shutil.copytree(run["lora"], broken)
    save_file({}, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "llava-v1.5-tiny-merged"
    rc, stdout, stderr = _run([str(broken), "--base", str(run["base"]), "--out", str(out)],
                              capsys)
    assert rc == 1
    assert "LD105" in stdout  # the findings, rendered like `check`
    assert stderr.strip().splitlines() == [
        "llava-doctor: error: the checks found 1 error(s) (LD105); nothing was merged; fix them "
        "(`llava-doctor fix` repairs many), or pass --force to merge anyway"]
    assert not out.exists()


def test_force_merges_past_errors_and_says_what_is_missing(
        run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-v1.5-tiny-noproj-merged"
    argv = [str(run["frozen"]), "--base", str(run["base"]), "--out", str(out)]
    rc, stdout, stderr = _run(argv, capsys)
    assert rc == 1 and "(LD302)" in stderr and not out.exists()
    rc, stdout, stderr = _run([*argv, "--force"], capsys)
    assert rc == 0, stderr
    assert "projector  none" in stdout
    assert "merged model has no mm_projector (LD302)" in stdout
    assert not any("mm_projector" in n for n in json.loads(
        (out / "model.safetensors.index.json").read_text())["weight_map"])


def test_stage1_projector_from_the_command_line(run: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-v1.5-tiny-stage1-merged"
    rc, stdout, stderr = _run([str(run["frozen"]), "--base", str(run["base"]), "--out", str(out),
                               "--projector", str(run["pretrain"] / "mm_projector.bin")], capsys)
    assert rc == 0, stderr
    assert f"projector  stage-1 projector {run['pretrain'] / 'mm_projector.bin'} (--projector)" \
        in stdout


def test_existing_out_needs_overwrite(run: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-v1.5-tiny-merged"
    out.mkdir()
    (out / "MARKER").write_text("keep me")
    argv = [str(run["lora"]), "--base", str(run["base"]), "--out", str(out)]
    rc, _, stderr = _run(argv, capsys)
    assert rc == 1
    assert stderr == (f"llava-doctor: error: {out}: already exists; refusing to overwrite it; "
                      "pass --overwrite, or choose another --out\n")
    assert (out / "MARKER").read_text() == "keep me"
    rc, _, stderr = _run([*argv, "--overwrite"], capsys)
    assert rc == 0, stderr
    assert not (out / "MARKER").exists() and (out / "config.json").is_file()
    assert not list(tmp_path.glob("*.old-*")) and not list(tmp_path.glob("*.partial-*"))


@pytest.mark.parametrize("extra,message", [
    (["--dtype", "int8"],
     "unknown --dtype 'int8'; choose one of: float16, bfloat16, float32, auto"),
    (["--max-shard-size", "lots"], "cannot read size 'lots'; write it like 5GB, 500MB or 2GiB"),
    (["--device", "tpu"], "unknown --device 'tpu'; use auto, cpu, cuda or cuda:N"),
])
def test_usage_errors_exit_2(run: dict[str, Path], tmp_path: Path, extra: list[str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-merged"
    rc, _, stderr = _run([str(run["lora"]), "--base", str(run["base"]), "--out", str(out), *extra],
                         capsys)
    assert rc == 2
    assert stderr == f"llava-doctor: error: {message}\n"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_one_line_usage_error(run: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, stderr = _run([str(run["lora"]), "--base", str(run["base"]), "--out",
                          str(tmp_path / "llava-merged"), "--device", "cuda:1"], capsys)
    assert rc == 2
    assert stderr == ("llava-doctor: error: --device cuda:1: torch sees no CUDA GPU on this "
                      "machine; use --device cpu (or auto, which picks a GPU when there is one)\n")


def test_out_inside_the_lora_dir_is_refused(run: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, stderr = _run([str(run["lora"]), "--base", str(run["base"]), "--out",
                          str(run["lora"] / "merged")], capsys)
    assert rc == 2
    assert "--out overlaps the LoRA directory" in stderr


def test_small_shards_and_no_verify(run: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-v1.5-tiny-sharded"
    rc, stdout, stderr = _run([str(run["lora"]), "--base", str(run["base"]), "--out", str(out),
                               "--max-shard-size", "40KB", "--no-verify", "--dtype", "bfloat16"],
                              capsys)
    assert rc == 0, stderr
    assert "verified   no (--no-verify)" in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    from llava_doctor.artifacts.safetensors_header import read_safetensors_header

    sizes = []
    for s in shards:
        h = read_safetensors_header(out / s)
        data = sum(t.nbytes for t in h.tensors.values())
        assert data <= 40_000 or len(h.tensors) == 1
        assert {t.dtype for t in h.tensors.values()} == {"BF16"}
        sizes.append(data)
    assert index["metadata"]["total_size"] == sum(sizes)


def test_out_name_traps_are_reported(run: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, _ = _run([str(run["lora"]), "--base", str(run["base"]), "--out",
                          str(tmp_path / "llava-prompt-tuned-merged")], capsys)
    assert rc == 0
    assert ("--out name 'llava-prompt-tuned-merged' contains 'mpt': LLaVA's loader would build "
            "LlavaMptForCausalLM for this Llama model; rename it") in stdout
    rc, stdout, _ = _run([str(run["lora"]), "--base", str(run["base"]), "--out",
                          str(tmp_path / "vicuna-merged")], capsys)
    assert rc == 0
    assert "--out name 'vicuna-merged' lacks 'llava'" in stdout


def test_stale_partial_dirs_of_dead_runs_are_removed(run: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-v1.5-tiny-merged"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"{out.name}.partial-{dead}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    live = tmp_path / f"{out.name}.partial-{os.getppid()}"  # a running process: not ours to touch
    live.mkdir()
    other = tmp_path / f"other.partial-{dead}"  # another OUT's leftovers: not ours either
    other.mkdir()
    rc, _, stderr = _run([str(run["lora"]), "--base", str(run["base"]), "--out", str(out)],
                         capsys)
    assert rc == 0, stderr
    assert not stale.exists() and live.is_dir() and other.is_dir()


def test_python_dash_m_entry_point(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "llava-v1.5-tiny-merged"
    r = subprocess.run([sys.executable, "-m", "llava_doctor", "merge", str(run["lora"]),
                        "--base", str(run["base"]), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "merged " in r.stdout


def test_base_defaults_to_the_one_adapter_config_records(run: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-v1.5-tiny-merged"
    rc, stdout, stderr = _run([str(run["lora"]), "--out", str(out)], capsys)
    assert rc == 0, stderr
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == str(run["base"])


def test_too_little_free_space_is_refused_before_writing(
        run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    real = os.statvfs

    def tiny(path: object) -> os.statvfs_result:  # the real file system, with 4 blocks free
        st = real(path)  # type: ignore[arg-type]
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 4, 4, st.f_files,
                                  st.f_ffree, st.f_favail, st.f_flag, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", tiny)
    out = tmp_path / "llava-v1.5-tiny-merged"
    argv = [str(run["lora"]), "--base", str(run["base"]), "--out", str(out)]
    rc, stdout, stderr = _run(argv, capsys)
    assert rc == 1
    assert "LD601" in stdout and "(LD601)" in stderr  # the preflight check says it first
    assert not out.exists() and not list(tmp_path.glob("*.partial-*"))
    # With --force the checks no longer stop it, but the merge's own guard still does.
    rc, _, stderr = _run([*argv, "--force"], capsys)
    assert rc == 1
    assert stderr.startswith("llava-doctor: error: ") and "GB free" in stderr
    assert "needs about" in stderr and not out.exists()


class _Exited(Exception):
    def __init__(self, code: int):
        self.code = code


@pytest.mark.parametrize(("ending", "code"), [(None, 0), (SystemExit(None), 0),
                                              (SystemExit(0), 0), (SystemExit(4), 4),
                                              (SystemExit("no such run"), 1)])
@pytest.mark.parametrize("torch_loaded", [True, False])
def test_console_keeps_mains_exit_status(ending: SystemExit | None, code: int,
                                         torch_loaded: bool, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The script's entry point skips interpreter teardown only once torch is loaded, and
    exits with main's status either way (a message passed to sys.exit is printed, status 1)."""
    from llava_doctor import cli

    def fake_main() -> None:
        print("summary line")
        if ending is not None:
            raise ending

    def fake_exit(status: int) -> None:
        raise _Exited(status)

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    if torch_loaded:
        monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or object())
    else:
        monkeypatch.delitem(sys.modules, "torch", raising=False)
    with pytest.raises(_Exited if torch_loaded else SystemExit) as exc:
        cli.console()
    assert exc.value.code == code
    out, err = capsys.readouterr()
    assert out == "summary line\n"
    assert err == ("no such run\n" if code == 1 else "")
