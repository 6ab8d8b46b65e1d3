"""`llava-doctor env`: metadata reading, the llava import probe, the GPU query, LD901-LD906.

Venv-independent: the packages are fake distributions (`*.dist-info/METADATA`) written into a
temp folder that goes first on the import path, so the results do not depend on what this venv
has installed; the `llava` packages are real packages on the child's sys.path.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import jsonschema
import pytest

import llava_doctor
from llava_doctor.artifacts import installed, probes
from llava_doctor.cli import main
from llava_doctor.commands.schema import env_schema, render_schema, report_schema
from llava_doctor.envinfo import EnvOptions, adapter_key_layout, gather
from llava_doctor.models import Consumer, Gpu

PINNED_ENV = Path(__file__).parent / "data" / "env.schema.json"


def dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A fake installed distribution: `name-version.dist-info/METADATA` (what pip writes)."""
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (d / "METADATA").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def torch_dist(site: Path, version: str, cuda: str | None, hip: str | None = None) -> None:
    dist(site, "torch", version)
    (site / "torch").mkdir()
    # What torch's generated version.py looks like (annotated assignments).
    (site / "torch" / "version.py").write_text(
        "from typing import Optional\n\n__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip']\n"
        f"__version__ = '{version}'\ndebug = False\ncuda: Optional[str] = {cuda!r}\n"
        f"git_version = 'abc'\nhip: Optional[str] = {hip!r}\n", encoding="utf-8")


LLAVA_INIT = "from .model import LlavaLlamaForCausalLM\n"
# LLaVA's llava/model/__init__.py, verbatim in spirit: the bare except swallows the real error.
LLAVA_MODEL_INIT = ("try:\n    from .language_model.llava_llama import LlavaLlamaForCausalLM, "
                    "LlavaConfig\nexcept:\n    pass\n")


def llava_pkg(site: Path, llava_llama: str, init: str = LLAVA_INIT) -> Path:
    pkg = site / "llava"
    (pkg / "model" / "language_model").mkdir(parents=True)
    (pkg / "__init__.py").write_text(init, encoding="utf-8")
    (pkg / "model" / "__init__.py").write_text(LLAVA_MODEL_INIT, encoding="utf-8")
    (pkg / "model" / "language_model" / "llava_llama.py").write_text(llava_llama, encoding="utf-8")
    return pkg


BROKEN_LLAMA = "import flash_attn_missing_for_this_test\n"
WORKING_LLAMA = "class LlavaConfig:\n    pass\n\n\nclass LlavaLlamaForCausalLM:\n    pass\n"
LLAVA_REQUIRES = ("torch==2.1.2", "transformers==4.37.2", "peft", "gradio==4.16.0",
                  "accelerate==0.21.0", 'deepspeed==0.12.6; extra == "train"')


@pytest.fixture
def site(tmp_path: Path) -> Path:
    s = tmp_path / "site"
    s.mkdir()
    return s


def opts(site: Path, **kw: object) -> EnvOptions:
    base: dict[str, object] = {"path": (str(site),), "gpu": "none", "timeout": 30.0}
    base.update(kw)
    return EnvOptions(**base)  # type: ignore[arg-type]


def codes(report: object) -> list[str]:
    return [f.code for f in report.findings]  # type: ignore[attr-defined]


# --- metadata -------------------------------------------------------------------------------

def test_versions_come_from_metadata_and_nothing_is_imported(site: Path) -> None:
    dist(site, "transformers", "4.46.3")
    dist(site, "peft", "0.13.2")
    torch_dist(site, "2.1.2+cu121", "12.1")
    assert installed.package_status("transformers", [str(site)]).version == "4.46.3"
    assert installed.package_status("bitsandbytes", [str(site)]).version is None
    build = installed.torch_build([str(site)])
    assert (build.version, build.cuda, build.hip, build.build) == ("2.1.2+cu121", "12.1", None,
                                                                   "cuda 12.1")
    report = gather((), opts(site))
    got = {p.name: p.version for p in report.packages}
    assert got == {"torch": "2.1.2+cu121", "transformers": "4.46.3", "peft": "0.13.2",
                   "safetensors": None, "accelerate": None, "bitsandbytes": None,
                   "tokenizers": None, "sentencepiece": None, "llava": None}
    # No peft/ folder beside the dist-info: the location is where the metadata was found.
    assert report.package("peft").location == str(site)  # type: ignore[union-attr]
    assert report.llava.location is None and report.llava.ok is None
    assert report.findings == []


