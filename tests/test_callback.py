"""DoctorCallback on a real `transformers.Trainer`: a tiny Llama with a peft LoRA, a few CPU steps.

Faults are injected the way they happen: a ZeRO-3-like placeholder adapter (every tensor saved
`[0]`-shaped) written over the Trainer's file at save time, and a NaN in a `lora_B` weight
during training, which the Trainer then saves.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from llava_doctor.fixtures.builder import tokenizer_model_path  # noqa: E402
from llava_doctor.integrations.transformers import (  # noqa: E402
    REPORT_NAME,
    DoctorCallback,
)

MAX_STEPS, SAVE_STEPS = 4, 2


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    # The vocabulary of the shipped 128-piece tokenizer.model, copied beside the weights so the
    # base is complete (LLaVA's merge loads its slow tokenizer).
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32)
    d = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    shutil.copyfile(tokenizer_model_path(), d / "tokenizer.model")
    return d


class _Data(torch.utils.data.Dataset):  # type: ignore[misc]
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = (torch.arange(8) + i) % 128
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones(8, dtype=torch.long)}


def train(base_dir: Path, out: Path, callbacks: list[Any]) -> Any:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj"]))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_strategy="steps",
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_steps=100, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                   callbacks=callbacks)
    trainer.train()
    return trainer


def _files(d: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.iterdir()) if p.is_file()}


class Snapshot(transformers.TrainerCallback):  # type: ignore[misc]
    """Records every checkpoint file (sha256, mtime) as the Trainer left it."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, tuple[str, int]]] = {}

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.seen[state.global_step] = _files(Path(args.output_dir) /
                                              f"checkpoint-{state.global_step}")


class Zero3Placeholders(transformers.TrainerCallback):  # type: ignore[misc]
    """At one save, rewrite the adapter as ZeRO-3 without a gather leaves it: every tensor [0]."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step != self.step:
            return
        from safetensors.torch import load_file, save_file

        f = Path(args.output_dir) / f"checkpoint-{self.step}" / "adapter_model.safetensors"
        save_file({k: torch.empty(0, dtype=v.dtype) for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt"})


class NanAt(transformers.TrainerCallback):  # type: ignore[misc]
    """At the end of one step (just before the save of that step), a lora_B weight turns NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kw: Any) -> None:
        if state.global_step != self.step:
            return
        name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
        with torch.no_grad():
            param[0, 0] = float("nan")


class SnapshotAfter(Snapshot):
    pass


def test_a_healthy_run_is_untouched(base_dir: Path, tmp_path: Path) -> None:
    before, lines, after = Snapshot(), [], SnapshotAfter()
    doctor = DoctorCallback(stop_on_error=True, log=lines.append)
    trainer = train(base_dir, tmp_path / "out", [before, doctor, after])
    assert trainer.state.global_step == MAX_STEPS
    assert sorted(before.seen) == sorted(after.seen) == [2, 4]
    for step in (2, 4):
        # The callback changed no file of the checkpoint; it only added its report.
        added = {k: v for k, v in after.seen[step].items() if k not in before.seen[step]}
        assert list(added) == [REPORT_NAME]
        assert {k: v for k, v in after.seen[step].items() if k != REPORT_NAME} == before.seen[step]
    assert [r.step for r in doctor.results] == [2, 4]
    for r in doctor.results:
        assert r.blocking == ()
        assert [f for f in r.report.findings if f.severity.value == "error"
                and f.code not in ("LD101", "LD104")] == []
        assert r.report.consumer is not None and r.report.consumer.value == "llava-doctor"
        saved = json.loads(r.report_path.read_text())  # type: ignore[union-attr]
        assert saved == json.loads(r.report.model_dump_json())
        # Headers only by default: the value checks were skipped, not run.
        outcome = {c.code: c for c in r.report.targets[0].checks}
        assert outcome["LD205"].status.value == "skipped"
        # The base recorded by peft (a local dir) was found and used.
        assert r.report.targets[0].inputs[0].path == str(base_dir)
    assert len(lines) == 2
    ckpt2 = tmp_path / "out" / "checkpoint-2"
    assert lines[0].startswith("llava-doctor: checkpoint-2: 0 error(s), 0 warning(s) in ")
    assert lines[0].endswith(f" s; expected in a Trainer checkpoint: LD101, LD104, LD106; "
                             f"report: {ckpt2 / REPORT_NAME}")


