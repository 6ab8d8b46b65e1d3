"""`convert` and `merge --to llava-hf`: original LLaVA -> the canonical llava-hf checkpoint.

Fixtures are real and tiny: the LLaVA checkpoint as LLaVA writes it (the project's builder,
with a fast tokenizer built by the `tokenizers` library, since neither venv can convert a
sentencepiece model without protobuf), a CLIPVisionModel saved by transformers as the
--vision-tower dir. The converted model is loaded by transformers 5.x (this venv) and 4.46.3
(LLAVA_DOCTOR_HF446_PYTHON) in a child process that recomputes LLaVA's own forward pass of the
original checkpoint (tests/hf_convert_probe.py): LLaVA-1.5's, and LLaVA-NeXT's anyres +
spatial_unpad for the v1.6-style run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llava_doctor.cli import main
from llava_doctor.fixtures import TINY, build_base, build_lora
from llava_doctor.merge import MergeEvent
from llava_doctor.merge.convert import convert

PROBE = Path(__file__).with_name("hf_convert_probe.py")
HF446 = "LLAVA_DOCTOR_HF446_PYTHON"
PINPOINTS = [[30, 60], [60, 30], [60, 60]]
CLIP_PREPROCESSOR = {  # openai/clip-vit-large-patch14-336's, at the tiny tower's 30 px
    "crop_size": {"height": 30, "width": 30}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type":
    "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 30}}


def fast_tokenizer(d: Path) -> None:
    """Replace the builder's tokenizer.model by the equivalent tokenizer.json."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer.model").unlink()
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "LlamaTokenizerFast"
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def clip_tower(d: Path, hidden: int = TINY.mm_hidden, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=30, patch_size=6, projection_dim=16)
    CLIPVisionModel(cfg).save_pretrained(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    return d


def edit_config(d: Path, **fields: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert-hf")
    llava = build_base(root / "llava-v1.5-tiny", TINY, llava=True, shards=2)
    fast_tokenizer(llava)
    nxt = build_base(root / "llava-v1.6-tiny", TINY, llava=True, shards=1, image_newline=True,
                     seed=3)
    fast_tokenizer(nxt)
    edit_config(nxt, image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS)
    clip = clip_tower(root / "clip-tiny")
    g = torch.Generator().manual_seed(0)
    inputs = root / "inputs.pt"
    torch.save({"pixels": torch.randn(1, 3, 30, 30, generator=g), "before": [1, 5, 17, 40],
                "after": [9, 33, 2],
                "image": torch.randint(0, 256, (30, 30, 3), generator=g, dtype=torch.uint8),
                # anyres crops of a 30x50 image: the base crop and a 1x2 grid
                "crops": torch.randn(1, 3, 3, 30, 30, generator=g)},
               inputs)
    hf = root / "llava-v1.5-tiny-hf"
    convert(llava, hf, vision_tower=clip, dtype="auto", device="cpu", durable=False)
    hf_next = root / "llava-v1.6-tiny-hf"
    convert(nxt, hf_next, vision_tower=clip, dtype="auto", device="cpu", durable=False)
    return {"root": root, "llava": llava, "next": nxt, "clip": clip, "inputs": inputs,
            "hf": hf, "hf_next": hf_next}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --- layout, config, processor files ----------------------------------------------------------

def test_convert_cli_writes_the_canonical_layout(work: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llava-v1.5-tiny-hf"
    rc, stdout, stderr = _cli(["convert", str(work["llava"]), "--out", str(out),
                               "--vision-tower", str(work["clip"]), "--device", "cpu"], capsys)
    assert rc == 0, stderr
    assert stdout.startswith(f"converted {work['llava']} -> {out}\n")
    assert "each new row the mean of the existing rows" in stdout
    got = _tensors(out)
    orig = _tensors(work["llava"])
    clip = load_file(str(work["clip"] / "model.safetensors"))
    want = ({"language_model.model." + k[len("model."):] for k in orig
             if k.startswith("model.") and not k.startswith("model.mm_projector.")}
            | {"language_model.lm_head.weight"}
            | {f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
            | {"vision_tower.vision_model." + k for k in clip})
    assert set(got) == want
    assert all(t.dtype == torch.float16 for t in got.values())
    assert torch.equal(got["multi_modal_projector.linear_2.weight"],
                       orig["model.mm_projector.2.weight"])
    assert torch.equal(got["vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"],
                       clip["encoder.layers.2.mlp.fc1.weight"].half())
    for hf_name, name in (("language_model.model.embed_tokens.weight",
                           "model.embed_tokens.weight"),
                          ("language_model.lm_head.weight", "lm_head.weight")):
        emb, src = got[hf_name], orig[name]
        assert emb.shape == (192, 64)  # 128 + <image> + <pad>, padded to a multiple of 64
        assert torch.equal(emb[:128], src)
        mean = src.double().mean(0).half()
        assert torch.equal(emb[128:], mean.expand(64, 64))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert (cfg["image_token_index"], cfg["pad_token_id"], cfg["image_seq_length"]) == (128, 129, 25)
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["text_config"]["vocab_size"] == 192 and cfg["text_config"]["model_type"] == "llama"
    assert not [k for k in cfg["text_config"] if k.startswith("mm_")]
    assert cfg["vision_config"]["model_type"] == "clip_vision_model"
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre == CLIP_PREPROCESSOR
    proc = json.loads((out / "processor_config.json").read_text())
    assert proc == {"processor_class": "LlavaProcessor", "image_token": "<image>",
                    "patch_size": 6, "vision_feature_select_strategy": "default",
                    "num_additional_image_tokens": 1}
    tj = json.loads((out / "tokenizer.json").read_text())
    assert [(a["id"], a["content"]) for a in tj["added_tokens"][-2:]] == [(128, "<image>"),
                                                                          (129, "<pad>")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no partial dir left


def test_progress_goes_through_the_observer(work: dict[str, Path], tmp_path: Path) -> None:
    events: list[MergeEvent] = []
    convert(work["llava"], tmp_path / "o", vision_tower=work["clip"], device="cpu",
            durable=False, observer=events.append)
    phases = [e.phase for e in events]
    assert phases[:3] == ["checks", "plan", "write"]
    assert phases[-3:] == ["finalize", "verify", "done"]
    last = [e for e in events if e.phase == "write"][-1]
    assert last.done == last.total and last.bytes_done == last.bytes_total > 0


# --- loading in transformers, same logits as LLaVA -------------------------------------------

def _python(which: str) -> str:
    if which == "5.x":
        return sys.executable
    exe = os.environ.get(HF446)
    if not exe:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{HF446} is not set under CI")
        pytest.skip(f"{HF446} not set: no transformers 4.46.3 interpreter")
    return exe


def _probe(which: str, work: dict[str, Path], orig: str, conv: str, kind: str,
           tmp_path: Path) -> dict[str, object]:
    result = tmp_path / "result.json"
    proc = subprocess.run([_python(which), str(PROBE), str(work[orig]), str(work["clip"]),
                           str(work[conv]), str(work["inputs"]), str(result), kind],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.parametrize("which", ["5.x", "4.46"])
def test_llava_loads_cleanly_and_gives_llavas_logits(which: str, work: dict[str, Path],
                                                     tmp_path: Path) -> None:
    r = _probe(which, work, "llava", "hf", "llava", tmp_path)
    assert r["class"] == "LlavaForConditionalGeneration"
    assert (r["missing"], r["unexpected"], r["mismatched"]) == ([], [], [])
    assert r["features"] == 25
    # Same weights, same maths in float32: equal up to float32 rounding.
    assert r["max_abs_diff"] <= 1e-6 * max(1.0, r["ref_scale"]), r  # type: ignore[operator]
    assert (r["image_token_id"], r["pad_token_id"], r["len_tokenizer"]) == (128, 129, 130)
    system = ("A chat between a curious human and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the human's questions.")
    assert r["chat"] == f"{system} USER: <image>\nhi ASSISTANT:"
    if r["processor"] != "no PIL in this environment":
        assert r["processor"] == "LlavaProcessor"
        assert r["image_tokens"] == r["model_features"] == 25


@pytest.mark.parametrize("which", ["5.x", "4.46"])
def test_llava_next_loads_cleanly_and_gives_llavas_logits(which: str, work: dict[str, Path],
                                                          tmp_path: Path) -> None:
    r = _probe(which, work, "next", "hf_next", "next", tmp_path)
    assert r["class"] == "LlavaNextForConditionalGeneration"
    assert (r["missing"], r["unexpected"], r["mismatched"]) == ([], [], [])
    # base crop (25) + the 1x2 grid unpadded to 5x8 with a newline after each row (45)
    assert r["features"] == 70
    assert r["max_abs_diff"] <= 1e-6 * max(1.0, r["ref_scale"]), r  # type: ignore[operator]
    if r["processor"] != "no PIL in this environment":
        assert r["processor"] == "LlavaNextProcessor"
        assert r["image_tokens"] == r["model_features"] > 0


def test_next_output_keeps_image_newline_and_pinpoints(work: dict[str, Path]) -> None:
    got = _tensors(work["hf_next"])
    orig = _tensors(work["next"])
    assert torch.equal(got["image_newline"], orig["model.image_newline"])
    cfg = json.loads((work["hf_next"] / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["image_grid_pinpoints"] == PINPOINTS
    pre = json.loads((work["hf_next"] / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaNextImageProcessor"
    assert pre["image_grid_pinpoints"] == PINPOINTS
    assert "image_newline" not in _tensors(work["hf"])  # flat runs have none to keep


@pytest.mark.parametrize("which", ["5.x", "4.46"])
def test_siglip_tower_loads_cleanly(which: str, work: dict[str, Path], tmp_path: Path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    siglip = tmp_path / "siglip-tiny"
    SiglipVisionModel(SiglipVisionConfig(
        hidden_size=TINY.mm_hidden, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, image_size=30, patch_size=6)).save_pretrained(str(siglip))
    out = tmp_path / "llava-siglip-hf"
    convert(work["llava"], out, vision_tower=siglip, device="cpu", durable=False)
    cfg = json.loads((out / "config.json").read_text())
    # no CLS token to drop: every patch is a feature
    assert cfg["vision_feature_select_strategy"] == "full" and cfg["image_seq_length"] == 25
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    proc = json.loads((out / "processor_config.json").read_text())
    assert proc["num_additional_image_tokens"] == 0
    tmp_work = dict(work, hf_siglip=out, clip=siglip)
    r = _probe(which, tmp_work, "llava", "hf_siglip", "load", tmp_path)
    assert (r["missing"], r["unexpected"], r["mismatched"]) == ([], [], [])


# --- the tower saved inside LLaVA's merged output wins ------------------------------------------

def _with_own_tower(src: Path, dst: Path, clip: Path, *, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    own = {f"model.vision_tower.vision_tower.vision_model.{k}": (v + 0.5).half()
           for k, v in load_file(str(clip / "model.safetensors")).items() if k != drop}
    save_file(own, str(dst / "model-tower.safetensors"), metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-tower.safetensors" for k in own})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_checkpoint_tower_wins_over_the_clip_dir(work: dict[str, Path], tmp_path: Path) -> None:
    src = _with_own_tower(work["llava"], tmp_path / "llava-v1.5-merged", work["clip"])
    out = convert(src, tmp_path / "hf", vision_tower=work["clip"], device="cpu", durable=False)
    got = _tensors(tmp_path / "hf")
    own = load_file(str(src / "model-tower.safetensors"))
    for k, v in own.items():
        assert torch.equal(got["vision_tower.vision_model." + k.split(".vision_model.", 1)[1]], v)
    assert any("weights saved in the checkpoint" in n for n in out.notes)


# --- merge --to llava-hf ---------------------------------------------------------------------

def test_merge_to_llava_hf_equals_convert_of_the_merge(work: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    base = build_base(tmp_path / "vicuna-tiny", TINY)
    lora = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=base)
    direct = tmp_path / "direct-hf"
    rc, stdout, stderr = _cli(["merge", str(lora), "--base", str(base), "--out", str(direct),
                               "--to", "llava-hf", "--vision-tower", str(work["clip"]),
                               "--device", "cpu"], capsys)
    assert rc == 0, stderr
    assert "14 received a LoRA delta" in stdout
    merged = tmp_path / "llava-v1.5-tiny-merged"
    assert _cli(["merge", str(lora), "--base", str(base), "--out", str(merged), "--device",
                 "cpu"], capsys)[0] == 0
    via = tmp_path / "via-hf"
    assert _cli(["convert", str(merged), "--out", str(via), "--vision-tower",
                 str(work["clip"]), "--device", "cpu"], capsys)[0] == 0
    a, b = _tensors(direct), _tensors(via)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["language_model.model.embed_tokens.weight"].shape[0] == 192
    ca = json.loads((direct / "config.json").read_text())
    cb = json.loads((via / "config.json").read_text())
    assert ca["text_config"]["vocab_size"] == cb["text_config"]["vocab_size"] == 192
    assert ca["vision_config"] == cb["vision_config"]
    # vicuna's sentencepiece tokenizer: the added tokens go to tokenizer_config.json and
    # added_tokens.json (transformers builds the fast tokenizer from those)
    tc = json.loads((direct / "tokenizer_config.json").read_text())
    assert {k: v["content"] for k, v in tc["added_tokens_decoder"].items()} == {
        "128": "<image>", "129": "<pad>"}
    assert tc["pad_token"] == "<pad>" and tc["chat_template"].startswith("{%- set ns")
    assert json.loads((direct / "added_tokens.json").read_text()) == {"<image>": 128,
                                                                     "<pad>": 129}
    assert (direct / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()


# --- refusals: one line, exit 1 or 2, nothing written ----------------------------------------

def _refusal_case(case: str, work: dict[str, Path], d: Path) -> tuple[Path, list[str]]:
    src = d / "llava-v1.5-tiny"
    tower = ["--vision-tower", str(work["clip"])]
    if case == "LD809":
        _with_own_tower(work["llava"], src, work["clip"],
                        drop="encoder.layers.0.mlp.fc1.weight")
        return src, tower
    shutil.copytree(work["llava"], src)
    if case == "LD801":
        edit_config(src, mm_projector_type="linear")
    elif case == "LD802":
        edit_config(src, mm_vision_tower="nobody/no-such-clip")
        tower = []
    elif case == "LD803":
        other = d / "not-clip"
        shutil.copytree(work["clip"], other)
        edit_config(other, model_type="bert")
        tower = ["--vision-tower", str(other)]
    elif case == "LD804":
        tower = ["--vision-tower", str(clip_tower(d / "clip-48", hidden=48))]
    elif case == "LD805":
        edit_config(src, mm_use_im_start_end=True)
    elif case == "LD806":
        tc = json.loads((src / "tokenizer_config.json").read_text())
        tc["added_tokens_decoder"] = {"128": {"content": "<extra>", "special": True}}
        (src / "tokenizer_config.json").write_text(json.dumps(tc))
    elif case == "LD807":
        edit_config(src, mm_vision_select_feature="cls")
    elif case == "LD808":
        edit_config(src, mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                    image_grid_pinpoints=PINPOINTS)
    return src, tower


@pytest.mark.parametrize("case", ["LD801", "LD802", "LD803", "LD804", "LD805", "LD806",
                                  "LD807", "LD808", "LD809"])
def test_unmappable_input_is_refused_before_writing(case: str, work: dict[str, Path],
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src, tower = _refusal_case(case, work, tmp_path)
    capsys.readouterr()  # transformers' own output while building the fixture
    out = tmp_path / "out-hf"
    rc, stdout, stderr = _cli(["convert", str(src), "--out", str(out), *tower], capsys)
    assert rc == (2 if case == "LD802" else 1), stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-doctor: error: "), stderr
    if case == "LD802":
        assert "pass --vision-tower CLIP_DIR" in lines[0]
        assert "huggingface-cli download nobody/no-such-clip" in lines[0]
    else:
        assert lines[0].endswith(f"({case}); nothing was written; `llava-doctor explain "
                                 f"{case}` says why and what to do; LD8xx inputs have no "
                                 "llava-hf form and cannot be forced"), lines[0]
        assert case in stdout
    assert not out.exists() and not list(tmp_path.glob("out-hf.*"))
    # check --to llava-hf says the same in advance
    rc, stdout, _ = _cli(["check", str(src), "--to", "llava-hf", *tower], capsys)
    assert rc == 1 and case in stdout


def test_check_without_to_runs_no_conversion_checks(work: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, _ = _cli(["check", str(work["llava"]), "--format", "json"], capsys)
    report = json.loads(stdout)
    outcomes = {c["code"]: c for t in report["targets"] for c in t["checks"]}
    assert outcomes["LD801"]["status"] == "skipped"
    assert [f["code"] for f in report["findings"]] == ["LD107"]  # a model dir is not a LoRA run


def test_unknown_conv_template_is_a_usage_error(work: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, stderr = _cli(["convert", str(work["llava"]), "--out", str(tmp_path / "o"),
                          "--conv-template", "nope"], capsys)
    assert rc == 2 and "unknown --conv-template 'nope'" in stderr
    assert not (tmp_path / "o").exists()


def test_header_of_written_shard_is_canonical(work: dict[str, Path]) -> None:
    shard = next(work["hf"].glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        names = list(f.keys())
    assert all(n.startswith(("language_model.", "vision_tower.vision_model.",
                             "multi_modal_projector.")) for n in names)


@pytest.mark.parametrize("case", ["LD801", "LD802"])
def test_merge_to_llava_hf_refuses_before_writing(case: str, work: dict[str, Path],
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base = build_base(tmp_path / "vicuna-tiny", TINY)
    lora = build_lora(tmp_path / "llava-v1.5-tiny-lora", TINY, base=base,
                      projector_type="linear" if case == "LD801" else "mlp2x_gelu",
                      mm_vision_tower="nobody/no-such-clip")
    tower = ["--vision-tower", str(work["clip"])] if case == "LD801" else []
    out = tmp_path / "out-hf"
    rc, stdout, stderr = _cli(["merge", str(lora), "--base", str(base), "--out", str(out),
                               "--to", "llava-hf", "--force", *tower], capsys)
    assert rc == (2 if case == "LD802" else 1), stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-doctor: error: "), stderr
    assert (f"({case}); nothing was written" in lines[0]) if case == "LD801" else (
        "huggingface-cli download nobody/no-such-clip" in lines[0])
    assert not out.exists() and not list(tmp_path.glob("out-hf.*"))
    rc, stdout, _ = _cli(["check", str(lora), "--base", str(base), "--to", "llava-hf",
                          *tower], capsys)
    assert rc == 1 and case in stdout


def test_convert_killed_midway_leaves_no_output(work: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "llava-v1.5-tiny-hf"
    cmd = [sys.executable, "-m", "llava_doctor", "convert", str(work["llava"]), "--out",
           str(out), "--vision-tower", str(work["clip"]), "--device", "cpu", "-q"]
    env = {**os.environ, "LLAVA_DOCTOR_TEST_ABORT_AFTER_WRITES": "3"}
    killed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -9  # SIGKILL after the third write
    assert not out.exists() and len(list(tmp_path.glob(f"{out.name}.partial-*"))) == 1
    env.pop("LLAVA_DOCTOR_TEST_ABORT_AFTER_WRITES")
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the leftover is gone
