"""Golden outputs of the tiny model at fixed seeds (after open_clip's tests/test_inference.py): fixed inputs and
committed expected outputs in tests/golden/, compared with stated tolerances. A change that moves any of them fails
here; if the change is deliberate, regenerate with `python -m tests.golden.regenerate` and commit tests/golden/
(docs/testing.md).

Tolerances (absolute unless said): features 1e-5; logits (|z| ≲ 20) 1e-4; gates r, b 1e-5; the short stage-2 run's
losses 1e-4 relative and its weights' summaries 1e-5 + 1e-4 relative; the two-stage run's losses, accuracies and
D_fg 1e-3 relative (accuracies move in steps of 100/9 %, so that is exact); the bundle's logits 1e-4; file lists,
labels and routed heads exactly. They cover float rounding across CPUs (fp32 matmuls in another
order), not a change of the method: every break of it moves these numbers by orders of magnitude more.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fvgpt.classes import ClassSplit
from fvgpt.config import TrainConfig
from fvgpt.data import load_index
from fvgpt.demo_data import render
from fvgpt.evaluate import evaluate
from fvgpt.model import FVGPTModel
from fvgpt.prompts import PromptLearner
from fvgpt.rundir import load_run
from fvgpt.train import train_plugin, train_prompt
from fvgpt_runtime.bundle import Bundle

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("FVGPT_REGENERATE_GOLDEN") == "1"
LABELS = ["blue_triangle", "green_square", "purple_circle", "red_circle", "red_square", "yellow_cross"]
INPUT_LABELS = ["red circle", "green square", "blue triangle", "yellow cross"]


def fixed_inputs() -> dict[str, torch.Tensor]:
    """Four rendered 64×64 images with their masks and a learned context: created once, committed, never
    regenerated (the goldens are outputs of exactly these bytes)."""
    path = GOLDEN / "inputs.safetensors"
    if not path.is_file():
        assert REGENERATE, f"{path} is missing"
        rng = random.Random(0)
        pairs = [render(label, rng, 64) for label in INPUT_LABELS]
        images = np.stack([np.asarray(img, np.uint8) for img, _ in pairs])
        masks = np.stack([(np.asarray(m, np.uint8)[..., 0] > 127).astype(np.uint8) for _, m in pairs])
        ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.5
        save_file({"images": torch.from_numpy(images), "masks": torch.from_numpy(masks), "context": ctx}, str(path))
    return load_file(str(path))


def flat(value, prefix: str = "") -> dict:
    """{"a.b": leaf} for nested dicts; tensors and arrays become (nested) lists of floats."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if torch.is_tensor(value):
        value = value.detach().double().numpy()
    if isinstance(value, np.ndarray):
        value = value.astype(np.float64).tolist()
    return {prefix[:-1]: value}


