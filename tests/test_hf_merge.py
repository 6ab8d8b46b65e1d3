"""`llava-doctor merge` on llava-hf runs, checked against the libraries themselves.

The merged output must load with `from_pretrained(..., output_loading_info=True)` with no missing
or unexpected keys and give the logits (image + text input) of the unmerged peft model, under
this venv's transformers 5.x and under transformers 4.46.3 + peft 0.13.2, whichever version
trained the adapter. Where peft + transformers 5.x crash or drop the LoRA of a 4.46 adapter,
our output equals the reference computed where it works (4.46.3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_support import World, logits_many, need_hf446, python_here, run_jobs
from safetensors import safe_open

from llava_doctor.checks.context import Options
from llava_doctor.fixes import apply_plan, plan_fixes
from llava_doctor.merge import merge

NAMES = ["lm", "mts", "all-linear", "names", "dora", "next-mts", "next-all-linear"]
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _arch(name: str) -> str:
    return "llava_next" if name.startswith("next") else "llava"


def _merge_all(world: World, out: Path) -> dict[str, Path]:
    done = {}
    for name in NAMES:
        dest = out / f"merged-{name}"
        merge(world.adapters[name], world.bases[_arch(name)], dest, dtype="auto", device="cpu",
              durable=False)
        done[name] = dest
    return done


@pytest.fixture(scope="module")
def merged5(hf5: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _merge_all(hf5, tmp_path_factory.mktemp("merged5"))


@pytest.fixture(scope="module")
def merged4(hf4: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _merge_all(hf4, tmp_path_factory.mktemp("merged4"))


def _clean(result: dict[str, Any]) -> None:
    assert result["ok"], result.get("traceback")
    info = result["loading_info"]
    assert info.get("missing_keys", []) == [] and info.get("unexpected_keys", []) == [], info


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, **TOL), float((a - b).abs().max())


def test_output_is_canonical_and_carries_the_side_files(hf5: World, merged5: dict[str, Path]
                                                        ) -> None:
    out = merged5["mts"]
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as f:
        keys = set(f.keys())
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "language_model.lm_head.weight" in keys and "multi_modal_projector.linear_1.weight" \
        in keys
    assert not [k for k in keys if k.startswith(("model.", "vision_tower.embeddings"))]
    nxt = merged5["next-mts"]
    with safe_open(str(next(nxt.glob("model-*.safetensors"))), "pt") as f:
        assert "image_newline" in set(f.keys())
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((hf5.bases["llava"] / "config.json").read_text())
    assert cfg == {**base_cfg, "dtype": "float32"}
    if hf5.proc:  # processor/tokenizer files come from the 4.46 venv
        for n in ("preprocessor_config.json", "processor_config.json", "chat_template.json",
                  "tokenizer.model", "added_tokens.json"):
            assert (out / n).read_bytes() == (hf5.bases["llava"] / n).read_bytes()


def test_adapter_dir_files_win(hf5: World, tmp_path: Path) -> None:
    if not hf5.proc:
        pytest.skip("no processor files without the 4.46 venv")
    ad = hf5.copy("lm", tmp_path)
    shutil.copyfile(hf5.bases["llava"] / "processor_config.json", ad / "processor_config.json")
    pc = json.loads((ad / "processor_config.json").read_text())
    pc["num_additional_image_tokens"] = 1
    (ad / "processor_config.json").write_text(json.dumps(pc, indent=1))
    r = merge(ad, hf5.bases["llava"], tmp_path / "out", dtype="auto", device="cpu",
              durable=False)
    assert json.loads((r.out / "processor_config.json").read_text()) == pc
    # the group comes whole from the adapter dir: no preprocessor_config.json there, none here
    assert not (r.out / "preprocessor_config.json").exists()
    assert (r.out / "tokenizer.model").is_file()  # the tokenizer group still from the base


def test_same_logits_as_unmerged_peft_under_5(hf5: World, merged5: dict[str, Path],
                                              tmp_path: Path) -> None:
    items: list[tuple[str, Path, Path | None, str]] = []
    for name in NAMES:
        arch = _arch(name)
        items.append((arch, hf5.bases[arch], hf5.adapters[name], f"ref-{name}"))
        items.append((arch, merged5[name], None, f"ours-{name}"))
    res = logits_many(python_here(), items, tmp_path)
    for name in NAMES:
        ref, rr = res[f"ref-{name}"]
        ours, ro = res[f"ours-{name}"]
        assert rr["ok"], rr.get("traceback")
        _clean(ro)
        _close(ours, ref)


@pytest.fixture(scope="module")
def refs4(hf4: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The unmerged peft model's logits under 4.46.3 + peft 0.13.2: the reference."""
    where = tmp_path_factory.mktemp("refs4")
    res = logits_many(hf4.python, [(_arch(n), hf4.bases[_arch(n)], hf4.adapters[n], n)
                                   for n in NAMES], where)
    out = {}
    for n, (t, r) in res.items():
        assert r["ok"], r.get("traceback")
        out[n] = t
    return out


