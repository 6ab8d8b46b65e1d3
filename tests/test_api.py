"""The Python API: `llava_doctor.check / env / merge` return the models the JSON output holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import llava_doctor
from llava_doctor.cli import main
from llava_doctor.errors import UsageError
from llava_doctor.models import EnvReport, Report


def test_importing_the_package_imports_no_heavy_dependency() -> None:
    code = ("import sys, llava_doctor\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'pydantic', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_check_returns_the_report_the_cli_prints(scenarios: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    paths = [scenarios["LD101-no-config"], scenarios["LD107-pretrain-dir"]]
    report = llava_doctor.check([str(p) for p in paths], select=["LD1"])
    assert isinstance(report, Report)
    assert [(f.code, f.target) for f in report.findings] == [
        ("LD101", str(paths[0])), ("LD107", str(paths[1]))]
    assert report.exit_code() == 1
    with pytest.raises(SystemExit):
        main(["check", *map(str, paths), "--format", "json", "--isolated", "--select", "LD1"])
    assert json.loads(capsys.readouterr().out) == json.loads(report.model_dump_json())


def test_check_options_and_a_single_path(scenarios: dict[str, Path]) -> None:
    run = scenarios["lora"]
    report = llava_doctor.check(run, base=scenarios["base-vicuna"], fast=True, peft_version="0.6.0",
                                ignore=["LD6"], env=True)
    assert [t.path for t in report.targets] == [str(run)]
    assert report.targets[0].inputs[0].source == "--base"
    assert not any(f.code.startswith("LD6") for f in report.findings)
    assert isinstance(report.env, EnvReport) and [r.path for r in report.env.runs] == [str(run)]
    assert report.env.package("peft").source == "--peft-version"  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="does not exist"):
        llava_doctor.check(run / "nope")


def test_check_takes_the_merge_stack_and_consumer_as_the_cli_does(
        scenarios: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """merge_with / transformers_version are --merge-with / --transformers-version: a run whose
    vicuna generation config breaks LLaVA's save fails for LLaVA's merge, not for ours."""
    run, base = scenarios["lora"], scenarios["base-vicuna"]
    for consumer, rc in (("llava", 1), ("llava-doctor", 0)):
        report = llava_doctor.check(run, base=base, fast=True, merge_with=consumer,
                                    transformers_version="4.37.2", select=["LD404"])
        assert [t.consumer.value for t in report.targets] == [consumer]  # type: ignore[union-attr]
        assert [f.code for f in report.findings] == ["LD404"]
        assert report.exit_code() == rc
        with pytest.raises(SystemExit):
            main(["check", str(run), "--base", str(base), "--fast", "--format", "json",
                  "--isolated", "--select", "LD404", "--merge-with", consumer,
                  "--transformers-version", "4.37.2"])
        assert json.loads(capsys.readouterr().out) == json.loads(report.model_dump_json())


def test_env_returns_the_env_report(scenarios: dict[str, Path]) -> None:
    env = llava_doctor.env(scenarios["lora"], gpu="none", peft_version="0.5.0")
    assert isinstance(env, EnvReport)
    assert [r.path for r in env.runs] == [str(scenarios["lora"])]
    assert "LD905" in {f.code for f in env.findings}


def test_merge_is_callable_even_after_its_modules_are_imported(scenarios: dict[str, Path],
                                                               tmp_path: Path) -> None:
    import llava_doctor.merge.stream  # noqa: F401  (sets the package attribute `merge`)

    result = llava_doctor.merge(scenarios["lora"], base=scenarios["base-vicuna"],
                                out=tmp_path / "merged", durable=False)
    assert result.out == tmp_path / "merged" and (tmp_path / "merged" / "config.json").is_file()
    assert result.verified is not None and result.tensors_merged > 0
    assert llava_doctor.merge.merge is not None  # the module API is still there
    with pytest.raises(UsageError, match="merge needs an output directory"):
        llava_doctor.merge(scenarios["lora"])
