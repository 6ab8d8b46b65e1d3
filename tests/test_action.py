"""The GitHub Action and the pre-commit hook stay in step with the CLI (no drift)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from llava_doctor.cli import app
from llava_doctor.models import Severity
from llava_doctor.report import RENDERERS

REPO = Path(__file__).resolve().parents[1]
LONG_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


@pytest.fixture(scope="module")
def action() -> dict:
    return yaml.safe_load((REPO / "action.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def check_options() -> set[str]:
    command = typer.main.get_command(app).commands["check"]  # type: ignore[attr-defined]
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def _step(action: dict, step_id: str) -> dict:
    (step,) = [s for s in action["runs"]["steps"] if s.get("id") == step_id]
    return step


def test_composite_with_the_required_inputs(action: dict) -> None:
    assert action["runs"]["using"] == "composite"
    assert {"paths", "base", "projector", "format", "fail-on", "upload-sarif"} <= \
        set(action["inputs"])
    assert action["inputs"]["format"]["default"] in RENDERERS
    assert action["inputs"]["fail-on"]["default"] in {s.value for s in Severity}
    for name, spec in action["inputs"].items():
        assert spec.get("description"), name


def test_the_check_step_uses_only_options_the_cli_defines(action: dict,
                                                          check_options: set[str]) -> None:
    script = _step(action, "check")["run"]
    used = set(LONG_FLAG.findall(script))
    assert used, "no llava-doctor options found in the check step"
    assert used <= check_options, f"options the CLI does not define: {used - check_options}"
    assert "llava-doctor check" in script
    # The pre-commit hook's entry is a check command line too.
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    for hook in hooks:
        assert set(LONG_FLAG.findall(" ".join([hook["entry"], *hook.get("args", [])]))) <= \
            check_options


def test_expressions_name_real_inputs_and_outputs_and_stay_out_of_scripts(action: dict) -> None:
    text = (REPO / "action.yml").read_text(encoding="utf-8")
    check_script = _step(action, "check")["run"]
    written = set(re.findall(r'echo "([a-z-]+)=', check_script))
    for expr in EXPR.findall(text):
        for name in re.findall(r"inputs\.([a-z0-9-]+)", expr):
            assert name in action["inputs"], f"${{{{ {expr} }}}} names no input"
        for name in re.findall(r"steps\.check\.outputs\.([a-z0-9-]+)", expr):
            assert name in written, f"${{{{ {expr} }}}}: the check step never writes {name}"
    for step in action["runs"]["steps"]:
        # Inputs reach scripts through env: only, so they cannot inject shell code.
        assert "${{" not in step.get("run", ""), step.get("name")


def test_sarif_upload_step(action: dict) -> None:
    (upload,) = [s for s in action["runs"]["steps"]
                 if s.get("uses", "").startswith("github/codeql-action/upload-sarif@")]
    assert "inputs.upload-sarif == 'true'" in upload["if"]
    assert "always()" in upload["if"]
    assert upload["with"]["sarif_file"] == "${{ steps.check.outputs.sarif-file }}"


def _bash(script: str, env: dict[str, str], cwd: Path, scratch: Path
          ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    # The llava-doctor of this checkout, as the install step would provide it.
    full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full.get('PATH', '')}"
    # Exactly how GitHub runs a `shell: bash` step: bash --noprofile --norc -eo pipefail {0}.
    file = scratch / "step.sh"
    file.write_text(script, encoding="utf-8")
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(file)],
                          env=full, cwd=cwd, text=True, capture_output=True, timeout=300)


def test_the_check_and_gate_scripts_run_as_written(action: dict, scenarios: dict[str, Path],
                                                   tmp_path: Path) -> None:
    workspace = scenarios["base-vicuna"].parent
    gh_output = tmp_path / "github_output"
    summary = tmp_path / "step_summary.md"
    sarif = tmp_path / "llava-doctor.sarif"
    inputs = {
        # A glob the action passes on unexpanded, for llava-doctor to expand.
        "INPUT_PATHS": "broken/LD103-no-adapter-config/*\nbroken/LD101-no-config/*",
        "INPUT_RECURSIVE": "", "INPUT_BASE": str(scenarios["base-vicuna"]),
        "INPUT_PROJECTOR": "", "INPUT_FORMAT": "github", "INPUT_FAIL_ON": "error",
        "INPUT_UPLOAD_SARIF": "true", "INPUT_SARIF_FILE": str(sarif),
        "INPUT_STEP_SUMMARY": "true", "INPUT_ARGS": "--select LD101,LD103 --isolated",
        "GITHUB_OUTPUT": str(gh_output), "GITHUB_STEP_SUMMARY": str(summary),
    }
    done = _bash(_step(action, "check")["run"], inputs, workspace, tmp_path)
    assert done.returncode == 0, done.stderr
    annotations = done.stdout.splitlines()
    assert len(annotations) == 3
    assert annotations[0].startswith(
        "::error file=broken/LD103-no-adapter-config/llava-v1.5-tiny-lora/adapter_config.json,"
        "title=LD103 adapter-config-missing::broken/LD103-no-adapter-config/llava-v1.5-tiny-lora "
        "has adapter weights but no adapter_config.json")
    assert annotations[1].startswith(
        "::error file=broken/LD101-no-config/llava-v1.5-tiny-lora/config.json,"
        "title=LD101 lora-config-missing::broken/LD101-no-config/llava-v1.5-tiny-lora has no "
        "config.json")
    assert annotations[2] == ("llava-doctor: 2 error(s), 0 warning(s), 0 info in 2 target(s) "
                              "(severities for: LLaVA's merge_lora_weights.py (transformers "
                              "4.37.2))")
    assert gh_output.read_text().splitlines() == ["exit-code=1", f"sarif-file={sarif}"]
    results = json.loads(sarif.read_text())["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["LD103", "LD101"]
    assert summary.read_text().startswith("## ❌ llava-doctor: 2 error(s)")

    gate = action["runs"]["steps"][-1]["run"]
    assert _bash(gate, {"RC": "1"}, workspace, tmp_path).returncode == 1
    assert _bash(gate, {"RC": "0"}, workspace, tmp_path).returncode == 0
    assert _bash(gate, {"RC": ""}, workspace, tmp_path).returncode == 2  # check never ran


def test_a_usage_error_skips_the_extra_reports(action: dict, tmp_path: Path) -> None:
    gh_output = tmp_path / "github_output"
    inputs = {"INPUT_PATHS": "does-not-exist", "INPUT_RECURSIVE": "", "INPUT_BASE": "",
              "INPUT_PROJECTOR": "", "INPUT_FORMAT": "text", "INPUT_FAIL_ON": "error",
              "INPUT_UPLOAD_SARIF": "true", "INPUT_SARIF_FILE": "x.sarif",
              "INPUT_STEP_SUMMARY": "false", "INPUT_ARGS": "--isolated",
              "GITHUB_OUTPUT": str(gh_output)}
    done = _bash(_step(action, "check")["run"], inputs, tmp_path, tmp_path)
    assert done.returncode == 0
    assert gh_output.read_text().splitlines() == ["exit-code=2"]
    assert not (tmp_path / "x.sarif").exists()
    assert "does-not-exist: does not exist: nothing to check" in done.stderr


def test_pre_commit_hook_matches_lora_files_only() -> None:
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert hook["id"] == "llava-doctor"
    assert hook["entry"] == "llava-doctor check"
    assert hook["language"] == "python"
    files = re.compile(hook["files"])
    for path in ("runs/a/adapter_config.json", "adapter_model.safetensors",
                 "runs/a/checkpoint-5/adapter_model.bin", "runs/a/non_lora_trainables.bin"):
        assert files.search(path), path
    for path in ("runs/a/config.json", "README.md", "my_adapter_config.json",
                 "runs/a/adapter_config.json.bak"):
        assert not files.search(path), path
