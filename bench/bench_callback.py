"""Per-save overhead of `DoctorCallback`: the same tiny Trainer run with and without it.

Trains a tiny Llama with a peft LoRA on CPU (`--steps` steps, a save every `--save-steps`),
once without the callback and once with it (headers only, then with `--values`), and prints:

  * the callback's own time per save (median and max of what it measured around its work:
    the checks, the report file, the summary line), the first save apart (it imports the checks);
  * the wall time of each whole run, and the difference per save (noisy on a shared machine:
    the callback's own figures are the ones to read).

Usage: python bench/bench_callback.py [--steps 20] [--save-steps 2] [--hidden 64] [--layers 4]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

from llava_doctor.fixtures.builder import tokenizer_model_path
from llava_doctor.integrations.transformers import DoctorCallback


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = (torch.arange(16) + i) % 128
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones(16, dtype=torch.long)}


def run(base: Path, out: Path, steps: int, save_steps: int, callbacks: list[Any]) -> float:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=save_steps, save_strategy="steps",
        per_device_train_batch_size=2, report_to=[], use_cpu=True, logging_steps=10**6,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                   callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-steps", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    saves = a.steps // a.save_steps
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "base"
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=a.hidden,
                                       intermediate_size=2 * a.hidden,
                                       num_hidden_layers=a.layers, num_attention_heads=4,
                                       num_key_value_heads=4, max_position_embeddings=64)
        transformers.LlamaForCausalLM(cfg).save_pretrained(base)
        shutil.copyfile(tokenizer_model_path(), base / "tokenizer.model")
        run(base, root / "warm-up", 2, 2, [])  # imports and first-call costs, for neither side
        plain = run(base, root / "plain", a.steps, a.save_steps, [])
        rows = []
        for label, values in (("headers only (default)", False), ("values=True", True)):
            cb = DoctorCallback(values=values, log=lambda _: None)
            wall = run(base, root / label.split()[0], a.steps, a.save_steps, [cb])
            per = [r.seconds for r in cb.results]
            rows.append((label, per[0], statistics.median(per[1:]), max(per[1:]), wall,
                         (wall - plain) / saves))
    print(f"tiny Llama hidden={a.hidden} layers={a.layers}, LoRA r=8 on q/k/v/o, "
          f"{a.steps} CPU steps, {saves} saves; run without the callback: {plain:.2f} s")
    print("| callback | first save | median save | max save | whole run | "
          "(run - plain) / saves |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, first, med, mx, wall, diff in rows:
        print(f"| {label} | {first * 1e3:.0f} ms | {med * 1e3:.1f} ms | {mx * 1e3:.1f} ms | "
              f"{wall:.2f} s | {diff * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
