"""`llava-doctor fix` on llava-hf runs: LD701 renames the adapter's keys into the target's
layout, LD704 writes the adapter dir's processor_config.json; the base is never touched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from check_helpers import found
from hf_support import World
from safetensors.torch import load_file

from llava_doctor.checks.context import Options
from llava_doctor.fixes import apply_plan, plan_fixes, undo_latest
from llava_doctor.models import FixSafety

T5 = "5.24.0"
T4 = "4.46.3"
ADAPTER = "adapter_model.safetensors"


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file()}


def test_ld701_fix_renames_into_the_target_layout(hf4: World, tmp_path: Path) -> None:
    ad = hf4.copy("mts", tmp_path)
    base_before = _digest(hf4.bases["llava"])
    before = load_file(str(ad / ADAPTER))
    opts = Options(base=hf4.bases["llava"], transformers_version=T5)
    _, plan = plan_fixes(ad, opts)
    [change] = [c for c in plan.changes if c.code == "LD701"]
    assert (change.safety, change.files, change.apply) == (FixSafety.safe, (ADAPTER,), True)
    apply_plan(plan)
    after = load_file(str(ad / ADAPTER))
    assert len(after) == len(before)
    for k, v in before.items():
        new = k.replace("base_model.model.language_model.model.",
                        "base_model.model.model.language_model.")
        new = new.replace("base_model.model.multi_modal_projector.",
                          "base_model.model.model.multi_modal_projector.")
        assert torch.equal(after[new], v)  # bit for bit, under the 5.x module path
    assert not found(ad, "LD701", base=hf4.bases["llava"], transformers_version=T5)
    assert _digest(hf4.bases["llava"]) == base_before
    # and back, for transformers 4.46: the keys return to what 4.46 saved
    _, back = plan_fixes(ad, Options(base=hf4.bases["llava"], transformers_version=T4))
    apply_plan(back)
    assert (ad / ADAPTER).read_bytes() == (hf4.adapters["mts"] / ADAPTER).read_bytes()
    undo_latest(ad)
    undo_latest(ad)
    assert (ad / ADAPTER).read_bytes() == (hf4.adapters["mts"] / ADAPTER).read_bytes()


@pytest.mark.usefixtures("needs_processors")
def test_ld701_fix_needs_a_target_and_leaves_the_base(hf5: World, tmp_path: Path) -> None:
    ad = hf5.copy("lm", tmp_path)
    _, plan = plan_fixes(ad, Options(base=hf5.bases["llava"]))
    assert not plan.files  # only info without a target: nothing to write
    _, plan = plan_fixes(ad, Options(base=hf5.bases["llava"], transformers_version=T4,
                                     peft_version="0.13.2"))
    [change] = [c for c in plan.changes if c.code == "LD701"]
    assert change.files == (ADAPTER,)
    # the base's saved-5 layout is reported, not fixed
    assert [u.code for u in plan.unfixable] == ["LD701"]
    assert "randomly initialised vision tower" in plan.unfixable[0].reason
    apply_plan(plan)
    keys = load_file(str(ad / ADAPTER))
    assert all(k.startswith("base_model.model.language_model.model.layers.") for k in keys)


@pytest.mark.usefixtures("needs_processors")
def test_ld704_fix_writes_the_adapter_dirs_processor_config(hf5: World, tmp_path: Path) -> None:
    base = hf5.copy_base("llava", tmp_path)
    shutil.copyfile(hf5.proc["raw-llava"] / "processor_config.json",
                    base / "processor_config.json")
    base_before = _digest(base)
    ad = hf5.copy("lm", tmp_path)
    opts = Options(base=base, transformers_version=T5)
    assert found(ad, "LD704", **{"base": base, "transformers_version": T5})
    _, plan = plan_fixes(ad, opts)
    [change] = [c for c in plan.changes if c.code == "LD704"]
    assert change.files == ("processor_config.json",) and change.safety == FixSafety.safe
    apply_plan(plan)
    written = json.loads((ad / "processor_config.json").read_text())
    assert written == {"image_token": "<image>", "num_additional_image_tokens": 1,
                       "patch_size": 14, "processor_class": "LlavaProcessor",
                       "vision_feature_select_strategy": "default"}
    assert not found(ad, "LD704", base=base, transformers_version=T5)
    assert _digest(base) == base_before
    _, again = plan_fixes(ad, opts)
    assert not again.files


@pytest.mark.usefixtures("needs_processors")
def test_fix_unsafe_plans_nothing_original_on_a_healthy_run(hf5: World) -> None:
    # It used to plan LD106's symlink and LLaVA's merge_lora_weights.py for this adapter.
    opts = Options(base=hf5.bases["llava"], transformers_version=T5, peft_version="0.21.2")
    report, plan = plan_fixes(hf5.adapters["mts"], opts, allow_unsafe=True)
    assert not plan.changes and not plan.files and not plan.unfixable
    assert not [f for f in report.findings if f.code[:3] in ("LD1", "LD3")]


def test_cli_rejects_a_bad_transformers_version(hf5: World,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from llava_doctor.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["check", str(hf5.adapters["lm"]), "--transformers-version", "latest"])
    assert exc.value.code == 2
    assert "--transformers-version 'latest' is not a version number" in capsys.readouterr().err


def test_ld701_fix_carries_full_path_target_modules_along(hf5: World, tmp_path: Path) -> None:
    from check_helpers import edit_json

    from llava_doctor.artifacts.peft_match import parse_adapter_keys

    ad = hf5.copy("lm", tmp_path)
    paths = sorted(parse_adapter_keys(load_file(str(ad / ADAPTER))).modules)
    assert paths[0].startswith("model.language_model.layers.0.")
    edit_json(ad / "adapter_config.json", target_modules=paths)  # LLaMA-Factory's full paths
    opts = Options(base=hf5.bases["llava"], transformers_version=T4, peft_version="0.13.2")
    assert found(ad, "LD202", base=hf5.bases["llava"], transformers_version=T4)
    _, plan = plan_fixes(ad, opts)
    [change] = [c for c in plan.changes if c.code == "LD701"]
    assert change.files == (ADAPTER, "adapter_config.json")
    apply_plan(plan)
    written = json.loads((ad / "adapter_config.json").read_text())["target_modules"]
    assert written == [p.replace("model.language_model.", "language_model.model.", 1)
                       for p in paths]
    for code in ("LD202", "LD207"):
        assert not found(ad, code, base=hf5.bases["llava"], transformers_version=T4)
    assert [f.evidence["what"] for f in found(ad, "LD701", base=hf5.bases["llava"],
                                              transformers_version=T4)] == ["base"]