def test_gathering_imports_none_of_the_packages_it_reports() -> None:
    import subprocess

    code = ("import sys\nfrom llava_doctor.envinfo import gather\ngather()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', "
            "'bitsandbytes', 'llava') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_rocm_and_cpu_builds(site: Path, tmp_path: Path) -> None:
    torch_dist(site, "2.3.0+rocm6.0", None, hip="6.0.32830")
    assert installed.torch_build([str(site)]).build == "rocm 6.0.32830"
    other = tmp_path / "cpu"
    other.mkdir()
    torch_dist(other, "2.13.0+cpu", None)
    assert installed.torch_build([str(other)]).build == "cpu"
    assert installed.torch_build([str(tmp_path / "empty")]).build == "not installed"


def test_the_first_distribution_on_the_path_wins(site: Path, tmp_path: Path) -> None:
    later = tmp_path / "later"
    dist(later, "peft", "0.21.2")
    dist(site, "peft", "0.4.0")
    assert installed.package_status("peft", [str(site), str(later)]).version == "0.4.0"
    assert installed.package_status("peft", [str(later), str(site)]).version == "0.21.2"


def test_overrides_stand_for_the_installed_versions(site: Path) -> None:
    dist(site, "peft", "0.21.2")
    report = gather((), opts(site, peft_version="0.5.0", transformers_version="4.51.0"))
    peft = report.package("peft")
    assert peft is not None
    assert (peft.version, peft.installed, peft.source) == ("0.5.0", "0.21.2", "--peft-version")
    tr = report.package("transformers")
    assert tr is not None and (tr.version, tr.installed) == ("4.51.0", None)
    # LD905: peft < 0.6 cannot merge float16 on CPU (F27).
    (f,) = report.findings
    assert f.code == "LD905" and f.severity.value == "warning" and f.target == "environment"
    assert f.message.startswith("peft 0.5.0 computes LoRA deltas in float16 on CPU")


@pytest.mark.parametrize(("version", "clauses", "ok"), [
    ("4.46.3", [("==", "4.37.2")], False),
    ("4.37.2", [("==", "4.37.2")], True),
    ("2.1.2+cu121", [("==", "2.1.2")], True),
    ("2.1.2+cu121", [("==", "2.1.*")], True),
    ("2.2.0", [("==", "2.1.*")], False),
    ("0.21.2", [("~=", "0.21.0")], True),
    ("0.22.0", [("~=", "0.21.0")], False),
    ("1.0", [(">=", "0.9"), ("<", "1.0.1")], True),
    ("0.10.0", [(">", "0.9.9"), ("!=", "0.10")], False),
])
def test_requirement_clauses(version: str, clauses: list[tuple[str, str]], ok: bool) -> None:
    assert installed.satisfies(version, clauses) is ok


def test_requirement_lines() -> None:
    r = installed.parse_requirement('deepspeed==0.12.6; extra == "train"')
    assert r is not None and r.for_extra and r.clauses == (("==", "0.12.6"),)
    r = installed.parse_requirement("markdown2[all]")
    assert r is not None and (r.name, r.clauses, r.marker) == ("markdown2", (), None)
    r = installed.parse_requirement("torch (>=2.1,<3)")
    assert r is not None and r.text == "torch>=2.1,<3"


# --- the llava import probe (F31) -----------------------------------------------------------

def test_a_broken_llava_is_LD901_with_the_error_llava_swallowed(site: Path) -> None:
    dist(site, "llava", "1.2.2.post1", LLAVA_REQUIRES)
    dist(site, "transformers", "4.46.3")
    torch_dist(site, "2.1.2", None)
    pkg = llava_pkg(site, BROKEN_LLAMA)
    report = gather((), opts(site))
    assert report.llava.ok is False
    assert report.llava.error == ("ImportError: cannot import name 'LlavaLlamaForCausalLM' from "
                                  f"'llava.model' ({pkg / 'model' / '__init__.py'})")
    assert report.llava.real_error == ("ModuleNotFoundError: No module named "
                                       "'flash_attn_missing_for_this_test'")
    assert codes(report) == ["LD901", "LD902"]
    ld901, ld902 = report.findings
    assert ld901.severity.value == "error" and ld901.path == str(pkg)
    assert ld901.message == (
        f"`from llava.model import LlavaLlamaForCausalLM` fails with the llava package at {pkg}: "
        f"`{report.llava.error}`; the error llava/model/__init__.py swallowed is "
        "`ModuleNotFoundError: No module named 'flash_attn_missing_for_this_test'`. LLaVA's "
        "merge_lora_weights.py, model builder and eval scripts all stop there. Install the "
        "versions LLaVA pins (`pip install -e .` in the LLaVA checkout; LD902 lists pins that "
        "are not met), or merge with `llava-doctor merge`, which does not import llava")
    # Only the pins of packages the merge code uses; gradio and the `train` extra are ignored.
    assert ld902.evidence == {
        "required": {"transformers": "transformers==4.37.2", "peft": "peft",
                     "accelerate": "accelerate==0.21.0"},
        "installed": {"transformers": "4.46.3", "peft": "not installed",
                      "accelerate": "not installed"}}
    assert ld902.message.startswith("llava 1.2.2.post1 requires transformers==4.37.2 (installed: "
                                    "4.46.3), peft (installed: not installed), accelerate==0.21.0 "
                                    "(installed: not installed);")


def test_a_working_llava_checkout_without_metadata(site: Path) -> None:
    pkg = llava_pkg(site, WORKING_LLAMA)
    report = gather((), opts(site))
    assert report.llava.location == str(pkg) and report.llava.ok is True
    llava = report.package("llava")
    assert llava is not None and (llava.version, llava.source) == (None, "import path")
    assert report.findings == []  # LD902 needs metadata: skipped, not a finding


def test_a_hanging_import_is_a_timeout_not_a_hang(site: Path) -> None:
    llava_pkg(site, WORKING_LLAMA, init="import time\ntime.sleep(60)\n")
    t0 = time.monotonic()
    report = gather((), opts(site, timeout=2.0))
    assert time.monotonic() - t0 < 20
    assert report.llava.ok is None
    assert report.llava.error == "the import probe did not finish within 2 s"
    assert codes(report) == ["LD906"]
    assert report.findings[0].severity.value == "info"
    from llava_doctor.report.env_text import render_env_text

    text = render_env_text(report)
    assert "import not checked" in text
    assert "\n[•] Probes and other findings\n    • LD906 env-probe-incomplete\n" in text


def test_an_interpreter_crash_in_the_import_is_reported(site: Path) -> None:
    llava_pkg(site, WORKING_LLAMA, init="import os\nos._exit(7)\n")
    report = gather((), opts(site))
    assert report.llava.ok is None
    assert report.llava.error == "the import probe exited with status 7: no output"
    assert codes(report) == ["LD906"]


# --- GPUs -----------------------------------------------------------------------------------

def fake_nvidia_smi(bin_dir: Path, out: str, rc: int) -> None:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{out}\nEOF\nexit {rc}\n", encoding="utf-8")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_a_cuda_build_without_a_gpu_is_LD904(site: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    torch_dist(site, "2.1.2+cu121", "12.1")
    fake_nvidia_smi(tmp_path / "bin", "No devices were found", 6)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    report = gather((), opts(site, gpu="auto"))
    assert report.gpus.method == "nvidia-smi" and report.gpus.gpus == []
    (f,) = report.findings
    assert (f.code, f.severity.value) == ("LD904", "warning")
    assert f.message.startswith("torch 2.1.2+cu121 is a cuda 12.1 build but nvidia-smi sees no "
                                "GPU: LLaVA's builder")


def test_nvidia_smi_gpus_and_cuda_visible_devices(site: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    torch_dist(site, "2.1.2+cu121", "12.1")
    fake_nvidia_smi(tmp_path / "bin", "0, GPU-aaaa, NVIDIA H100 80GB HBM3, 81559, 80000\n"
                    "1, GPU-bbbb, NVIDIA H100 80GB HBM3, 81559, 1024", 0)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    report = gather((), opts(site, gpu="auto"))
    assert report.gpus.gpus == [Gpu(index=0, name="NVIDIA H100 80GB HBM3",
                                    memory_total_bytes=81559 * 2**20,
                                    memory_free_bytes=1024 * 2**20)]
    assert report.findings == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert codes(gather((), opts(site, gpu="auto"))) == ["LD904"]


def test_visible_filter_follows_cuda_numbering() -> None:
    gpus = [Gpu(index=i, name=f"g{i}") for i in range(3)]
    uuids = {0: "GPU-a0", 1: "GPU-b1", 2: "GPU-c2"}
    assert [g.name for g in probes.visible_filter(gpus, uuids, "2,0")] == ["g2", "g0"]
    assert [g.index for g in probes.visible_filter(gpus, uuids, "2,0")] == [0, 1]
    assert [g.name for g in probes.visible_filter(gpus, uuids, "1,7,0")] == ["g1"]
    assert probes.visible_filter(gpus, uuids, "-1") == []
    assert probes.visible_filter(gpus, uuids, None) == gpus


def test_a_failing_nvidia_smi_is_LD906(site: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    torch_dist(site, "2.1.2+cu121", "12.1")
    fake_nvidia_smi(tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate "
                    "with the NVIDIA driver.", 9)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    report = gather((), opts(site, gpu="auto"))
    assert report.gpus.gpus is None
    assert codes(report) == ["LD906"]
    assert report.findings[0].message == (
        "could not list the GPUs: nvidia-smi failed: NVIDIA-SMI has failed because it couldn't "
        "communicate with the NVIDIA driver.. LD904 could not run")


def test_the_torch_probe_in_a_child(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CUDA build's metadata in front of this venv's (CPU) torch, which the child imports for
    # real: it sees no GPU, so LD904.
    torch_dist(site, "2.1.2+cu121", "12.1")
    report = gather((), EnvOptions(path=(str(site), *sys.path), gpu="torch", timeout=120))
    assert report.gpus.method == "torch" and report.gpus.error is None
    assert report.gpus.gpus == []
    assert "LD904" in codes(report)


# --- runs -----------------------------------------------------------------------------------

def test_key_layouts() -> None:
    assert adapter_key_layout([
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"]
    ) == "llava-hf>=4.52"
    assert adapter_key_layout([
        "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    ) == "llava-hf<4.52"
    assert adapter_key_layout(["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
                              ) == "llama"
    assert adapter_key_layout(["foo"]) == "unknown"
    assert adapter_key_layout([]) is None


def test_runs_report_what_they_were_written_with(scenarios: dict[str, Path], site: Path) -> None:
    dist(site, "peft", "0.5.0")
    run = scenarios["lora-qlora"]
    report = gather([run], opts(site))
    (rv,) = report.runs
    cfg = json.loads((run / "config.json").read_text())
    assert (rv.path, rv.kind, rv.peft_version, rv.key_layout, rv.quantization) == (
        str(run), "lora-output", None, "llama", "bitsandbytes 4-bit")  # peft 0.6 wrote none
    assert rv.transformers_version == cfg["transformers_version"]
    by_code = {f.code: f for f in report.findings}
    # bitsandbytes is absent from the fake site: LD903 on the run; peft 0.5.0: LD905 and the
    # run's LD201 (fields peft 0.5 does not know); LD208 the QLoRA config itself; LD602 the RAM
    # LLaVA's whole-model merge needs against this machine's.
    assert sorted(by_code) == ["LD201", "LD208", "LD602", "LD903", "LD905"]
    assert by_code["LD602"].message.startswith("LLaVA's merge_lora_weights.py would need about ")
    assert by_code["LD903"].target == str(run) and by_code["LD903"].path == str(run)
    assert by_code["LD201"].evidence["target_peft"] == "0.5.0"


# --- CLI, check --env, schema ---------------------------------------------------------------

def test_env_command_json_validates_and_exit_codes(site: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake distributions go on the real sys.path, in front of this venv's packages.
    llava_pkg(site, BROKEN_LLAMA)
    dist(site, "llava", "1.2.2.post1", ("transformers==4.37.2",))
    dist(site, "transformers", "4.46.3")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(SystemExit) as exc:
        main(["env", "--format", "json", "--gpu", "none"])
    assert exc.value.code == 1
    out = json.loads(capsys.readouterr().out)
    assert not list(jsonschema.Draft202012Validator(env_schema()).iter_errors(out))
    assert [f["code"] for f in out["findings"]] == ["LD901", "LD902"]
    assert {p["name"]: p["version"] for p in out["packages"]}["transformers"] == "4.46.3"
    with pytest.raises(SystemExit) as exc:
        main(["env", "--gpu", "none"])
    assert exc.value.code == 1
    text = capsys.readouterr().out
    assert f"[✗] llava 1.2.2.post1 at {site / 'llava'}: `from llava.model import " \
           "LlavaLlamaForCausalLM` fails" in text
    assert "\n[✓] transformers 4.46.3\n" in text
    assert "    ✗ LD901 llava-import-broken" in text
    assert "    ! LD902 llava-requirements-unmet" in text
    assert text.endswith("Found 1 error(s), 1 warning(s), 0 info in the environment.\n")
    with pytest.raises(SystemExit) as exc:
        main(["env", "--gpu", "none", "--exit-zero"])
    assert exc.value.code == 0


@pytest.mark.parametrize(("merge_with", "want", "exit_code"), [
    (None, {"LD901": "error", "LD902": "warning", "LD905": "warning"}, 1),
    ("llava", {"LD901": "error", "LD902": "warning", "LD905": "warning"}, 1),
    ("llava-doctor", {"LD901": "info", "LD902": "info", "LD905": "info"}, 0),
    ("peft", {"LD901": "info", "LD902": "info", "LD905": "warning"}, 0),
])
def test_env_severities_are_for_the_merge_named(site: Path, merge_with: str | None,
                                                want: dict[str, str], exit_code: int,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken llava and an old peft matter to LLaVA's merge; llava-doctor's imports neither,
    peft's merge does not import llava but does compute with that peft."""
    llava_pkg(site, BROKEN_LLAMA)
    dist(site, "llava", "1.2.2.post1", ("transformers==4.37.2",))
    dist(site, "transformers", "4.46.3")
    monkeypatch.syspath_prepend(str(site))
    chosen = ["--merge-with", merge_with] if merge_with else []
    with pytest.raises(SystemExit) as exc:
        main(["env", "--format", "json", "--gpu", "none", "--peft-version", "0.5.0", *chosen])
    assert exc.value.code == exit_code
    out = json.loads(capsys.readouterr().out)
    assert {f["code"]: f["severity"] for f in out["findings"]} == want
    assert out["consumer"] == (merge_with or "llava")
    with pytest.raises(SystemExit):
        main(["env", "--gpu", "none", "--peft-version", "0.5.0", *chosen])
    label = Consumer(merge_with or "llava").label
    assert f"\nseverities for: {label}\nFound " in capsys.readouterr().out
    api = llava_doctor.env(gpu="none", peft_version="0.5.0", merge_with=merge_with)
    assert {f.code: f.severity.value for f in api.findings} == want


def test_env_command_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for args, msg in ((["env", "--gpu", "cuda"], "unknown --gpu 'cuda'"),
                      (["env", "--format", "sarif"], "unknown --format 'sarif'"),
                      (["env", "/does/not/exist"], "/does/not/exist: does not exist")):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err


def test_check_env_adds_the_section_and_its_errors_fail(
        scenarios: dict[str, Path], site: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = scenarios["lora"]
    # For llava-doctor's merge the run has no error (vicuna's generation config, LD404, stops
    # only LLaVA's own merge)
    ours = ["--merge-with", "llava-doctor"]
    with pytest.raises(SystemExit) as exc:
        main(["check", str(run), "--isolated", "--fast", "--format", "json", *ours])
    assert exc.value.code == 0
    assert json.loads(capsys.readouterr().out)["env"] is None
    llava_pkg(site, BROKEN_LLAMA)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(SystemExit) as exc:
        main(["check", str(run), "--isolated", "--fast", "--format", "json", "--env", *ours])
    # A broken llava install stops LLaVA's merge, not llava-doctor's (which imports no llava).
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert not list(jsonschema.Draft202012Validator(report_schema()).iter_errors(report))
    assert [f["code"] for f in report["findings"]] == ["LD404", "LD602"]  # info for ours
    assert [(f["code"], f["severity"]) for f in report["env"]["findings"]] == [("LD901", "info")]
    assert report["env"]["consumer"] == "llava-doctor"
    assert [r["path"] for r in report["env"]["runs"]] == [str(run)]
    with pytest.raises(SystemExit) as exc:  # for LLaVA's own merge (the default) it is an error
        main(["check", str(run), "--isolated", "--fast", "--format", "json", "--env",
              "--select", "LD9"])
    assert exc.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert [(f["code"], f["severity"]) for f in report["env"]["findings"]] == [("LD901", "error")]
    assert report["env"]["consumer"] == "llava"
    with pytest.raises(SystemExit):
        main(["check", str(run), "--isolated", "--fast", "--env"])
    text = capsys.readouterr().out
    assert "\nEnvironment\n[✓] Python " in text and "    ✗ LD901 llava-import-broken" in text


def test_env_schema_matches_the_pinned_copy(capsys: pytest.CaptureFixture[str]) -> None:
    assert render_schema("env") == PINNED_ENV.read_text(encoding="utf-8"), (
        "regenerate with `llava-doctor schema env > tests/data/env.schema.json` (and bump "
        "models.SCHEMA_VERSION when the change breaks consumers)")
    schema = env_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$comment"].startswith("llava-doctor env report, schema_version ")
    with pytest.raises(SystemExit) as exc:
        main(["schema", "env"])
    assert exc.value.code == 0 and capsys.readouterr().out == render_schema("env")


def test_env_exit_codes_follow_check(capsys: pytest.CaptureFixture[str]) -> None:
    # LD905 is a warning: exit 0, and 1 under --strict.
    for extra, rc in (([], 0), (["--strict"], 1)):
        with pytest.raises(SystemExit) as exc:
            main(["env", "--gpu", "none", "--peft-version", "0.5.0", "--format", "json", *extra])
        assert exc.value.code == rc
        out = json.loads(capsys.readouterr().out)
        assert "LD905" in [f["code"] for f in out["findings"]]


def test_select_and_ignore_apply_to_the_environment_checks(
        scenarios: dict[str, Path], site: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["env", "--gpu", "none", "--peft-version", "0.5.0", "--ignore", "LD905", "--strict",
              "--format", "json"])
    assert exc.value.code == 0
    assert "LD905" not in [f["code"] for f in json.loads(capsys.readouterr().out)["findings"]]
    report = gather([scenarios["lora-qlora"]], opts(site, select=("LD2",)))
    assert sorted({f.code for f in report.findings}) == ["LD201", "LD208"]
    llava_pkg(site, BROKEN_LLAMA)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(SystemExit) as exc:
        main(["check", str(scenarios["lora"]), "--isolated", "--fast", "--env", "--ignore", "LD901",
              "--format", "json", "--merge-with", "llava-doctor"])
    assert exc.value.code == 0
    assert json.loads(capsys.readouterr().out)["env"]["findings"] == []


def test_another_interpreters_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """`--python PY`: the metadata of PY's sys.path is read from here and the probes run in PY
    (the training env is often not the one llava-doctor is installed in)."""
    import subprocess

    venv = tmp_path / "train-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = str(venv / "bin" / "python")
    path, version, exe = probes.interpreter_info(py, 60)
    site = Path(next(p for p in path if p.endswith("site-packages")))
    assert exe == py and version == ".".join(map(str, sys.version_info[:3]))
    dist(site, "transformers", "4.37.2")
    dist(site, "peft", "0.4.0")
    dist(site, "protobuf", "4.25.3")  # not among the listed packages: looked up on PY's path
    dist(site, "llava", "1.2.2", ("transformers==4.37.2", "protobuf==3.20.0"))
    llava_pkg(site, BROKEN_LLAMA)
    with pytest.raises(SystemExit) as exc:
        main(["env", "--python", py, "--gpu", "none", "--format", "json"])
    assert exc.value.code == 1
    out = json.loads(capsys.readouterr().out)
    assert out["python_executable"] == py
    got = {p["name"]: p["version"] for p in out["packages"]}
    assert (got["transformers"], got["peft"], got["torch"]) == ("4.37.2", "0.4.0", None)
    assert out["llava"]["real_error"] == ("ModuleNotFoundError: No module named "
                                          "'flash_attn_missing_for_this_test'")
    assert [f["code"] for f in out["findings"]] == ["LD901", "LD902", "LD905"]
    assert out["findings"][1]["evidence"]["installed"] == {"protobuf": "4.25.3"}


def test_the_transformers_446_environment() -> None:
    py = os.environ.get("LLAVA_DOCTOR_HF446_PYTHON")
    if not py:
        if os.environ.get("CI") == "true":
            pytest.fail("LLAVA_DOCTOR_HF446_PYTHON is not set under CI")
        pytest.skip("LLAVA_DOCTOR_HF446_PYTHON is not set")
    report = gather((), EnvOptions(python=py, gpu="none"))
    versions = {p.name: p.version for p in report.packages}
    assert (versions["transformers"], versions["peft"]) == ("4.46.3", "0.13.2")


def test_target_only_formats_show_the_environment_as_a_target(
        scenarios: dict[str, Path], site: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    llava_pkg(site, BROKEN_LLAMA)
    monkeypatch.syspath_prepend(str(site))
    run = str(scenarios["lora"])
    with pytest.raises(SystemExit) as exc:
        main(["check", run, "--isolated", "--fast", "--env", "--format", "github"])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert f"::error file={site / 'llava'},title=LD901 llava-import-broken::" in out
    with pytest.raises(SystemExit):
        main(["check", run, "--isolated", "--fast", "--env", "--format", "junit"])
    xml = capsys.readouterr().out
    assert '<testsuite name="environment"' in xml
    assert '<testcase name="LD901 llava-import-broken" classname="environment"' in xml
    assert '<testcase name="LD905 peft-cpu-half-merge" classname="environment"' in xml
    report = gather((), opts(site))
    assert {c.code: c.status.value for c in report.checks} == {
        "LD901": "failed", "LD902": "skipped", "LD903": "passed", "LD904": "skipped",
        "LD905": "skipped", "LD906": "passed"}
