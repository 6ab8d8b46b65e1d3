"""`llava-doctor check` as a CI gate: many targets, formats, --output, thresholds, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from llava_doctor.cli import app, main
from llava_doctor.fixtures import TINY, add_checkpoint, build_base, build_lora, build_pretrain
from llava_doctor.report import RENDERERS

FINAL = "checkpoints/llava-v1.5-tiny-lora"
BROKEN = "checkpoints/llava-v1.5-tiny-lora-b"


@pytest.fixture(scope="module")
def training_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training output root: a healthy final dir with two checkpoints, a broken sibling run
    (its adapter_config.json lost), the stage-1 output beside them, and the base elsewhere."""
    root = tmp_path_factory.mktemp("training")
    base = build_base(root / "vicuna-tiny-v1.5", TINY)
    pre = build_pretrain(root / "checkpoints/llava-v1.5-tiny-pretrain", TINY, base=base)
    final = build_lora(root / FINAL, TINY, base=base, projector_from=pre)
    add_checkpoint(final, 50)
    add_checkpoint(final, 100)
    broken = build_lora(root / BROKEN, TINY, base=base, projector_from=pre, seed=5)
    (broken / "adapter_config.json").unlink()
    return root


@pytest.fixture
def in_root(training_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(training_root)
    return training_root


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


# --- many targets ------------------------------------------------------------------------------

def test_recursive_root_gives_one_report_naming_each_target(in_root: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    # LD1: the layout checks, whose findings on these dirs are fixed by the fixture alone.
    code, out, err = _run(["check", "--recursive", "checkpoints", "--select", "LD1",
                           "--format", "json", "--isolated"], capsys)
    assert code == 1, err
    report = json.loads(out)
    assert [(t["path"], t["kind"]) for t in report["targets"]] == [
        (FINAL, "lora-output"),
        (f"{FINAL}/checkpoint-100", "checkpoint"),
        (f"{FINAL}/checkpoint-50", "checkpoint"),
        (BROKEN, "lora-output"),
    ]
    assert [(f["code"], f["target"], f["path"]) for f in report["findings"]] == [
        ("LD101", f"{FINAL}/checkpoint-100", f"{FINAL}/checkpoint-100/config.json"),
        ("LD104", f"{FINAL}/checkpoint-100", f"{FINAL}/checkpoint-100/non_lora_trainables.bin"),
        ("LD101", f"{FINAL}/checkpoint-50", f"{FINAL}/checkpoint-50/config.json"),
        ("LD104", f"{FINAL}/checkpoint-50", f"{FINAL}/checkpoint-50/non_lora_trainables.bin"),
        ("LD103", BROKEN, f"{BROKEN}/adapter_config.json"),
    ]
    for t in report["targets"]:
        assert {c["status"] for c in t["checks"]} <= {"passed", "failed"}
        assert len(t["checks"]) == len({c["code"] for c in t["checks"]}) > 0


def test_globs_the_shell_left_alone_are_expanded(in_root: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["check", "checkpoints/llava-v1.5-tiny-lora*", "--select", "LD103",
                         "--format", "json", "--isolated"], capsys)
    assert code == 1
    assert [t["path"] for t in json.loads(out)["targets"]] == [FINAL, BROKEN]


def test_a_file_stands_for_its_directory_and_duplicates_collapse(
        in_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["check", f"{BROKEN}/adapter_model.safetensors", BROKEN, f"{BROKEN}/",
                         "--select", "LD103", "--format", "json", "--isolated"], capsys)
    assert code == 1
    assert [t["path"] for t in json.loads(out)["targets"]] == [BROKEN]


def test_jobs_give_the_same_bytes_as_one_job(in_root: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--recursive", "checkpoints", "--select", "LD1", "--format", "json",
            "--isolated"]
    _, one, _ = _run(argv, capsys)
    _, again, _ = _run(argv, capsys)
    _, two, _ = _run([*argv, "--jobs", "2"], capsys)
    _, per_cpu, _ = _run([*argv, "--jobs", "0"], capsys)
    assert one == again == two == per_cpu  # byte-stable JSON for the same input


@pytest.mark.parametrize(("argv", "message"), [
    (["nope"], "llava-doctor: error: nope: does not exist: nothing to check"),
    (["runs-*"], "llava-doctor: error: no directory matches the pattern 'runs-*'"),
    (["--recursive", "vicuna-tiny-v1.5"],
     "llava-doctor: error: vicuna-tiny-v1.5: no LoRA output directory or checkpoint-N found "
     "under it"),
    ([], "llava-doctor: error: nothing to check"),
    ([FINAL, "--strict", "--fail-on", "info"],
     "llava-doctor: error: --strict means --fail-on warning, but --fail-on info was given"),
    ([FINAL, "--select", "LD999"], "llava-doctor: error: unknown code 'LD999' in --select"),
    ([FINAL, "--ignore", "LD101,XX"], "llava-doctor: error: unknown code 'XX' in --ignore"),
    ([FINAL, "--format", "yaml"], "Invalid value for '--format'"),
    ([FINAL, "--fail-on", "fatal"], "Invalid value for '--fail-on'"),
    ([FINAL, "--root", "no-such-dir"],
     "llava-doctor: error: no-such-dir: --root is not a directory"),
    ([FINAL, "--output", "no-such-dir/report.json"],
     "llava-doctor: error: no-such-dir/report.json: --output's folder does not exist"),
])
def test_usage_errors_exit_2_and_write_nothing(in_root: Path, capsys: pytest.CaptureFixture[str],
                                               argv: list[str], message: str) -> None:
    code, out, err = _run(["check", "--isolated", *argv, "-o", "report.out"]
                          if "--output" not in argv else ["check", "--isolated", *argv], capsys)
    assert code == 2
    assert out == ""
    assert message in err
    assert not (in_root / "report.out").exists()


# --- --output -----------------------------------------------------------------------------------

def test_output_file_holds_the_report_and_nothing_else_is_left(
        in_root: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["check", BROKEN, "--select", "LD1", "--format", "sarif", "--isolated"]
    code, stdout_report, _ = _run(argv, capsys)
    assert code == 1
    dest = tmp_path / "out" / "llava-doctor.sarif"
    dest.parent.mkdir()
    code, out, err = _run([*argv, "--output", str(dest)], capsys)
    assert code == 1
    assert out == ""
    assert err == (f"llava-doctor: wrote the sarif report to {dest} (1 error(s), 0 warning(s), "
                   "0 info in 1 target(s))\n")
    assert dest.read_text(encoding="utf-8") == stdout_report
    assert sorted(p.name for p in dest.parent.iterdir()) == ["llava-doctor.sarif"]

    # A second run replaces the file whole.
    dest.write_text("stale", encoding="utf-8")
    _run([*argv, "-o", str(dest)], capsys)
    assert dest.read_text(encoding="utf-8") == stdout_report


def test_root_makes_report_paths_relative_to_it(in_root: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _run(["check", BROKEN, "--select", "LD103", "--format", "sarif", "--isolated",
                      "--root", "checkpoints"], capsys)
    (res,) = json.loads(out)["runs"][0]["results"]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == \
        "llava-v1.5-tiny-lora-b/adapter_config.json"


@pytest.mark.parametrize("fmt", sorted(RENDERERS))
def test_every_format_renders_the_same_run(in_root: Path, capsys: pytest.CaptureFixture[str],
                                           fmt: str) -> None:
    code, out, _ = _run(["check", BROKEN, "--select", "LD103", "--format", fmt, "--isolated"],
                        capsys)
    assert code == 1
    assert "adapter_config.json" in out


def test_format_choices_are_the_renderer_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from llava_doctor.cli import Format

    command = typer.main.get_command(app).commands["check"]  # type: ignore[attr-defined]
    assert [p for p in command.params if "--format" in p.opts]
    assert [m.value for m in Format] == list(RENDERERS)
    code, out, _ = _run(["check", "--help"], capsys)
    assert code == 0
    assert f"--format <{'|'.join(RENDERERS)}>" in out


# --- the gate -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def warning_only(scenarios: dict[str, Path]) -> Path:
    """A run whose every lora_B is zero: LD204, a warning whoever merges (it merges as a no-op).
    (A folder name without "lora", LD106, used to be the warning here; it is an error for
    LLaVA's merge, which takes the wrong branch.)"""
    return scenarios["lora-untrained"]


@pytest.mark.parametrize(("flags", "expected"), [
    ([], 0),
    (["--fail-on", "error"], 0),
    (["--fail-on", "warning"], 1),
    (["--fail-on", "WARNING"], 1),
    (["--strict"], 1),
    (["--strict", "--fail-on", "warning"], 1),
    (["--fail-on", "info"], 1),
    (["--strict", "--exit-zero"], 0),
])
def test_fail_on_strict_and_exit_zero(warning_only: Path, capsys: pytest.CaptureFixture[str],
                                      flags: list[str], expected: int) -> None:
    code, out, _ = _run(["check", str(warning_only), "--select", "LD204", "--format", "json",
                         "--isolated", *flags], capsys)
    assert [f["code"] for f in json.loads(out)["findings"]] == ["LD204"]
    assert code == expected


def test_exit_zero_with_errors(in_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["check", BROKEN, "--select", "LD103", "--exit-zero", "--isolated"],
                        capsys)
    assert code == 0
    assert "LD103 adapter-config-missing" in out


def test_clean_run_exits_0(in_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["check", FINAL, "--select", "LD1", "--isolated"], capsys)
    assert code == 0
    assert out.endswith("No issues found in 1 target(s).\n")


def test_a_dangling_symlink_is_not_silently_clean(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    code, out, err = _run(["check", str(link), "--isolated"], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"llava-doctor: error: {link}: does not exist: nothing to check")


def test_sarif_and_annotations_point_at_the_json_key_a_real_check_names(
        scenarios: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # LD406 names the config field it is about (evidence "field": "model_type").
    monkeypatch.chdir(scenarios["base-vicuna"].parent)
    run = scenarios["lora-qlora"].name
    lines = (scenarios["lora-qlora"] / "config.json").read_text(encoding="utf-8").splitlines()
    (line,) = [i for i, text in enumerate(lines, 1) if text.lstrip().startswith('"model_type"')]
    argv = ["check", run, "--select", "LD406", "--isolated"]
    _, out, _ = _run([*argv, "--format", "sarif"], capsys)
    (res,) = json.loads(out)["runs"][0]["results"]
    loc = res["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == f"{run}/config.json"
    assert loc["region"]["startLine"] == line
    _, out, _ = _run([*argv, "--format", "github"], capsys)
    # info: LLaVA's own loader reads the config with its own class
    assert out.startswith(f"::notice file={run}/config.json,line={line},col=3,endColumn=15,"
                          "title=LD406 model-type-collision::")
