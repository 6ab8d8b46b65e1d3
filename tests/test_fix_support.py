"""Helpers shared by the test_fix* modules: a byte/mtime snapshot and one builder per fix case.

(No tests in this module; it is named test_fix_* so that it belongs to the fix test files.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_doctor.artifacts.discovery import STATE_DIR
from llava_doctor.checks.context import Options
from llava_doctor.fixtures import TINY, Dims, add_checkpoint, build_base, build_lora, build_pretrain
from llava_doctor.models import FixSafety, Report

Snapshot = dict[str, tuple]


def snapshot(root: Path, *, dir_mtimes: bool = True, with_state: bool = True) -> Snapshot:
    """Every path under `root`: file bytes (sha256), mtime_ns and mode; symlink targets; and
    (with `dir_mtimes`) each directory's mtime, so that even a created-then-deleted file shows.
    `with_state=False` leaves out `.llava-doctor/` folders (the fix's own backups)."""
    out: Snapshot = {}
    root = Path(root)
    if dir_mtimes:
        out["."] = ("dir", root.stat().st_mtime_ns)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if not with_state:
            dirnames[:] = [d for d in dirnames if d != STATE_DIR]
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                if dir_mtimes:
                    out[rel] = ("dir", p.stat().st_mtime_ns)
            else:
                st = p.stat()
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns,
                            st.st_mode)
    return out


def under(snap: Snapshot, prefix: str) -> Snapshot:
    """The entries of a snapshot below one relative folder."""
    return {k: v for k, v in snap.items() if k == prefix or k.startswith(prefix + os.sep)}


def codes(report: Report) -> set[str]:
    return {f.code for f in report.findings}