def test_zero3_placeholders_stop_the_training_at_that_save(base_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    doctor = DoctorCallback(stop_on_error=True, log=lines.append)
    trainer = train(base_dir, tmp_path / "out", [Zero3Placeholders(step=2), doctor])
    assert trainer.state.global_step == 2  # stopped at the first save, not at MAX_STEPS
    assert not (tmp_path / "out" / "checkpoint-4").exists()
    (r,) = doctor.results
    assert [f.code for f in r.blocking] == ["LD105"]
    report = json.loads((tmp_path / "out" / "checkpoint-2" / REPORT_NAME).read_text())
    assert "LD105" in {f["code"] for f in report["findings"]}
    assert lines[0].startswith("llava-doctor: checkpoint-2: 1 error(s) (LD105), ")
    assert lines[0].endswith("; stopping the training (stop_on_error)")


def test_without_stop_on_error_the_fault_is_reported_and_training_goes_on(
        base_dir: Path, tmp_path: Path) -> None:
    doctor = DoctorCallback(log=lambda _: None)
    trainer = train(base_dir, tmp_path / "out", [Zero3Placeholders(step=2), doctor])
    assert trainer.state.global_step == MAX_STEPS
    assert [(r.step, [f.code for f in r.blocking]) for r in doctor.results] == [
        (2, ["LD105"]), (4, [])]


def test_a_nan_is_found_with_values_and_stops_the_training(base_dir: Path,
                                                            tmp_path: Path) -> None:
    doctor = DoctorCallback(stop_on_error=True, values=True, log=lambda _: None)
    trainer = train(base_dir, tmp_path / "out", [NanAt(step=2), doctor])
    assert trainer.state.global_step == 2
    (r,) = doctor.results
    assert [f.code for f in r.blocking] == ["LD205"]
    assert "adapter_model.safetensors" in r.blocking[0].message


def _trl() -> Any:
    """TRL (a test extra): required under CI=true, skipped for a newcomer without it."""
    import os

    try:
        import trl
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("trl is not installed under CI (it is in the test extra)")
        pytest.skip("trl is not installed")
    return trl


def sft_train(base_dir: Path, out: Path, callbacks: list[Any]) -> Any:
    """TRL's SFTTrainer as its users run it: the model, a `peft_config` (TRL wraps the model
    itself), a tokenizer and a dataset; pre-tokenized here so no chat template is needed."""
    trl = _trl()
    import datasets

    torch.manual_seed(0)
    tok = transformers.LlamaTokenizer(vocab_file=str(base_dir / "tokenizer.model"))
    tok.pad_token = tok.eos_token
    ds = datasets.Dataset.from_dict(
        {"input_ids": [[(j + i) % 128 for j in range(8)] for i in range(32)]})
    args = trl.SFTConfig(
        output_dir=str(out), max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_strategy="steps",
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_steps=100, disable_tqdm=True)
    trainer = trl.SFTTrainer(
        model=transformers.LlamaForCausalLM.from_pretrained(base_dir), args=args,
        train_dataset=ds, processing_class=tok, callbacks=callbacks,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    return trainer


def test_sft_trainer_healthy_run_is_checked_and_untouched(base_dir: Path,
                                                           tmp_path: Path) -> None:
    before, after = Snapshot(), SnapshotAfter()
    doctor = DoctorCallback(stop_on_error=True, log=lambda _: None)
    trainer = sft_train(base_dir, tmp_path / "out", [before, doctor, after])
    assert trainer.state.global_step == MAX_STEPS
    assert [r.step for r in doctor.results] == [2, 4]
    for step in (2, 4):
        added = {k: v for k, v in after.seen[step].items() if k not in before.seen[step]}
        assert list(added) == [REPORT_NAME]
        assert {k: v for k, v in after.seen[step].items() if k != REPORT_NAME} == before.seen[step]
    for r in doctor.results:
        assert r.blocking == ()
        assert r.report.targets[0].inputs[0].path == str(base_dir)


def test_sft_trainer_zero3_placeholders_stop_the_training(base_dir: Path,
                                                          tmp_path: Path) -> None:
    doctor = DoctorCallback(stop_on_error=True, log=lambda _: None)
    trainer = sft_train(base_dir, tmp_path / "out", [Zero3Placeholders(step=2), doctor])
    assert trainer.state.global_step == 2
    assert not (tmp_path / "out" / "checkpoint-4").exists()
    (r,) = doctor.results
    assert [f.code for f in r.blocking] == ["LD105"]


def test_only_the_main_process_checks(tmp_path: Path) -> None:
    doctor = DoctorCallback(stop_on_error=True, log=lambda _: None)
    state = transformers.TrainerState(global_step=2, is_world_process_zero=False)
    control = transformers.TrainerControl()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert doctor.on_save(args, state, control) is control
    assert doctor.results == [] and not control.should_training_stop


def test_importing_the_integration_does_not_import_transformers() -> None:
    code = ("import sys\nimport llava_doctor.integrations.transformers as t\n"
            "print('transformers' in sys.modules)\nt.DoctorCallback\n"
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    assert out == ["False", "True"]


def test_llava_trainer_checkpoint_layout(scenarios: dict[str, Path], tmp_path: Path) -> None:
    """LLaVATrainer's checkpoint-N (adapter and trainer state; config.json and
    non_lora_trainables.bin come only with the final save): nothing blocks, the expected codes
    are named, and a copy with ZeRO-3 placeholders blocks on LD105."""
    from safetensors.torch import load_file, save_file

    from llava_doctor.integrations.transformers import CheckpointDoctor

    lines: list[str] = []
    doctor = CheckpointDoctor(stop_on_error=True, log=lines.append, report_name=None)
    ckpt = scenarios["checkpoint-50"]
    r = doctor.check_checkpoint(ckpt, 50)
    assert r.blocking == () and not doctor.should_stop(r) and r.report_path is None
    assert {"LD101", "LD104"} <= {f.code for f in r.report.findings}
    assert "; expected in a Trainer checkpoint: LD101, LD104" in lines[0]
    broken = tmp_path / "llava-v1.5-tiny-lora" / "checkpoint-50"
    shutil.copytree(ckpt, broken)
    f = broken / "adapter_model.safetensors"
    save_file({k: torch.empty(0, dtype=v.dtype) for k, v in load_file(f).items()}, f)
    r = doctor.check_checkpoint(broken, 50)
    assert [x.code for x in r.blocking] == ["LD105"] and doctor.should_stop(r)


# A tiny llava-hf model (what TRL's SFTTrainer fine-tunes): text-only batches are enough for the
# Trainer to save a plain peft adapter dir, the layout the callback must handle.
def tiny_llava_hf_peft(out: Path) -> Any:
    """Save a tiny llava-hf base in OUT/base and return it wrapped in a LoRA (peft model).
    Runs here and, as source, in the transformers 4.46 venv."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14,
                                       projection_dim=16),
        text_config=LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=64),
        image_token_index=127)
    LlavaForConditionalGeneration(cfg).save_pretrained(out / "base")
    model = LlavaForConditionalGeneration.from_pretrained(out / "base")
    return get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"))


def test_a_llava_hf_adapter_run(tmp_path: Path) -> None:
    """A Trainer on llava-hf saves a plain adapter dir: checked, nothing blocks, and `env`
    reads its key layout (transformers >= 4.52 names from 4.52 on)."""
    import llava_doctor
    from llava_doctor.artifacts.peft_versions import parse_version

    lines: list[str] = []
    doctor = DoctorCallback(stop_on_error=True, log=lines.append)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny_llava_hf_peft(tmp_path), args=args,
                                   train_dataset=_Data(), callbacks=[doctor])
    trainer.train()
    assert trainer.state.global_step == 2
    (r,) = doctor.results
    assert r.blocking == ()
    env = llava_doctor.env(tmp_path / "run" / "checkpoint-2", gpu="none")
    new = parse_version(transformers.__version__) >= (4, 52, 0)
    assert env.runs[0].key_layout == ("llava-hf>=4.52" if new else "llava-hf<4.52")


def test_the_key_layout_of_a_transformers_446_adapter(tmp_path: Path) -> None:
    """Under transformers 4.46 the same adapter is saved with the older names."""
    import inspect
    import os

    from safetensors import safe_open

    from llava_doctor.envinfo import adapter_key_layout

    py = os.environ.get("LLAVA_DOCTOR_HF446_PYTHON")
    if not py:
        if os.environ.get("CI") == "true":
            pytest.fail("LLAVA_DOCTOR_HF446_PYTHON is not set under CI")
        pytest.skip("LLAVA_DOCTOR_HF446_PYTHON is not set")
    script = ("import sys\nfrom pathlib import Path\nfrom typing import Any\n\n"
              + inspect.getsource(tiny_llava_hf_peft)
              + "\nout = Path(sys.argv[1])\ntiny_llava_hf_peft(out).save_pretrained(out / 'adapter')\n")
    subprocess.run([py, "-c", script, str(tmp_path)], check=True, capture_output=True,
                   timeout=600)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert adapter_key_layout(keys) == "llava-hf<4.52"
