"""Configuration files: discovery, validation, layering with flags, and the Report post-step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_doctor.cli import main
from llava_doctor.config import Config, discover, find_config_file, load_config
from llava_doctor.errors import UsageError
from llava_doctor.models import CheckOutcome, CheckStatus, Finding, Report, Severity, TargetResult


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- discovery ---------------------------------------------------------------------------------

def test_found_upward_from_the_working_directory(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "repo" / ".llava-doctor.toml", 'ignore = ["LD106"]\n')
    deep = tmp_path / "repo" / "runs" / "a"
    deep.mkdir(parents=True)
    assert find_config_file(deep) == cfg
    assert discover(deep).ignore == ("LD106",)


def test_pyproject_without_our_table_is_passed_over(tmp_path: Path) -> None:
    outer = _write(tmp_path / "pyproject.toml", '[tool.llava-doctor]\nselect = ["LD1"]\n')
    _write(tmp_path / "pkg" / "pyproject.toml", '[project]\nname = "pkg"\n')
    assert find_config_file(tmp_path / "pkg") == outer
    assert discover(tmp_path / "pkg").select == ("LD1",)


def test_own_file_wins_over_pyproject_and_nearest_wins(tmp_path: Path) -> None:
    _write(tmp_path / "pyproject.toml", '[tool.llava-doctor]\nignore = ["LD1"]\n')
    own = _write(tmp_path / ".llava-doctor.toml", 'ignore = ["LD5"]\n')
    assert find_config_file(tmp_path) == own
    nearer = _write(tmp_path / "sub" / "pyproject.toml", '[tool.llava-doctor]\nignore = []\n')
    assert find_config_file(tmp_path / "sub") == nearer


def test_no_file_is_an_empty_config(tmp_path: Path) -> None:
    assert discover(tmp_path) == Config()


# --- validation --------------------------------------------------------------------------------

def test_every_key_parsed_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "pyproject.toml", """
[tool.llava-doctor]
select = ["ld1", "LD5"]
ignore = ["LD106"]
base = "models/vicuna"
projector = "/abs/mm_projector.bin"
peft-version = "0.10.0"

[tool.llava-doctor.severity]
LD503 = "error"
LD1 = "info"

