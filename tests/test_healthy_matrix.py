"""Acceptance test for the check catalogue: healthy runs produce no warning and no error.

Every registered check runs (LD000 included through the runner), with the `--strict`
threshold. Each case is a run laid out the way LLaVA's scripts lay out `./checkpoints/`, in its
own folder so that the sibling `*-pretrain/` lookup finds exactly its own stage-1 output.

The bases carry a *valid* generation config: vicuna v1.5's own file (temperature/top_p without
do_sample) is a real hazard for LLaVA's merge and LD404 rightly warns about it; it is covered by
tests/test_checks_base.py.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

from llava_doctor.checks.base import all_checks
from llava_doctor.checks.context import Options
from llava_doctor.doctor import run_checks
from llava_doctor.fixtures import TINY, build_base, build_lora, build_pretrain
from llava_doctor.models import CheckStatus, Severity

HUB_ID = "lmsys/vicuna-tiny-v1.5"


def _peft() -> str | None:
    try:
        return version("peft")
    except PackageNotFoundError:
        return None


def _v15(root: Path, base: Path, *, name: str = "llava-v1.5-tiny-lora",
         projector_type: str = "mlp2x_gelu", **kw: Any) -> Path:
    """finetune_lora.sh: stage-1 projector beside the run, LoRA from vicuna + that projector."""
    pre = build_pretrain(root / "llava-v1.5-tiny-pretrain", TINY, projector_type=projector_type,
                         base=base)
    return build_lora(root / name, TINY, base=base, projector_type=projector_type,
                      projector_from=pre, **kw)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Options]]:
    root = tmp_path_factory.mktemp("healthy")
    vicuna = build_base(root / "bases" / "vicuna-tiny-v1.5", TINY, generation_config="valid")
    vicuna_bin = build_base(root / "bases" / "vicuna-tiny-v1.5-bin", TINY, fmt="bin",
                            generation_config="valid")
    llava = build_base(root / "bases" / "llava-v1.5-tiny", TINY, llava=True,
                       generation_config="valid")
    peft = _peft()
    cases: dict[str, tuple[Path, Options]] = {}

    def add(name: str, run: Path, **opts: Any) -> None:
        cases[name] = (run, Options(peft_version=peft, **opts))

    add("v1.5-vicuna-safetensors", _v15(root / "v15", vicuna))
    add("task-lora-on-llava-base", build_lora(
        root / "task" / "llava-v1.5-tiny-task-lora", TINY, base=llava, trained_from="llava",
        projector_from=llava))
    add("bin-adapter-peft-0.6", _v15(root / "bin", vicuna, adapter_format="bin",
                                     peft_version="0.6.0"))
    add("bin-base-shards", _v15(root / "binbase", vicuna_bin))
    add("rslora", _v15(root / "rslora", vicuna, use_rslora=True, r=16, alpha=32,
                       peft_version="0.10.0"))
    add("linear-projector", _v15(root / "linear", vicuna, projector_type="linear"))
    add("mlp3x-gelu-projector", _v15(root / "mlp3x", vicuna, projector_type="mlp3x_gelu"))
    # Trained on the hub id; merged here with a local copy passed as --base.
    hub = _v15(root / "hub", vicuna)
    for f, key in (("adapter_config.json", "base_model_name_or_path"),
                   ("config.json", "_name_or_path")):
        data = json.loads((hub / f).read_text())
        data[key] = HUB_ID
        (hub / f).write_text(json.dumps(data, indent=2))
    add("hub-id-recorded-local-base", hub, base=vicuna)
    return cases


CASES = ["v1.5-vicuna-safetensors", "task-lora-on-llava-base", "bin-adapter-peft-0.6",
         "bin-base-shards", "rslora", "linear-projector", "mlp3x-gelu-projector",
         "hub-id-recorded-local-base"]


@pytest.mark.parametrize("case", CASES)
def test_healthy_run_is_clean_under_strict(matrix: dict[str, tuple[Path, Options]],
                                           case: str) -> None:
    run, opts = matrix[case]
    report = run_checks([run], opts)
    loud = [f"{f.code} {f.severity.value}: {f.message}" for f in report.findings
            if f.severity.rank >= Severity.warning.rank]
    assert loud == []
    assert report.exit_code(fail_on=Severity.warning) == 0
    statuses = {c.code: c.status for t in report.targets for c in t.checks}
    assert CheckStatus.crashed not in statuses.values()
    # every registered check was run or deliberately skipped, none forgotten
    # (the environment checks, LD9xx, run once per `env`, never on a target)
    assert set(statuses) == {c for c, s in all_checks().items()
                             if s.scope == "target"} - {"LD000"}


def test_projector_and_base_checks_really_ran(matrix: dict[str, tuple[Path, Options]]) -> None:
    """The clean bill is not the product of skipped checks: the LD3xx/LD4xx ones all ran."""
    run, opts = matrix["v1.5-vicuna-safetensors"]
    report = run_checks([run], opts, select=["LD3", "LD4"])
    statuses = {c.code: c.status for t in report.targets for c in t.checks}
    assert statuses == {code: CheckStatus.passed for code in statuses}
    assert set(statuses) >= {"LD301", "LD302", "LD303", "LD304", "LD305", "LD306", "LD307",
                             "LD308", "LD401", "LD402", "LD403", "LD404", "LD405", "LD406",
                             "LD407"}


def test_cli_strict_exit_zero(matrix: dict[str, tuple[Path, Options]]) -> None:
    """The same verdict through the command line a CI job would run."""
    import subprocess
    import sys

    run, opts = matrix["hub-id-recorded-local-base"]
    cmd = [sys.executable, "-m", "llava_doctor", "check", str(run), "--strict",
           "--base", str(opts.base)]
    if opts.peft_version:
        cmd += ["--peft-version", opts.peft_version]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