def test_4_46_adapters_merged_match_4_46_peft_in_both_versions(
        hf4: World, merged4: dict[str, Path], refs4: dict[str, torch.Tensor],
        tmp_path: Path) -> None:
    items: list[tuple[str, Path, Path | None, str]] = [
        (_arch(n), merged4[n], None, n) for n in NAMES]
    for python in (hf4.python, python_here()):
        res = logits_many(python, items, tmp_path / Path(python).parent.parent.name)
        for n in NAMES:
            ours, r = res[n]
            _clean(r)
            _close(ours, refs4[n])


def test_5x_outputs_load_cleanly_in_4_46(hf5: World, merged5: dict[str, Path],
                                         tmp_path: Path) -> None:
    py = need_hf446()
    ref = logits_many(python_here(), [(_arch(n), merged5[n], None, n) for n in NAMES],
                      tmp_path / "here")
    res = logits_many(py, [(_arch(n), merged5[n], None, n) for n in NAMES], tmp_path / "446")
    for n in NAMES:
        ours, r = res[n]
        _clean(r)
        _close(ours, ref[n][0])


def test_what_transformers_5_itself_writes_breaks_4_46(hf5: World, tmp_path: Path) -> None:
    """The reason the output is canonical: peft + transformers 5 `save_pretrained` writes
    `vision_tower.*`, which 4.46 loads with a randomly initialised vision tower."""
    py = need_hf446()
    out = tmp_path / "peft-merged"
    [r] = run_jobs(python_here(), [{"op": "peft_merge", "arch": "llava",
                                    "model": str(hf5.bases["llava"]),
                                    "adapter": str(hf5.adapters["mts"]), "out": str(out)}],
                   tmp_path / "jobs")
    assert r["ok"], r.get("traceback")
    _, res = logits_many(py, [("llava", out, None, "theirs")], tmp_path)["theirs"]
    missing = res["loading_info"]["missing_keys"]
    assert missing and all(k.startswith("vision_tower.vision_model.") for k in missing)


def test_where_peft_on_5_crashes_or_drops_the_lora_ours_is_right(
        hf4: World, merged4: dict[str, Path], refs4: dict[str, torch.Tensor],
        tmp_path: Path) -> None:
    here = python_here()

    def peft5(name: str, adapter: Path) -> tuple[Any, dict[str, Any]]:
        # one interpreter per load: a failed load leaves peft's conversion state behind
        return logits_many(here, [("llava", hf4.bases["llava"], adapter, name)],
                           tmp_path / name)[name]

    _, crash = peft5("mts", hf4.adapters["mts"])
    assert not crash["ok"]
    assert "KeyError" in crash["error"] and "multi_modal_projector" in crash["error"]
    theirs, r = peft5("all-linear", hf4.adapters["all-linear"])
    assert r["ok"], r.get("traceback")
    # loads without a word, but the projector LoRA is not applied: silently wrong
    assert float((theirs - refs4["all-linear"]).abs().max()) > 1e-2
    # vision-tower and language-model LoRA do convert (LD701 does not flag them)
    _close(peft5("names", hf4.adapters["names"])[0], refs4["names"])
    # the LD701 fix renames the 4.46 adapter's keys into the 5.x layout: then peft loads both
    for name in ("mts", "all-linear"):
        fixed = hf4.copy(name, tmp_path / "fixed")
        _, plan = plan_fixes(fixed, Options(base=hf4.bases["llava"],
                                            transformers_version="5.24.0"))
        apply_plan(plan)
        _close(peft5(f"{name}-fixed", fixed)[0], refs4[name])
    # ... and our merges of the same adapters, loaded in 5.x, are the reference
    ours = logits_many(here, [("llava", merged4[n], None, n) for n in ("mts", "all-linear")],
                       tmp_path / "ours")
    for n in ("mts", "all-linear"):
        _close(ours[n][0], refs4[n])