[tool.llava-doctor.per-path-ignores]
"runs/*/checkpoint-*" = ["LD101", "LD104"]
"""))
    assert cfg.select == ("LD1", "LD5")
    assert cfg.ignore == ("LD106",)
    assert cfg.base == tmp_path / "models/vicuna"
    assert cfg.projector == Path("/abs/mm_projector.bin")
    assert cfg.peft_version == "0.10.0"
    assert cfg.severity == {"LD503": Severity.error, "LD1": Severity.info}
    assert cfg.per_path_ignores == (("runs/*/checkpoint-*", ("LD101", "LD104")),)


@pytest.mark.parametrize(("text", "message"), [
    ('[tool.llava-doctor]\nselct = ["LD1"]\n',
     "unknown key 'tool.llava-doctor.selct'"),
    ('[tool.llava-doctor]\nignore = ["LD999"]\n',
     "unknown code 'LD999' in 'tool.llava-doctor.ignore'"),
    ('[tool.llava-doctor]\nignore = "LD101"\n',
     "'tool.llava-doctor.ignore' must be a list of codes"),
    ('[tool.llava-doctor.severity]\nLD101 = "fatal"\n',
     "'tool.llava-doctor.severity.LD101' = 'fatal' is not a severity"),
    ('[tool.llava-doctor.severity]\nXX1 = "error"\n',
     "unknown code 'XX1' in 'tool.llava-doctor.severity.XX1'"),
    ('[tool.llava-doctor.per-path-ignores]\n"runs/*" = ["LD1O1"]\n',
     "unknown code 'LD1O1' in 'tool.llava-doctor.per-path-ignores.\"runs/*\"'"),
    ('[tool.llava-doctor]\nselect = [\n', "invalid TOML"),
])
def test_bad_configuration_is_a_usage_error_naming_the_key(tmp_path: Path, text: str,
                                                           message: str) -> None:
    path = _write(tmp_path / "pyproject.toml", text)
    with pytest.raises(UsageError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert message in str(exc.value)
    assert exc.value.exit_code == 2


def test_a_misspelt_key_gets_a_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path / "pyproject.toml", '[tool.llava-doctor]\nselct = ["LD1"]\n')
    with pytest.raises(UsageError) as exc:
        load_config(path)
    assert exc.value.hint.startswith("did you mean 'tool.llava-doctor.select'? known keys: "
                                     "select, ignore, severity, per-path-ignores, base, ")


def test_own_file_keys_have_no_table_prefix(tmp_path: Path) -> None:
    path = _write(tmp_path / ".llava-doctor.toml", "bsae = 'x'\n")
    with pytest.raises(UsageError, match="unknown key 'bsae'"):
        load_config(path)


# --- layering with the command line -------------------------------------------------------------

def test_select_on_the_command_line_replaces_ignore_extends() -> None:
    cfg = Config(select=("LD1",), ignore=("LD106",))
    assert cfg.selection(None, None) == (["LD1"], ["LD106"])
    assert cfg.selection(None, ["LD107"]) == (["LD1"], ["LD106", "LD107"])
    assert cfg.selection(["LD5"], None) == (["LD5"], [])
    assert Config().selection(None, None) == (None, [])


# --- post-processing ----------------------------------------------------------------------------

def _report(root: Path) -> Report:
    def outcome(code: str, status: CheckStatus) -> CheckOutcome:
        return CheckOutcome(code=code, name=f"n{code}", status=status)

    final, ckpt = str(root / "runs/a"), str(root / "runs/a/checkpoint-50")
    return Report(
        targets=[TargetResult(path=final, kind="lora-output",
                              checks=[outcome("LD101", CheckStatus.passed),
                                      outcome("LD503", CheckStatus.failed)]),
                 TargetResult(path=ckpt, kind="checkpoint",
                              checks=[outcome("LD101", CheckStatus.failed),
                                      outcome("LD503", CheckStatus.failed)])],
        findings=[
            Finding(code="LD503", name="dtype-risk", severity=Severity.warning, message="m1",
                    path=f"{final}/adapter_model.safetensors", target=final),
            Finding(code="LD101", name="lora-config-missing", severity=Severity.error,
                    message="m2", path=f"{ckpt}/config.json", target=ckpt),
            Finding(code="LD503", name="dtype-risk", severity=Severity.warning, message="m3",
                    path=f"{ckpt}/adapter_model.safetensors", target=ckpt),
        ])


def test_severity_overrides_longest_prefix_wins(tmp_path: Path) -> None:
    cfg = Config(path=tmp_path / ".llava-doctor.toml",
                 severity={"LD5": Severity.info, "LD503": Severity.error})
    out = cfg.apply(_report(tmp_path))
    assert [(f.code, f.severity) for f in out.findings] == [
        ("LD503", Severity.error), ("LD101", Severity.error), ("LD503", Severity.error)]


def test_per_path_ignores_drop_findings_and_mark_the_check_skipped(tmp_path: Path) -> None:
    report = _report(tmp_path)
    cfg = Config(path=tmp_path / ".llava-doctor.toml",
                 per_path_ignores=(("runs/*/checkpoint-*", ("LD1",)),))
    out = cfg.apply(report)
    assert [f.message for f in out.findings] == ["m1", "m3"]
    ckpt = out.targets[1]
    assert ckpt.checks[0].status == CheckStatus.skipped
    assert ckpt.checks[0].reason == (f"findings ignored by per-path-ignores 'runs/*/checkpoint-*' "
                                     f"in {tmp_path / '.llava-doctor.toml'}")
    assert ckpt.checks[1].status == CheckStatus.failed  # LD503 was not ignored there
    # Pure: the input report is unchanged.
    assert len(report.findings) == 3 and report.targets[1].checks[0].status == CheckStatus.failed


def test_a_pattern_naming_a_folder_covers_the_files_below_it(tmp_path: Path) -> None:
    cfg = Config(path=tmp_path / "pyproject.toml", per_path_ignores=(("runs/a", ("LD503",)),))
    out = cfg.apply(_report(tmp_path))
    assert [f.message for f in out.findings] == ["m2"]


# --- through the command line -------------------------------------------------------------------

def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture(scope="module")
def run_dir(scenarios: dict[str, Path]) -> Path:
    return scenarios["LD106-name-without-lora"]


def test_unknown_key_exits_2_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    _write(tmp_path / "pyproject.toml", "[tool.llava-doctor]\nfail-fast = true\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report.json"
    code, stdout, err = _run(["check", str(run_dir), "--output", str(out)], capsys)
    assert code == 2
    assert stdout == ""
    assert err.startswith(f"llava-doctor: error: {tmp_path / 'pyproject.toml'}: unknown key "
                          "'tool.llava-doctor.fail-fast'")
    assert not out.exists()


def test_config_applies_and_flags_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           run_dir: Path) -> None:
    # LD106 is an error for LLaVA's merge: the config makes it a warning, so the gate passes.
    _write(tmp_path / ".llava-doctor.toml", 'select = ["LD106"]\n[severity]\nLD106 = "warning"\n')
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(["check", str(run_dir), "--format", "json"], capsys)
    assert code == 0
    (f,) = json.loads(out)["findings"]
    assert (f["code"], f["severity"]) == ("LD106", "warning")

    # --isolated ignores the file: LD106 is back to an error and every check runs.
    code, out, _ = _run(["check", str(run_dir), "--format", "json", "--isolated",
                         "--select", "LD106"], capsys)
    assert code == 1
    assert [f["severity"] for f in json.loads(out)["findings"]] == ["error"]

    # --ignore on the command line narrows the configured selection.
    code, out, _ = _run(["check", str(run_dir), "--format", "json", "--ignore", "LD106"], capsys)
    assert code == 0
    assert json.loads(out)["findings"] == []


def test_explicit_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              run_dir: Path) -> None:
    cfg = _write(tmp_path / "ci.toml", 'select = ["LD106"]\nignore = ["LD106"]\n')
    code, out, _ = _run(["check", str(run_dir), "--format", "json", "--config", str(cfg)], capsys)
    assert code == 0
    assert json.loads(out)["targets"][0]["checks"] == []


def test_unsearchable_folders_are_skipped(tmp_path, monkeypatch) -> None:
    """Config discovery from a cwd under a folder we may not search: no config, no crash."""

    from llava_doctor import config

    def denied(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(config.Path, "is_file", denied)
    assert config.find_config_file(tmp_path) is None