def write_json(path: Path, obj: dict[str, Any], *, newline: bool = True) -> None:
    """transformers' layout (indent 2, sorted keys), as the fixture builder writes configs."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + ("\n" if newline else ""))


def edit_config(path: Path, **changes: Any) -> None:
    """Change top-level keys of a JSON file (None removes the key), keeping the layout."""
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    write_json(path, obj, newline=path.read_text().endswith("\n"))


# --- the cases ---------------------------------------------------------------------------------

#: TINY, but with CLIP-L's 1024-wide features: the width the LD101 synthesis can name a tower for.
WIDE = Dims(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, vocab=128, mm_hidden=1024)


def base_dir(root: Path, dims: Dims = TINY) -> Path:
    return build_base(root / "vicuna-tiny-v1.5", dims, shards=1, generation_config="valid")


def pretrain_dir(root: Path, dims: Dims = TINY, **kw: Any) -> Path:
    return build_pretrain(root / "llava-v1.5-tiny-pretrain", dims, **kw)


def lora_dir(root: Path, name: str = "llava-v1.5-tiny-lora", *, dims: Dims = TINY,
             pretrain: bool = True, **kw: Any) -> tuple[Path, Path]:
    """(a LoRA dir trained from the tiny vicuna base, the base) — with a sibling stage-1 dir."""
    base = base_dir(root, dims)
    pre = pretrain_dir(root, dims) if pretrain else None
    lora = build_lora(root / name, dims, base=base, projector_from=pre, **kw)
    return lora, base


@dataclass(frozen=True)
class Case:
    """One fix: how to build a target that needs it, and what the fix must leave behind."""

    id: str
    code: str
    safety: FixSafety
    build: Callable[[Path], tuple[Path, Options]]
    verify: Callable[[Path], None] = field(default=lambda p: None)
    peft: str | None = None

    @property
    def unsafe(self) -> bool:
        return self.safety == FixSafety.unsafe


def _opts(base: Path, **kw: Any) -> Options:
    return Options(base=base, peft_version=kw.pop("peft_version", "0.21.2"), **kw)


def _checkpoint(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root)
    return add_checkpoint(lora, 50), _opts(base)


def _no_config_stage1(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root)
    (lora / "config.json").unlink()
    return lora, _opts(base)


def _no_config_synth(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, dims=WIDE, pretrain=False)
    (lora / "config.json").unlink()
    return lora, _opts(base)


def _checkpoint_stage1(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root)
    ckpt = add_checkpoint(lora, 50)
    (lora / "non_lora_trainables.bin").unlink()  # the run never reached its final save
    return ckpt, _opts(base)


def _name_without_lora(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, "llava-v1.5-tiny-finetune")
    return lora, _opts(base)


def _checkpoint_plain_name(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, "output")
    return add_checkpoint(lora, 200), _opts(base)


def _peft_defaults(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, peft_version="0.10.0")
    return lora, _opts(base, peft_version="0.8.0")


def _rslora(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, peft_version="0.10.0", use_rslora=True, r=8, alpha=16)
    return lora, _opts(base, peft_version="0.7.0")


def _qlora(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, quantization_config=True)
    return lora, _opts(base)


def _no_projector_type(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root)
    edit_config(lora / "config.json", mm_projector_type=None)
    return lora, _opts(base)


def _empty_non_lora(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, non_lora_style="empty")
    return lora, _opts(base)


def _keys(style: str) -> Callable[[Path], tuple[Path, Options]]:
    def build(root: Path) -> tuple[Path, Options]:
        lora, base = lora_dir(root, non_lora_style=style)
        return lora, _opts(base)
    return build


def _tower_path(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, mm_vision_tower="/mnt/share/ckpt/clip-vit-large-patch14-336")
    return lora, _opts(base)


def _model_type_llava(root: Path) -> tuple[Path, Options]:
    lora, base = lora_dir(root, model_type="llava")
    return lora, _opts(base)


def _json(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text())


def _verify_config_copied_from_parent(p: Path) -> None:
    assert (p / "config.json").read_bytes() == (p.parent / "config.json").read_bytes()


def _verify_config_from_stage1(p: Path) -> None:
    assert (p / "config.json").read_bytes() == \
        (p.parent / "llava-v1.5-tiny-pretrain" / "config.json").read_bytes()


def _verify_synth(p: Path) -> None:
    cfg = _json(p / "config.json")
    assert cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["mm_hidden_size"] == 1024
    assert cfg["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert cfg["model_type"] == "llava_llama"
    assert cfg["mm_use_im_patch_token"] is False  # not LLaVA's True default: no <im_patch> token
    assert cfg["hidden_size"] == 64 and cfg["architectures"] == ["LlamaForCausalLM"]


def _tensors(p: Path) -> dict[str, Any]:
    import torch

    return torch.load(p, map_location="cpu", weights_only=True)


def _verify_non_lora_from_parent(p: Path) -> None:
    got = _tensors(p / "non_lora_trainables.bin")
    want = _tensors(p.parent / "non_lora_trainables.bin")
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and got[k].equal(want[k]) for k in want)


def _verify_non_lora_from_stage1(p: Path) -> None:
    got = _tensors(p / "non_lora_trainables.bin")
    stage1 = _tensors(p.parent.parent / "llava-v1.5-tiny-pretrain" / "mm_projector.bin")
    assert sorted(got) == sorted("base_model.model." + k for k in stage1)
    assert all(got["base_model.model." + k].equal(v) for k, v in stage1.items())


def _verify_link(name: str) -> Callable[[Path], None]:
    def verify(p: Path) -> None:
        link = p.parent / name
        assert link.is_symlink() and os.readlink(link) == p.name
        assert link.resolve() == p.resolve()
    return verify


def _verify_peft_defaults(p: Path) -> None:
    cfg = _json(p / "adapter_config.json")
    assert "use_dora" not in cfg and "layer_replication" not in cfg
    assert cfg["use_rslora"] is False  # known to 0.8.0: kept


def _verify_rslora(p: Path) -> None:
    cfg = _json(p / "adapter_config.json")
    assert "use_rslora" not in cfg
    # plain LoRA scaling alpha'/r equals rslora's alpha/sqrt(r), as floats
    assert cfg["lora_alpha"] / cfg["r"] == 16 / 8 ** 0.5


def _verify_no_quant(p: Path) -> None:
    assert "quantization_config" not in _json(p / "config.json")


def _verify_type(p: Path) -> None:
    assert _json(p / "config.json")["mm_projector_type"] == "mlp2x_gelu"


def _verify_injected(p: Path) -> None:
    got = _tensors(p / "non_lora_trainables.bin")
    stage1 = _tensors(p.parent / "llava-v1.5-tiny-pretrain" / "mm_projector.bin")
    assert {k: v.shape for k, v in got.items()} == \
        {"base_model.model." + k: v.shape for k, v in stage1.items()}


def _verify_canonical(p: Path) -> None:
    got = _tensors(p / "non_lora_trainables.bin")
    assert sorted(got) == [f"base_model.model.model.mm_projector.{s}"
                           for s in ("0.bias", "0.weight", "2.bias", "2.weight")]


def _verify_tower(p: Path) -> None:
    assert _json(p / "config.json")["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"


def _verify_model_type(p: Path) -> None:
    assert _json(p / "config.json")["model_type"] == "llava_llama"


CASES: list[Case] = [
    Case("LD101-parent", "LD101", FixSafety.safe, _checkpoint, _verify_config_copied_from_parent),
    Case("LD101-stage1", "LD101", FixSafety.safe, _no_config_stage1, _verify_config_from_stage1),
    Case("LD101-synth", "LD101", FixSafety.unsafe, _no_config_synth, _verify_synth),
    Case("LD104-parent", "LD104", FixSafety.unsafe, _checkpoint, _verify_non_lora_from_parent),
    Case("LD104-stage1", "LD104", FixSafety.unsafe, _checkpoint_stage1,
         _verify_non_lora_from_stage1),
    Case("LD106-name", "LD106", FixSafety.safe, _name_without_lora,
         _verify_link("llava-v1.5-tiny-finetune-lora")),
    Case("LD106-checkpoint", "LD106", FixSafety.safe, _checkpoint_plain_name,
         _verify_link("llava-output-checkpoint-200-lora")),
    Case("LD201-defaults", "LD201", FixSafety.safe, _peft_defaults, _verify_peft_defaults),
    Case("LD201-rslora", "LD201", FixSafety.unsafe, _rslora, _verify_rslora),
    Case("LD208", "LD208", FixSafety.safe, _qlora, _verify_no_quant),
    Case("LD301", "LD301", FixSafety.safe, _no_projector_type, _verify_type),
    Case("LD302", "LD302", FixSafety.unsafe, _empty_non_lora, _verify_injected),
    Case("LD305-ddp", "LD305", FixSafety.safe, _keys("ddp"), _verify_canonical),
    Case("LD305-bare", "LD305", FixSafety.safe, _keys("bare"), _verify_canonical),
    Case("LD305-llava-hf", "LD305", FixSafety.safe, _keys("llava-hf"), _verify_canonical),
    Case("LD307", "LD307", FixSafety.unsafe, _tower_path, _verify_tower),
    Case("LD406", "LD406", FixSafety.safe, _model_type_llava, _verify_model_type),
]


def copytree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _no_patch_token_flag(root: Path) -> tuple[Path, Options]:
    # TINY's vocab is exactly the 128 pieces of the base tokenizer: no room for <im_patch>.
    lora, base = lora_dir(root)
    edit_config(lora / "config.json", mm_use_im_patch_token=None)
    return lora, _opts(base)


def _verify_patch_flag(p: Path) -> None:
    assert _json(p / "config.json")["mm_use_im_patch_token"] is False


CASES.append(Case("LD403", "LD403", FixSafety.safe, _no_patch_token_flag, _verify_patch_flag))