def numeric(value) -> bool:
    if isinstance(value, list):
        return all(numeric(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(name: str, actual: dict, atol: float, rtol: float = 0.0) -> None:
    """Compare with tests/golden/<name>.json, or write it when regenerating. Numbers within atol + rtol·|expected|;
    anything else (names, paths, None, booleans) exactly."""
    path = GOLDEN / f"{name}.json"
    actual = flat(actual)
    if REGENERATE:
        old = json.loads(path.read_text()) if path.is_file() else {}
        for key in sorted(set(old) | set(actual)):
            if old.get(key) != actual.get(key):
                print(f"golden {name}: {key} {'moved' if key in old else 'added'}")
        path.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
        return
    assert path.is_file(), f"{path} is missing; run `python -m tests.golden.regenerate`"
    expected = json.loads(path.read_text())
    assert sorted(actual) == sorted(expected), f"golden {name}: the set of outputs changed"
    hint = "deliberate? regenerate with `python -m tests.golden.regenerate` (docs/testing.md)"
    for key, want in expected.items():
        got = actual[key]
        if not (numeric(want) and numeric(got)):
            assert got == want, f"golden {name}: {key} moved: {got!r} != {want!r} ({hint})"
            continue
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape, f"golden {name}: {key} has shape {got.shape}, not {want.shape}"
        diff = float(np.max(np.abs(got - want), initial=0.0))
        assert np.allclose(got, want, atol=atol, rtol=rtol), f"golden {name}: {key} moved by {diff:.3g} ({hint})"


@pytest.fixture(scope="module")
def inputs(backbone):
    raw = fixed_inputs()
    pre = backbone.preprocess
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    pixels = (raw["images"].permute(0, 3, 1, 2).float() / 255 - mean) / std
    return {"pixels": pixels, "masks": raw["masks"][:, None].float(), "context": raw["context"]}


def golden_model(backbone, inputs) -> FVGPTModel:
    model = FVGPTModel(backbone, ClassSplit.paper(LABELS), TrainConfig(data="unused"),
                       PromptLearner(inputs["context"]).requires_grad_(False))
    torch.manual_seed(0)
    model.new_plugin(backbone.logit_scale).requires_grad_(False)
    return model.eval()


def test_golden_features_and_plugin_outputs(backbone, inputs):
    model = golden_model(backbone, inputs)
    pixels, masks = inputs["pixels"], inputs["masks"]
    with torch.no_grad():
        f = model.encode_image(pixels)
        f_fg = model.encode_image(pixels * masks)
        tables = model.tables(LABELS)
        heads = model.heads(f, tables)
        base = model.heads(f, tables.rows(model.classes.base_ids))
        z_fg = model.logits(f_fg, tables.learned)
        r = torch.sigmoid(model.plugin.trust_logit(heads.z_full, z_fg, masks.mean(dim=(1, 2, 3))))
    check("features", {"image": f, "foreground": f_fg, "text_learned": tables.learned, "text_clip": tables.clip},
          atol=1e-5)
    check("plugin", {"z_full": heads.z_full, "z_clip": heads.z_clip, "z_fdc": base.z_fdc, "z_pc": heads.z_pc,
                     "b": heads.b, "r": r}, atol=1e-4)


def test_golden_k_shot_file_list(demo_data):
    lists = {}
    for shots, seed in ((4, 1), (2, 1), (2, 2)):
        index = load_index(demo_data, shots, seed)
        lists[f"shots{shots}_seed{seed}"] = [[str(s.path.relative_to(demo_data)), s.label, s.mask is not None]
                                             for s in index.train]
    lists["test"] = [[str(s.path.relative_to(demo_data)), s.label] for s in load_index(demo_data, 4, 1).test]
    check("k_shot", lists, atol=0)


def _weights_summary(state: dict[str, torch.Tensor]) -> dict:
    return {k: [float(v.sum()), float(v.abs().sum()), *v.flatten()[:4].tolist()] for k, v in state.items()}


def test_golden_stage2_run(backbone, inputs, demo_data, tmp_path):
    """A short seeded stage-2 run (3 epochs on 6 images) from the fixed context: its log and its weights."""
    index = load_index(demo_data, shots=2, seed=1)
    cfg = TrainConfig(data=str(demo_data), model="fvgpt-tiny", pretrained="none", seed=3, plugin_epochs=3,
                      plugin_lr=0.02, plugin_batch=4)
    model = FVGPTModel(backbone, ClassSplit.paper(LABELS), cfg, PromptLearner(inputs["context"]))
    (tmp_path / "progress.json").write_text("{}")
    train_plugin(model, tmp_path, index, backbone.logit_scale, progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    terms = ("loss", "base", "frg", "dist", "pc", "r", "r_star", "b", "lr")
    check("stage2_log", {k: [r[k] for r in log] for k in terms}, atol=1e-6, rtol=1e-4)
    check("stage2_weights", _weights_summary(model.plugin.state_dict()), atol=1e-5, rtol=1e-4)


ABLATIONS = {"pc_only": {"fdc": False}, "no_pc": {"prior_calibration": False}, "no_frg": {"frg": False},
             "fdc_only": {"frg": False, "prior_calibration": False}}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_golden_ablations(backbone, inputs, demo_data, tmp_path, name):
    """The paper's Table 3 rows (docs/method.md, "Ablations"): the heads of the fixed plugin under each switch, and a
    short seeded stage-2 run with it (its log and weights)."""
    switches = ABLATIONS[name]
    model = golden_model(backbone, inputs)
    model.cfg = TrainConfig(data="unused", **switches)
    with torch.no_grad():
        tables = model.tables(LABELS)
        heads = model.heads(model.encode_image(inputs["pixels"]), tables)
        base = model.heads(model.encode_image(inputs["pixels"]), tables.rows(model.classes.base_ids))
    index = load_index(demo_data, shots=2, seed=1)
    cfg = TrainConfig(data=str(demo_data), model="fvgpt-tiny", pretrained="none", seed=3, plugin_epochs=3,
                      plugin_lr=0.02, plugin_batch=4, **switches)
    trained = FVGPTModel(backbone, ClassSplit.paper(LABELS), cfg, PromptLearner(inputs["context"]))
    (tmp_path / "progress.json").write_text("{}")
    train_plugin(trained, tmp_path, index, backbone.logit_scale, progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    terms = ("loss", "base", "frg", "dist", "pc", "r", "r_star", "b")
    check(f"ablation_{name}", {"base_head": base.z_fdc, "new_head": heads.z_pc, "b": heads.b,
                               "log": {k: [r[k] for r in log] for k in terms},
                               "weights": _weights_summary(trained.plugin.state_dict())}, atol=1e-4, rtol=1e-4)


LEARNERS = {"promptsrc": {"method": "promptsrc"}, "mmrl": {"method": "mmrl", "rep_layer": 2, "rep_dim": 32}}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_golden_learners(backbone, inputs, demo_data, tmp_path, name):
    """PromptSRC and MMRL (docs/method.md, "Stage 1"): a seeded learner's image features ([f_CLIP, its own]) of the
    images and of their foreground views, its text features, its stage-1 loss terms on the images, the heads of a
    seeded plugin on it; and a short seeded stage-1 run (2 epochs on 6 images, PromptSRC ending on its GPA): its log
    and weights."""
    cfg = TrainConfig(data=str(demo_data), model="fvgpt-tiny", pretrained="none", seed=3, prompt_epochs=2,
                      prompt_lr=0.02, prompt_batch=4, gpa_mean=1.5, **LEARNERS[name])
    classes = ClassSplit.paper(LABELS)
    torch.manual_seed(0)
    model = FVGPTModel.new_prompt(backbone, classes, cfg)
    pixels, masks = inputs["pixels"], inputs["masks"]
    targets = torch.tensor([3, 1, 0, 5])
    terms = model.prompt_loss(pixels, targets, LABELS, model.prompt.teacher(model, LABELS))
    model.new_plugin(100.0).requires_grad_(False)
    with torch.no_grad():
        f = model.encode_image(pixels)
        tables = model.tables(LABELS)
        heads = model.heads(f, tables)
        base = model.heads(f, tables.rows(classes.base_ids))
    outputs = {"image": f, "foreground": model.encode_tuned(pixels * masks), "text_learned": tables.learned,
               "loss": {k: v.detach() for k, v in terms.items()}, "z_full": heads.z_full, "z_new": heads.z_new,
               "z_fdc": base.z_fdc, "z_pc": heads.z_pc, "b": heads.b}
    torch.manual_seed(1)
    trained = FVGPTModel.new_prompt(backbone, ClassSplit.paper(LABELS, LABELS[1::2]), cfg)
    (tmp_path / "progress.json").write_text("{}")
    train_prompt(trained, tmp_path, load_index(demo_data, shots=2, seed=1), progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    logged = {k: [r[k] for r in log] for k in log[0] if k not in ("seconds", "images_per_s", "stage")}
    check(name, outputs | {"log": logged, "weights": _weights_summary(trained.prompt.state_dict())},
          atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_golden_two_stage_run(tiny_run, demo_data):
    """The session's tiny two-stage run (tests/conftest.py): every logged loss term, and its evaluation."""
    log = [json.loads(line) for line in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    check("tiny_run_log", {f"{r['stage']}_{r['epoch']}": {k: v for k, v in sorted(r.items())
                                                          if k not in ("seconds", "images_per_s", "stage")}
                           for r in log}, atol=1e-6, rtol=1e-3)
    run = load_run(tiny_run, require_plugin=True)
    metrics = evaluate(run.model, load_index(demo_data, run.config.shots, run.config.seed), progress=False)
    check("tiny_run_metrics", {name: [row["base"], row["new"], row["hm"], row["d_fg"]["tau1"], row["d_fg"]["tau2"]]
                               for name, row in metrics["models"].items()} | {"images": metrics["test_images"]},
          atol=1e-6, rtol=1e-3)


@pytest.mark.slow
def test_golden_bundle_outputs(tiny_bundle, inputs):
    """The exported bundle through fvgpt_runtime: both heads, routed, and a label it was never trained on."""
    bundle = Bundle(tiny_bundle)
    pixels = inputs["pixels"].numpy()
    out = {}
    for name, labels in (("base", ["purple_circle", "blue_triangle", "green_square"]), ("all", None),
                         ("novel", ["cat", "red circle", "rocket"])):
        scores = bundle.classify(pixels, labels)
        out[name] = scores.logits
        out[f"{name}_head"] = scores.head
    assert (out["base_head"], out["all_head"], out["novel_head"]) == ("base", "new", "new")
    check("bundle", out, atol=1e-4)