def test_merge_refuses_a_llava_hf_adapter_on_a_plain_llm(hf5: World, scenarios: dict[str, Path],
                                                         tmp_path: Path) -> None:
    from llava_doctor.merge import PreflightRefused

    with pytest.raises(PreflightRefused) as exc:
        merge(hf5.adapters["lm"], scenarios["base-vicuna"], tmp_path / "out", device="cpu")
    assert "LD407" in {f.code for f in exc.value.errors}
    assert not (tmp_path / "out").exists()


def test_4_57_runtime_layout_adapters_merged_match_4_57_peft_in_both_versions(
        hf457: World, tmp_path_factory: pytest.TempPathFactory) -> None:
    """transformers 4.52-4.57 train with the runtime-4.52 module tree (`model.language_model.*`)
    but save checkpoints canonical (`language_model.model.*`): measured with 4.57.6 + peft
    0.17.1 writing the files. Every adapter kind merged here gives the unmerged peft model's
    logits under 4.57, and the output loads with no missing or unexpected keys there and under
    this venv's 5.x."""
    from llava_doctor.artifacts.hf_layout import Layout, detect_adapter_layout, detect_layout

    with safe_open(str(next(hf457.bases["llava"].glob("*.safetensors"))), "pt") as f:
        assert detect_layout(f.keys()) == Layout.canonical
    for name in NAMES:
        with safe_open(str(hf457.adapters[name] / "adapter_model.safetensors"), "pt") as f:
            assert detect_adapter_layout(f.keys()) == Layout.runtime_4, name
    where = tmp_path_factory.mktemp("hf457-merge")
    merged = _merge_all(hf457, where / "merged")
    refs = logits_many(hf457.python, [(_arch(n), hf457.bases[_arch(n)], hf457.adapters[n], n)
                                      for n in NAMES], where / "refs")
    for python in (hf457.python, python_here()):
        res = logits_many(python, [(_arch(n), merged[n], None, n) for n in NAMES],
                          where / Path(python).parent.parent.name)
        for n in NAMES:
            ref, rr = refs[n]
            assert rr["ok"], rr.get("traceback")
            ours, r = res[n]
            _clean(r)
            _close(ours, ref)


def test_4_57_runs_check_clean_for_the_version_that_wrote_them(hf457: World) -> None:
    """The runtime-4.52 adapters against 4.57 itself: no finding says peft's merge there fails."""
    import llava_doctor

    for name in NAMES:
        report = llava_doctor.check(hf457.adapters[name], base=hf457.bases[_arch(name)],
                                    transformers_version=hf457.version, peft_version="0.17.1",
                                    merge_with="peft")
        errors = [(f.code, f.message[:200]) for f in report.findings if f.severity.value == "error"]
        assert errors == [], name


def test_onevision_runs_merge_to_the_peft_models_logits(tmp_path: Path) -> None:
    """`LlavaOnevisionForConditionalGeneration` (anyres image features, `image_newline`):
    a base saved by this venv's transformers and adapters written by its peft (LoRA on the
    language model with the projector as modules_to_save; `all-linear`, which puts LoRA on the
    tower and the projector too) merge into outputs that load with no missing or unexpected key
    and give the unmerged peft model's logits on an image + text input."""
    base = tmp_path / "base-onevision"
    adapters = {name: tmp_path / f"lora-onevision-{name}" for name in ("mts", "all-linear")}
    from hf_support import ADAPTERS

    jobs: list[dict[str, Any]] = [{"op": "base", "arch": "llava_onevision", "out": str(base),
                                   "seed": 0}]
    jobs += [{"op": "adapter", "arch": "llava_onevision", "base": str(base), "out": str(out),
              "seed": 40 + i, "lora": ADAPTERS[name]}
             for i, (name, out) in enumerate(adapters.items())]
    for r in run_jobs(python_here(), jobs, tmp_path / "jobs"):
        assert r["ok"], r.get("traceback")
    items: list[tuple[str, Path, Path | None, str]] = []
    for name, adapter in adapters.items():
        r = merge(adapter, base, tmp_path / f"merged-{name}", dtype="auto", device="cpu",
                  durable=False)
        assert (r.out / "config.json").is_file()
        items += [("llava_onevision", base, adapter, f"ref-{name}"),
                  ("llava_onevision", r.out, None, f"ours-{name}")]
    items.append(("llava_onevision", base, None, "base"))
    res = logits_many(python_here(), items, tmp_path / "logits")
    plain, rb = res["base"]
    _clean(rb)
    for name in adapters:
        ref, rr = res[f"ref-{name}"]
        assert rr["ok"], rr.get("traceback")
        assert float((ref - plain).abs().max()) > 1e-3  # the adapter changes the answer
        ours, ro = res[f"ours-{name}"]
        _clean(ro)
        _close(ours, ref)
