"""The wiring of the stage-2 training step and of evaluation, through their real entry points (FVGPTModel.plugin_loss,
fvgpt.train.train_plugin, fvgpt.evaluate.evaluate) on the tiny model and a few generated images with masks.

Every expectation is recomputed here from open_clip's own forward and the plain formulas of tests/method_reference.py:
which logits each loss term sees, which view feeds which head, what is detached, which parameters get gradients and
how the optimiser moves them, and what evaluation reports for every model row. Spies wrap (never replace) the
functions under test to see what they received.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fvgpt.evaluate
import fvgpt.progress
import fvgpt.train
import method_reference as ref
from fvgpt.classes import ClassSplit
from fvgpt.config import TrainConfig
from fvgpt.data import DataError, Sample
from fvgpt.evaluate import eval_features, evaluate, format_table, model_rows
from fvgpt.model import FVGPTModel
from fvgpt.prompts import PromptLearner
from fvgpt.rundir import RunDirError, read_tensors
from fvgpt.train import train_plugin

S_FDC = 37.0  # S of E6, deliberately not the backbone's s, so a head built with the wrong scale shows


def base_split(names: list[str]) -> ClassSplit:
    """Base classes that are not the first labels, so a label used where its position among the base classes
    belongs (or the reverse) shows."""
    return ClassSplit.paper(names, [names[1], names[3], names[4]])


def context(seed: int, width: int = 64) -> torch.Tensor:
    return torch.randn(4, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def perturb(plugin, seed: int, scale: float = 0.1) -> None:
    """Move every plugin weight away from its initialisation, so that z_FDC ≠ z_full and every term is sizeable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plugin.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def read_image(backbone, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels, mask) the plain way: open_clip's eval transform; the mask binarised at mean > 0.5 (all ones when the
    image has none). The demo images have the model's input size, so no geometry touches the mask."""
    with Image.open(sample.path) as im:
        assert im.size == (64, 64)
        pixels = backbone.eval_transform(im.convert("RGB"))
    if sample.mask is None:
        return pixels, torch.ones(1, 64, 64)
    with Image.open(sample.mask) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float64) / 255
    return pixels, torch.from_numpy((arr.mean(-1) > 0.5).astype(np.float32))[None]


def tables(backbone, names: list[str], ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, T_CLIP) of `names`: the learned prompt with `ctx` and the zero-shot template, through open_clip."""
    return (ref.text_features(backbone.model, backbone.tokenizer, ref.learned_texts(names, 4), ctx),
            ref.text_features(backbone.model, backbone.tokenizer, ref.zero_shot_texts(names)))


def spy(calls: list, fn):
    """Wrap `fn`: record its arguments (detached copies), then call it unchanged."""
    def wrapper(*args, **kwargs):
        calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return fn(*args, **kwargs)
    return wrapper


def corrupt(tmp_path: Path, sample: Sample) -> Sample:
    bad = tmp_path / f"broken_{sample.label}.jpg"
    bad.write_bytes(b"not a jpeg")
    return Sample(bad, sample.label, None)


# ---- one stage-2 step: FVGPTModel.plugin_loss ----------------------------------------------------------------------
@pytest.mark.parametrize("fill", ["mean", "black"])
def test_plugin_step_wiring(backbone, index, fill):
    names = index.classnames
    classes = base_split(names)
    ctx = context(3)
    prompt = PromptLearner(ctx)  # trainable: stage 2 must not reach it anyway
    model = FVGPTModel(backbone, classes, TrainConfig(data="unused", fg_fill=fill), prompt)
    plugin = model.new_plugin(S_FDC)
    perturb(plugin, 2)
    samples = [s for s in index.train if classes.base[s.label]]
    pixels, masks = map(torch.stack, zip(*(read_image(backbone, s) for s in samples)))
    masks[3, :, :, :] = 1  # no mask: the loader's all-ones mask with has_mask = 0
    masks[4].zero_()
    masks[4, :, :5, :6] = 1  # area 30/4096 < area_min
    masks[5].fill_(1)
    masks[5, :, :4, :5] = 0  # area 4076/4096 > area_max
    has_mask = torch.tensor([1.0, 1, 1, 0, 1, 1])
    base_position = {label: i for i, label in enumerate(classes.base_ids)}
    targets = torch.tensor([base_position[s.label] for s in samples])
    calls = {"base_logits": [], "calibrate": [], "trust_logit": []}
    for name, seen in calls.items():
        setattr(plugin, name, spy(seen, getattr(plugin, name)))
    out = model.plugin_loss(pixels, masks, has_mask, targets, model.tables(classes.base_names))
    out["loss"].backward()

    # the same step, from open_clip's forward and the equations
    f = ref.image_features(backbone.model, pixels)
    pre = backbone.preprocess
    f_fg = ref.image_features(backbone.model, ref.foreground(pixels, masks, *((pre.mean, pre.std) if fill == "black"
                                                                              else ())))
    assert (f - f_fg)[:3].norm(dim=-1).min() > 0.05, "the two views must differ for this test to mean anything"
    text, clip_text = tables(backbone, classes.base_names, ctx)
    area = masks.sum(dim=(1, 2, 3)) / (64 * 64)
    s = backbone.logit_scale
    weights = dict(plugin.named_parameters())
    want = ref.objective(weights, f, f_fg, text, clip_text, area, has_mask, targets, s, S_FDC)
    assert want["usable"].tolist() == [True, True, True, False, False, False]
    r_star = (ref.ce(s * f_fg @ text.t(), targets) < ref.ce(s * f @ text.t(), targets))[:3]
    assert 0 < r_star.sum() < 3, "the usable samples should have both values of r*"
    for key in ("loss", "base", "frg", "dist", "pc", "r", "r_star", "b"):
        assert torch.allclose(out[key].double(), want[key], rtol=1e-4, atol=1e-6), (key, out[key], want[key])

    # which view feeds which head: z_FDC and z_PC on the full image, the FRG on both views with A = mean(mask)
    (seen_f, seen_g), = calls["base_logits"]
    assert torch.allclose(seen_f, f, atol=1e-5) and not torch.allclose(seen_f, f_fg, atol=1e-2)
    z_full, z_fg, z_clip = s * f @ text.t(), s * f_fg @ text.t(), s * f @ clip_text.t()
    (seen_full, seen_clip), = calls["calibrate"]
    assert torch.allclose(seen_full, z_full, atol=1e-4) and torch.allclose(seen_clip, z_clip, atol=1e-4)
    (seen_full, seen_fg, seen_area), = calls["trust_logit"]
    assert torch.allclose(seen_full, z_full, atol=1e-4) and torch.allclose(seen_fg, z_fg, atol=1e-4)
    assert torch.allclose(seen_area, area) and len(set(area.tolist())) == 6

    # what is detached and which parameters get gradients: exactly the reference's gradients, r detached in L_dist
    params = list(plugin.parameters())
    want_grads = torch.autograd.grad(want["loss"], params)
    for (name, p), g in zip(plugin.named_parameters(), want_grads):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.allclose(p.grad, g, rtol=1e-3, atol=1e-6), name
    assert all(p.grad is None for p in backbone.model.parameters()) and prompt.ctx.grad is None


# the ablation switches (docs/method.md, "Ablations"), and the plugin parameters each one trains
SWITCHES = {"no_frg": ({"frg": False}, ("image_adapter", "text_adapter", "brg")),
            "pc_only": ({"fdc": False}, ("brg",)),
            "no_pc": ({"prior_calibration": False}, ("image_adapter", "text_adapter", "frg")),
            "fdc_only": ({"frg": False, "prior_calibration": False}, ("image_adapter", "text_adapter"))}


@pytest.mark.parametrize("ablation", list(SWITCHES))
def test_plugin_step_under_each_ablation(backbone, index, ablation):
    """One stage-2 step with a branch switched off: every reported term equals the reference with that switch, and
    exactly the switched-on modules receive gradients, equal to the reference's."""
    switches, trained = SWITCHES[ablation]
    classes = base_split(index.classnames)
    ctx = context(3)
    model = FVGPTModel(backbone, classes, TrainConfig(data="unused", **switches), PromptLearner(ctx))
    plugin = model.new_plugin(S_FDC)
    perturb(plugin, 2)
    samples = [s for s in index.train if classes.base[s.label]]
    pixels, masks = map(torch.stack, zip(*(read_image(backbone, s) for s in samples)))
    has_mask = torch.tensor([1.0, 1, 1, 0, 1, 1])
    base_position = {label: i for i, label in enumerate(classes.base_ids)}
    targets = torch.tensor([base_position[s.label] for s in samples])
    out = model.plugin_loss(pixels, masks, has_mask, targets, model.tables(classes.base_names))
    out["loss"].backward()

    f, f_fg = ref.image_features(backbone.model, pixels), ref.image_features(backbone.model, ref.foreground(pixels, masks))
    text, clip_text = tables(backbone, classes.base_names, ctx)
    area = masks.sum(dim=(1, 2, 3)) / (64 * 64)
    weights = dict(plugin.named_parameters())
    want = ref.objective(weights, f, f_fg, text, clip_text, area, has_mask, targets, backbone.logit_scale, S_FDC,
                         **switches)
    for key in ("loss", "base", "frg", "dist", "pc", "r", "r_star", "b"):
        assert torch.allclose(out[key].double(), want[key], rtol=1e-4, atol=1e-6), (key, out[key], want[key])
    want_grads = dict(zip(weights, torch.autograd.grad(want["loss"], list(weights.values()), allow_unused=True)))
    for name, p in plugin.named_parameters():
        if name.split(".")[0] in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.allclose(p.grad, want_grads[name], rtol=1e-3, atol=1e-6), name
        else:
            assert p.grad is None or not p.grad.any(), name


def train_tiny_plugin(backbone, index, out: Path, **switches) -> tuple[dict, dict]:
    """train_plugin for 3 epochs from one fixed context and seed: the plugin's (initial, trained) weights."""
    cfg = TrainConfig(data="unused", model="fvgpt-tiny", pretrained="none", seed=3, plugin_epochs=3, plugin_lr=0.05,
                      plugin_batch=4, **switches)
    out.mkdir()
    (out / "progress.json").write_text("{}")
    model = FVGPTModel(backbone, base_split(index.classnames), cfg, PromptLearner(context(4)))
    initial, real_new_plugin = {}, model.new_plugin

    def new_plugin(scale: float):
        plugin = real_new_plugin(scale)
        initial.update({k: v.clone() for k, v in plugin.state_dict().items()})
        return plugin

    model.new_plugin = new_plugin
    train_plugin(model, out, index, S_FDC, progress=False)
    return initial, {k: v.clone() for k, v in model.plugin.state_dict().items()}


def test_switching_a_branch_off_leaves_the_other_as_trained(backbone, index, tmp_path):
    """The branches share no parameter and each switch drops only its own branch's loss terms, so the branch that
    stays on trains bit for bit as in the run with both (what lets benchmarks.method evaluate an ablation row on the
    weights of the run it shares); a module that is off keeps its initial weights."""
    runs = {name: train_tiny_plugin(backbone, index, tmp_path / name, **switches)
            for name, switches in {"full": {}, **{k: v[0] for k, v in SWITCHES.items()}}.items()}
    initial = runs["full"][0]
    assert all(all(torch.equal(run[0][k], initial[k]) for k in initial) for run in runs.values())  # one start

    def same(a: str, b: str, modules: tuple[str, ...]) -> bool:
        return all(torch.equal(runs[a][1][k], runs[b][1][k]) for k in initial if k.split(".")[0] in modules)

    def kept(a: str, modules: tuple[str, ...]) -> bool:
        return all(torch.equal(runs[a][1][k], initial[k]) for k in initial if k.split(".")[0] in modules)

    fdc, pc, adapters = ("image_adapter", "text_adapter", "frg"), ("brg",), ("image_adapter", "text_adapter")
    assert not any(torch.equal(runs["full"][1][k], initial[k]) for k in initial)  # every module trained
    assert same("pc_only", "full", pc) and same("no_pc", "full", fdc) and same("no_frg", "full", pc)
    assert same("fdc_only", "no_frg", adapters) and not same("no_frg", "full", adapters)  # the gate matters
    assert kept("pc_only", fdc) and kept("no_pc", pc) and kept("fdc_only", pc + ("frg",)) and kept("no_frg", ("frg",))


# ---- the stage: fvgpt.train.train_plugin ---------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def run_stage2(backbone, index, out: Path) -> dict:
    """train_plugin for 3 epochs, interrupted after epoch 1 and resumed in a fresh model, with spies on the loader's
    batches, the transform it builds and every step's inputs and starting weights."""
    classes = base_split(index.classnames)
    train = list(index.train) + [corrupt(out, index.train[2])]  # one unreadable base image per epoch
    idx = dataclasses.replace(index, train=train)
    cfg = TrainConfig(data="unused", model="fvgpt-tiny", pretrained="none", seed=3, plugin_epochs=3, plugin_lr=0.02,
                      plugin_batch=4)
    run_dir = out / "run"
    run_dir.mkdir()
    (run_dir / "progress.json").write_text("{}")
    record = {"labels": [], "transforms": [], "steps": [], "models": [], "run_dir": run_dir, "classes": classes,
              "cfg": cfg, "index": idx}
    real_collate, real_transform = fvgpt.train.collate, fvgpt.train.train_transform

    def collate(batch):
        out_batch = real_collate(batch)
        if "label" in out_batch:
            record["labels"].append(out_batch["label"].clone())
        return out_batch

    def transform(*args):
        record["transforms"].append(args[1:])
        return real_transform(*args)

    def model_for_run() -> FVGPTModel:
        model = FVGPTModel(backbone, classes, cfg, PromptLearner(context(4)))  # a trainable context
        real_loss = model.plugin_loss

        def plugin_loss(pixels, masks, has_mask, targets, text_tables):
            parts = real_loss(pixels, masks, has_mask, targets, text_tables)
            record["steps"].append({"pixels": pixels.clone(), "masks": masks.clone(), "has_mask": has_mask.clone(),
                                    "targets": targets.clone(), "tables": copy.deepcopy(text_tables),
                                    "weights": copy.deepcopy(model.plugin.state_dict()),
                                    "loss": float(parts["loss"].detach())})
            return parts

        model.plugin_loss = plugin_loss
        record["models"].append(model)
        return model

    record["hooks"] = []

    def hook(stage, epoch):
        record["hooks"].append((stage, epoch))
        if epoch == 1:
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fvgpt.train, "collate", collate)
        mp.setattr(fvgpt.train, "train_transform", transform)
        quiet = io.StringIO()
        mp.setenv("FVGPT_PROGRESS_EVERY_S", "0")  # progress lines, if any were on, would print at every batch
        t0 = time.perf_counter()
        with pytest.raises(Interrupted), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            train_plugin(model_for_run(), run_dir, idx, S_FDC, hook=hook, progress=False)
        record["quiet"] = quiet.getvalue()
        record["interrupted"] = json.loads((run_dir / "progress.json").read_text())
        out_text, err_text = io.StringIO(), io.StringIO()
        mp.setattr(fvgpt.progress, "on_terminal", lambda: True)  # the bar (a log would get plain lines instead)
        with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
            train_plugin(model_for_run(), run_dir, idx, S_FDC, hook=hook, progress=True)
        record["wall"] = time.perf_counter() - t0  # both runs: no epoch can have taken longer
        record["printed"], record["bar"] = out_text.getvalue(), err_text.getvalue()
    return record


def check_batches(record: dict, backbone) -> None:
    """Base images only, each once per epoch, shuffled, augmented; targets are positions among the base classes."""
    classes, steps = record["classes"], record["steps"]
    base_position = {label: i for i, label in enumerate(classes.base_ids)}
    assert record["transforms"] == [(True, 0.08)] * 2  # each run builds the paired transform with augmentation
    assert len(steps) == len(record["labels"]) == 6  # 6 readable base images, batches of 4: 2 steps × 3 epochs
    per_epoch = [torch.cat(record["labels"][i:i + 2]) for i in range(0, 6, 2)]
    readable = [s for s in record["index"].train if classes.base[s.label] and s.mask is not None]
    assert all(sorted(e.tolist()) == sorted(s.label for s in readable) for e in per_epoch)
    assert len({tuple(e.tolist()) for e in per_epoch}) > 1  # shuffled
    for step, labels in zip(steps, record["labels"]):
        assert step["targets"].tolist() == [base_position[lab] for lab in labels.tolist()]
        assert step["has_mask"].bool().all()
        assert step["tables"].labels == classes.base_names
    plain = torch.stack([read_image(backbone, s)[0] for s in readable])
    pixels = torch.cat([s["pixels"] for s in steps])
    distance = (pixels[:, None] - plain[None]).flatten(2).abs().amax(-1)  # every seen image vs every plain one
    assert (distance.amin(1) > 1e-2).all(), "stage 2 saw an un-augmented image"


def check_replay(record: dict, backbone) -> list[tuple[float, int]]:
    """Replaying the recorded batches with the reference loss and a plain SGD (momentum 0.9, weight decay 5e-4,
    warm-up then cosine) from the first step's weights gives the weights before every step and at the end, across
    the interruption (so the optimiser's state is restored too). Returns each step's (loss, batch size)."""
    cfg, classes, steps = record["cfg"], record["classes"], record["steps"]
    s = backbone.logit_scale
    text, clip_text = tables(backbone, classes.base_names, context(4))
    assert torch.allclose(steps[0]["tables"].learned, text, atol=1e-5)
    assert torch.allclose(steps[0]["tables"].clip, clip_text, atol=1e-5)
    params = {k: v.double().clone() for k, v in steps[0]["weights"].items()}
    buffers: dict[str, torch.Tensor] = {}
    losses = []
    for i, step in enumerate(steps):
        for k, v in step["weights"].items():
            assert torch.allclose(v.double(), params[k], atol=2e-6), f"step {i}: {k} differs from the replay"
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        f = ref.image_features(backbone.model, step["pixels"])
        f_fg = ref.image_features(backbone.model, ref.foreground(step["pixels"], step["masks"]))
        area = step["masks"].sum(dim=(1, 2, 3)) / (64 * 64)
        want = ref.objective(leaves, f, f_fg, text, clip_text, area, step["has_mask"], step["targets"], s, S_FDC)
        assert want["loss"].item() == pytest.approx(step["loss"], rel=1e-4)
        losses.append((want["loss"].item(), len(step["targets"])))
        grads = dict(zip(leaves, torch.autograd.grad(want["loss"], list(leaves.values()))))
        with torch.no_grad():
            ref.sgd_step(params, grads, buffers, ref.lr_at(i // 2, 3, cfg.plugin_lr))
    final = record["models"][-1].plugin.state_dict()
    saved = read_tensors(record["run_dir"] / "plugin.safetensors")
    for k, v in params.items():
        assert torch.allclose(final[k].double(), v, atol=2e-6), k
        assert torch.equal(saved[k], final[k]), k
    return losses


def check_log(record: dict, losses: list[tuple[float, int]]) -> None:
    """train_log.jsonl, progress.json, state/plugin.pt and what is printed, as docs/run-dir.md describes them."""
    run_dir = record["run_dir"]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and {r["stage"] for r in log} == {"plugin"}
    assert [r["lr"] for r in log] == pytest.approx([1e-5, 0.015, 0.005])
    assert [(r["images"], r["dropped"]) for r in log] == [(6, 1)] * 3
    for e, r in enumerate(log):
        pairs = losses[2 * e:2 * e + 2]
        assert r["loss"] == pytest.approx(sum(v * n for v, n in pairs) / 6, rel=1e-4)
        assert set(r) >= {"base", "frg", "dist", "pc", "r", "r_star", "b", "seconds", "images_per_s"}
        assert 0.0005 < r["seconds"] <= record["wall"]  # rounded to ms; images/s from the unrounded time, to 0.01
        assert 6 / (r["seconds"] + 0.0005) - 0.01 <= r["images_per_s"] <= 6 / (r["seconds"] - 0.0005) + 0.01
        # the roundings docs/run-dir.md states: seconds to the ms, images/s to 2 decimals, loss terms to 6
        assert r["seconds"] == round(r["seconds"], 3) and r["images_per_s"] == round(r["images_per_s"], 2)
        assert isinstance(r["images_per_s"], float)  # a rate, not an int rounded to the unit
        assert all(r[k] == round(r[k], 6) for k in ("loss", "base", "frg", "dist", "pc", "r", "r_star", "b"))
    state = torch.load(run_dir / "state" / "plugin.pt", weights_only=True)
    assert state["epoch"] == 3 and all(torch.equal(state["weights"][k], v)
                                       for k, v in record["models"][-1].plugin.state_dict().items())
    assert record["interrupted"] == {"plugin": {"epochs_done": 1, "done": False}}
    assert json.loads((run_dir / "progress.json").read_text()) == {"plugin": {"epochs_done": 3, "done": True}}
    assert record["quiet"] == ""  # progress=False prints nothing
    lines = re.findall(r"plugin epoch (\d)/3: loss ([\d.]+) \(([\d.]+) img/s\)", record["printed"])
    assert [(int(e), float(v)) for e, v, _ in lines] == [(2, round(log[1]["loss"], 4)), (3, round(log[2]["loss"], 4))]
    assert record["hooks"] == [("plugin", 1), ("plugin", 2), ("plugin", 3)]
    assert "plugin 2/3" in record["bar"] and "plugin 3/3" in record["bar"] and "batch/s" in record["bar"]
    shown = [float(v) for v in re.findall(r"loss=([\d.]+)", record["bar"])]  # the running mean after each batch
    assert all(any(abs(v - log[e]["loss"]) < 1.1e-4 for v in shown) for e in (1, 2))  # ends at the epoch's mean
    assert record["bar"].endswith("\r")  # the bar is cleared, not left behind


def test_stage2_wiring(backbone, index, tmp_path):
    """fvgpt.train.train_plugin end to end on 6 images: batches, targets, augmentation, the optimiser and schedule
    (by replay), resumption, what it writes and prints, and what stays frozen. One test, so that a mutation tool that
    runs only the tests touching a function runs all of these checks."""
    fingerprint = backbone.fingerprint()
    record = run_stage2(backbone, index, tmp_path)
    check_batches(record, backbone)
    check_log(record, check_replay(record, backbone))
    for model in record["models"]:  # train_plugin was handed a trainable context: it freezes it itself
        assert not model.prompt.ctx.requires_grad and torch.equal(model.prompt.ctx, context(4))
        assert not any(p.requires_grad for p in model.backbone.model.parameters())
    assert all(p.requires_grad for p in record["models"][-1].plugin.parameters())
    assert backbone.fingerprint() == fingerprint, "stage 2 changed the frozen backbone"


def test_stage2_skips_unreadable_images(backbone, index, tmp_path, capsys):
    """Unreadable images are counted and skipped (a batch of only unreadable ones too); none readable stops."""
    classes = base_split(index.classnames)
    base = [s for s in index.train if classes.base[s.label]]
    cfg = TrainConfig(data="unused", plugin_epochs=1, plugin_batch=1, seed=5)
    model = FVGPTModel(backbone, classes, cfg, PromptLearner(context(4)))
    (tmp_path / "progress.json").write_text("{}")
    broken = [corrupt(tmp_path, s) for s in base[:2]]
    with pytest.raises(RunDirError, match="^plugin: no training image could be read$"):
        train_plugin(model, tmp_path, dataclasses.replace(index, train=broken), S_FDC, progress=False)
    capsys.readouterr()
    train_plugin(model, tmp_path, dataclasses.replace(index, train=broken + base[:2]), S_FDC)
    log = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])
    assert (log["images"], log["dropped"]) == (2, 2)
    assert "plugin epoch 1/1: loss" in capsys.readouterr().out  # progress is on by default


class _Payload:
    """An object that is neither a tensor nor a plain container: unpickling it could run code."""


def test_resume_never_unpickles_arbitrary_objects(backbone, index, tmp_path):
    """state/<stage>.pt is read with weights_only=True: a file holding other objects is refused, not loaded."""
    classes = base_split(index.classnames)
    model = FVGPTModel(backbone, classes, TrainConfig(data="unused", plugin_epochs=1, seed=5),
                       PromptLearner(context(4)))
    (tmp_path / "progress.json").write_text("{}")
    (tmp_path / "state").mkdir()
    torch.save({"weights": {}, "optimizer": {}, "epoch": 0, "payload": _Payload()}, tmp_path / "state" / "plugin.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_plugin(model, tmp_path, index, S_FDC, progress=False)


# ---- evaluation: fvgpt.evaluate.evaluate ---------------------------------------------------------------------------
def expected_rows(backbone, model: FVGPTModel, samples: list[Sample], ctx: torch.Tensor) -> tuple[dict, dict]:
    """What evaluate must report, from open_clip's forward and the equations; and each row's logits per split."""
    classes, s, pre = model.classes, backbone.logit_scale, backbone.preprocess
    pixels, masks = map(torch.stack, zip(*(read_image(backbone, x) for x in samples)))
    f = ref.image_features(backbone.model, pixels)
    black = model.cfg.fg_fill == "black"
    f_fg = ref.image_features(backbone.model, ref.foreground(pixels, masks, *((pre.mean, pre.std) if black else ())))
    labels = torch.tensor([x.label for x in samples])
    is_base = torch.tensor([classes.base[x.label] for x in samples])
    with_mask = torch.tensor([x.mask is not None for x in samples])
    position = torch.tensor(classes.position)
    weights = model.plugin.state_dict()
    heads = {}
    for split, names, rows in (("base", classes.base_names, is_base), ("new", classes.new_names, ~is_base)):
        text, clip_text = tables(backbone, names, ctx)
        heads[split] = ref.heads(weights, f[rows], text, clip_text, s, S_FDC)
        if split == "base":
            heads["fg"] = ref.heads(weights, f_fg[rows & with_mask], text, clip_text, s, S_FDC)
    target = {"base": position[labels[is_base]], "new": position[labels[~is_base]]}
    on_masked = with_mask[is_base]
    metrics, logits = {}, {}
    for row, (base_head, new_head) in {"zero-shot": ("z_clip", "z_clip"), "coop": ("z_full", "z_full"),
                                       "fvgpt": ("z_fdc", "z_pc")}.items():
        acc = {split: 100.0 * (heads[split][head].argmax(-1) == target[split]).double().mean().item()
               for split, head in (("base", base_head), ("new", new_head))}
        hm = 2 * acc["base"] * acc["new"] / (acc["base"] + acc["new"])
        d_fg = {f"tau{t}": ref.kl(heads["base"][base_head][on_masked], heads["fg"][base_head], t).mean().item()
                for t in (1, 2)}
        base_fg = 100.0 * (heads["fg"][base_head].argmax(-1) == target["base"][on_masked]).double().mean().item()
        metrics[row] = {"base": acc["base"], "new": acc["new"], "hm": hm, "base_fg": base_fg, "d_fg": d_fg}
        logits[row] = (heads["base"][base_head], heads["new"][new_head], heads["fg"][base_head])
    metrics["gates"] = expected_gates(weights, heads, masks[is_base][on_masked], target, on_masked)
    return metrics, logits


def expected_gates(weights: dict, heads: dict, masks: torch.Tensor, target: dict, on_masked) -> dict:
    """The gate statistics evaluate reports: the FRG's r on the masked base images against r* = 1[CE_fg < CE_full]
    (E1–E3), and the BRG's b per split, overall and where only one of z_full and z_CLIP is right (E9–E10)."""
    def stats(v):  # mean, population std, count; None for no values
        return {"mean": v.mean().item(), "std": v.std(unbiased=False).item(), "n": len(v)} if len(v) else None

    z_full, z_fg, y = heads["base"]["z_full"][on_masked], heads["fg"]["z_full"], target["base"][on_masked]
    area = masks.double().flatten(1).mean(1)
    r = torch.sigmoid(ref.gate_logit(ref.frg_inputs(z_full, z_fg, area), weights, "frg"))
    r_star = ref.ce(z_fg, y) + ref.DELTA < ref.ce(z_full, y)
    frg = {"r": stats(r), "r_star_rate": r_star.double().mean().item(), "r_when_r_star_1": stats(r[r_star]),
           "r_when_r_star_0": stats(r[~r_star]), "agreement": ((r > 0.5) == r_star).double().mean().item()}
    brg = {}
    for split in ("base", "new"):
        h, y = heads[split], target[split]
        full_right, clip_right = h["z_full"].argmax(-1) == y, h["z_clip"].argmax(-1) == y
        brg[split] = {"b": stats(h["b"]), "b_when_only_clip_right": stats(h["b"][clip_right & ~full_right]),
                      "b_when_only_full_right": stats(h["b"][full_right & ~clip_right])}
    return {"frg": frg, "brg": brg}


def assert_close_tree(got, want, path: str = "") -> None:
    """Nested dicts of floats (and ints, None) equal within 1e-5 relative, 1e-6 absolute; counts exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, got, want)
        for key in want:
            assert_close_tree(got[key], want[key], f"{path}.{key}")
    elif want is None or isinstance(want, int):
        assert got == want, (path, got, want)
    else:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), path


@pytest.mark.parametrize("fill", ["mean", "black"])
def test_evaluation_reports_every_row_from_the_right_head(backbone, index, tmp_path, monkeypatch, capsys, fill):
    classes = base_split(index.classnames)
    ctx = context(5)
    model = FVGPTModel(backbone, classes, TrainConfig(data="unused", fg_fill=fill),
                       PromptLearner(ctx).requires_grad_(False))
    perturb(model.new_plugin(S_FDC), 6)
    base = [x for x in index.test if classes.base[x.label]]
    base[:2] = [Sample(x.path, x.label, None) for x in base[:2]]  # two base images without a mask: not in D_fg
    new = [x for x in index.test if not classes.base[x.label]][::-1]  # new targets in another order than base ones
    test = base + new
    # a whole batch of unreadable images in the middle: counted, skipped, and later batches still read
    idx = dataclasses.replace(index, test=test[:4] + [corrupt(tmp_path, x) for x in test[:4]] + test[4:])
    seen = []
    real_accuracy = fvgpt.evaluate.accuracy
    monkeypatch.setattr(fvgpt.evaluate, "accuracy", lambda z, y: seen.append(z.detach().clone()) or real_accuracy(z, y))
    monkeypatch.setenv("FVGPT_PROGRESS_EVERY_S", "0")  # progress lines, if any were on, would print at every batch
    result = evaluate(model, idx, batch_size=4, progress=False)
    assert capsys.readouterr() == ("", "")  # progress=False: no bar, no lines

    want, logits = expected_rows(backbone, model, test, ctx)
    assert result["test_images"] == {"base": 9, "new": 9, "base_with_mask": 7, "unreadable": 4}
    assert_close_tree(result["gates"], want.pop("gates"), "gates")
    assert set(result["models"]) == set(want)
    for row, expected in want.items():
        got = result["models"][row]
        assert set(got) == set(expected), row
        for key in ("base", "new", "hm", "base_fg"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6), (row, key)
        for tau, value in expected["d_fg"].items():
            assert got["d_fg"][tau] == pytest.approx(value, rel=1e-4), (row, tau)
    # each row's accuracy was taken on its own head's logits (base and new images, base foreground views): match the
    # nine tensors one to one
    expected_logits = [z for pair in logits.values() for z in pair]
    for i, a in enumerate(expected_logits):
        for b in expected_logits[i + 1:]:
            assert a.shape != b.shape or not torch.allclose(a, b, atol=1e-2), "two rows' heads coincide"
    unmatched = list(expected_logits)
    for z in seen:
        match = [i for i, e in enumerate(unmatched) if e.shape == z.shape and torch.allclose(z.double(), e,
                                                                                               atol=1e-4)]
        assert len(match) == 1, "evaluate scored logits that are no row's head"
        unmatched.pop(match[0])
    assert not unmatched


def test_gate_statistics_without_the_frg(backbone, index):
    """The FRG ablation: evaluation reports the r ≡ 1 that training used, and r > ½ agrees exactly where r* = 1;
    without the base branch (PC only) there is no foreground teacher, so no FRG statistics at all."""
    classes = base_split(index.classnames)
    model = FVGPTModel(backbone, classes, TrainConfig(data="unused", frg=False),
                       PromptLearner(context(5)).requires_grad_(False))
    perturb(model.new_plugin(S_FDC), 3)
    test = [x for x in index.test if classes.base[x.label] and x.mask is not None][:4]
    frg = evaluate(model, dataclasses.replace(index, test=test), progress=False)["gates"]["frg"]
    assert frg["r"] == {"mean": 1.0, "std": 0.0, "n": 4}
    assert frg["agreement"] == frg["r_star_rate"]
    model.cfg = TrainConfig(data="unused", fdc=False)
    gates = evaluate(model, dataclasses.replace(index, test=test), progress=False)["gates"]
    assert gates["frg"] is None and gates["brg"]["base"]["b"]["n"] == 4


def test_evaluation_scores_the_features_it_is_given(backbone, index):
    """evaluate(features=eval_features(...)) scores those features, never the index's images again: features of a
    subset give the subset's counts and numbers."""
    classes = base_split(index.classnames)
    model = FVGPTModel(backbone, classes, TrainConfig(data="unused"), PromptLearner(context(5)).requires_grad_(False))
    perturb(model.new_plugin(S_FDC), 3)
    subset = dataclasses.replace(index, test=index.test[::2])
    given = evaluate(model, index, progress=False, features=eval_features(model, subset, 4, False))
    alone = evaluate(model, subset, progress=False)
    assert given["test_images"] == alone["test_images"] != evaluate(model, index, progress=False)["test_images"]
    assert given["models"] == alone["models"]


@pytest.mark.parametrize("switches", [{}, {"fdc": False}, {"prior_calibration": False}], ids=["full", "pc_only",
                                                                                           "no_pc"])
def test_the_switches_pick_the_heads(backbone, index, switches):
    """Each head under the ablation switches, in heads(), base_head()/adapted_text() and new_head() (the export's
    heads) alike: without FDC the base head is z_full; without Prior Calibration the new head is the FDC head over
    the requested labels and b ≡ 0, one per image; otherwise the heads of E6 and E11."""
    classes = base_split(index.classnames)
    ctx = context(5)
    model = FVGPTModel(backbone, classes, TrainConfig(data="unused", **switches),
                       PromptLearner(ctx).requires_grad_(False))
    perturb(model.new_plugin(S_FDC), 4)
    rows = model.tables(classes.new_names)
    f = torch.nn.functional.normalize(torch.randn(7, rows.learned.shape[-1],
                                                  generator=torch.Generator().manual_seed(9)), dim=-1)
    heads = model.heads(f, rows)
    z_pc, b = model.new_head(f, rows.learned, rows.clip)
    text, clip_text = tables(backbone, classes.new_names, ctx)
    want = ref.heads(model.plugin.state_dict(), f, text, clip_text, backbone.logit_scale, S_FDC, **switches)
    assert len(classes.new_names) != 7 and b.shape == heads.b.shape == (7,)
    assert torch.equal(z_pc, heads.z_pc) and torch.equal(b, heads.b) and z_pc.dtype == torch.float32
    assert torch.allclose(z_pc.double(), want["z_pc"], atol=1e-4) and torch.allclose(b.double(), want["b"], atol=1e-5)
    base = model.base_head(f, model.adapted_text(rows.learned))
    assert torch.equal(base, heads.z_fdc) and torch.allclose(base.double(), want["z_fdc"], atol=1e-4)
    if switches.get("prior_calibration", True):
        assert b.min() > 0 and not torch.allclose(z_pc, heads.z_full.float(), atol=1e-2)
    else:
        assert not b.any() and torch.equal(z_pc, heads.z_fdc.float())
    if not switches.get("fdc", True):
        assert torch.equal(heads.z_fdc, heads.z_full) and torch.equal(model.adapted_text(rows.learned), rows.learned)
    else:
        assert not torch.allclose(heads.z_fdc, heads.z_full, atol=1e-2)


def test_gate_statistics_where_a_gate_sits_on_one_half(backbone, index):
    """An FRG whose output layer is zero gives r = ½ exactly: "r > ½" is then false on every image, so the agreement
    with r* is the share of r* = 0; with no masked base image every FRG statistic is None, and with no new test image
    every new-split BRG statistic is None (never NaN)."""
    classes = base_split(index.classnames)
    model = FVGPTModel(backbone, classes, TrainConfig(data="unused"), PromptLearner(context(5)).requires_grad_(False))
    plugin = model.new_plugin(S_FDC)
    perturb(plugin, 5)
    with torch.no_grad():
        plugin.frg.mlp[2].weight.zero_()
        plugin.frg.mlp[2].bias.zero_()
    masked = [x for x in index.test if classes.base[x.label] and x.mask is not None][:5]  # odd: r* rate ≠ ½
    frg = evaluate(model, dataclasses.replace(index, test=masked), progress=False)["gates"]["frg"]
    assert frg["r"] == {"mean": 0.5, "std": 0.0, "n": 5} and frg["agreement"] == pytest.approx(1 - frg["r_star_rate"])
    unmasked = [Sample(x.path, x.label, None) for x in masked]
    gates = evaluate(model, dataclasses.replace(index, test=unmasked), progress=False)["gates"]
    assert gates["frg"] == dict.fromkeys(("r", "r_star_rate", "r_when_r_star_1", "r_when_r_star_0", "agreement"))
    assert gates["brg"]["new"] == dict.fromkeys(("b", "b_when_only_clip_right", "b_when_only_full_right"))
    assert gates["brg"]["base"]["b"]["n"] == 5


def test_evaluation_edge_cases(backbone, index, tmp_path):
    """A split without new classes has no New/HM; no base image with a mask means no D_fg; without a plugin there is
    no fvgpt row; the stage-1 row is named after the method; nothing readable stops with an error."""
    names = index.classnames
    cfg = TrainConfig(data="unused", method="kgcoop")
    all_base = ClassSplit.paper(names, names)
    model = FVGPTModel(backbone, all_base, cfg, PromptLearner(context(7)).requires_grad_(False))
    assert model_rows(model) == {"zero-shot": ("z_clip", "z_clip"), "kgcoop": ("z_full", "z_new")}
    test = [Sample(x.path, x.label, None) for x in index.test[:4]]
    without_plugin = evaluate(model, dataclasses.replace(index, test=test), progress=False)["models"]
    assert set(without_plugin) == {"zero-shot", "kgcoop"} and without_plugin["kgcoop"]["base"] is not None
    plugin = model.new_plugin(S_FDC)
    assert model_rows(model)["fvgpt"] == ("z_fdc", "z_pc")
    assert FVGPTModel(backbone, all_base, cfg, model.prompt, plugin).plugin is plugin
    result = evaluate(model, dataclasses.replace(index, test=test), batch_size=3, progress=False)
    assert result["test_images"] == {"base": 4, "new": 0, "base_with_mask": 0, "unreadable": 0}
    for row in result["models"].values():
        assert row["new"] is None and row["hm"] is None and "d_fg" not in row and row["base"] is not None
    broken = [corrupt(tmp_path, index.test[0])]
    with pytest.raises(DataError, match=f"^{re.escape(str(index.root))}: none of the 1 test images could be read$"):
        evaluate(model, dataclasses.replace(index, test=broken), progress=False)


def test_evaluation_shows_a_progress_bar_by_default(backbone, index, capsys, monkeypatch):
    monkeypatch.setattr(fvgpt.progress, "on_terminal", lambda: True)  # a log would get plain lines instead
    model = FVGPTModel(backbone, ClassSplit.paper(index.classnames), TrainConfig(data="unused"))
    evaluate(model, dataclasses.replace(index, test=index.test[:2]))
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)eval: ", err) and err.endswith("\r") and "batch/s" in err  # shown, then cleared


def test_format_table():
    metrics = {"models": {"zero-shot": {"base": 50.0, "new": 25.5, "hm": 34.0},
                          "fvgpt": {"base": 81.234, "new": None, "hm": None, "d_fg": {"tau1": 0.12345, "tau2": 0.5}}},
               "test_images": {"base": 9, "new": 8, "base_with_mask": 7, "unreadable": 0}}
    assert format_table(metrics).splitlines() == [
        "model           Base     New      HM   D_fg τ=1   D_fg τ=2",
        "zero-shot      50.00   25.50   34.00          -          -",
        "fvgpt          81.23       -       -     0.1235     0.5000",
        "test images: 9 base, 8 new, 7 with masks"]
    metrics["test_images"]["unreadable"] = 2
    assert format_table(metrics).endswith("7 with masks, 2 unreadable (skipped)")


# ---- stage 1 and the text tables -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["coop", "kgcoop"])
def test_prompt_step(backbone, index, method):
    """Stage 1's loss: CE of z_full over the given labels, plus λ·(1 − mean cos(T, T_CLIP)) for KgCoOp."""
    names = index.classnames[:3]
    ctx = context(8)
    model = FVGPTModel(backbone, ClassSplit.paper(index.classnames), TrainConfig(data="unused", method=method),
                       PromptLearner(ctx))
    pixels = torch.stack([read_image(backbone, s)[0] for s in index.train[:4]])
    targets = torch.tensor([0, 2, 1, 0])
    text, clip_text = tables(backbone, names, ctx)
    out = model.prompt_loss(pixels, targets, names, clip_text if method == "kgcoop" else None)
    ce = ref.ce(backbone.logit_scale * ref.image_features(backbone.model, pixels).double() @ text.double().t(),
                targets).mean()
    kg = 1 - (text.double() * clip_text.double()).sum(-1).mean()  # rows are unit vectors
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    if method == "kgcoop":
        assert out["kg"].item() == pytest.approx(kg.item(), rel=1e-4)
        assert out["loss"].item() == pytest.approx((ce + 2.0 * kg).item(), rel=1e-5)
    else:
        assert set(out) == {"loss", "ce"} and out["loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    out["loss"].backward()
    assert model.prompt.ctx.grad.abs().sum() > 0 and all(p.grad is None for p in backbone.model.parameters())


def test_text_tables_beyond_one_text_tower_call(backbone):
    """Label sets longer than one text-tower call (256 labels) are encoded in chunks that keep every row."""
    labels = [f"shape {i}" for i in range(258)]
    ctx = context(9)
    model = FVGPTModel(backbone, ClassSplit.paper(labels), TrainConfig(data="unused"), PromptLearner(ctx))
    with torch.no_grad():
        got = model.encode_text(labels, learned=True)
    rows = [0, 255, 256, 257]  # both sides of the chunk boundary
    text = ref.text_features(backbone.model, backbone.tokenizer, ref.learned_texts([labels[i] for i in rows], 4), ctx)
    assert got.shape == (258, 64) and torch.allclose(got[rows], text, atol=1e-5)
    two = torch.randn(2, 64, generator=torch.Generator().manual_seed(13))  # a context of another length than 4
    short = FVGPTModel(backbone, ClassSplit.paper(labels), TrainConfig(data="unused"), PromptLearner(two))
    want = ref.text_features(backbone.model, backbone.tokenizer, ref.learned_texts(labels[:3], 2), two)
    assert torch.allclose(short.tables(labels[:3]).learned, want, atol=1e-5)
    zero_shot = FVGPTModel(backbone, ClassSplit.paper(labels)).tables(labels[:3])
    assert zero_shot.labels == labels[:3] and torch.equal(zero_shot.learned, zero_shot.clip)  # no learned prompt
    assert torch.allclose(zero_shot.clip, tables(backbone, labels[:3], ctx)[1], atol=1e-5)


def test_text_table_rows_and_the_new_head_alone(backbone):
    """TextTables.rows keeps labels and both tables aligned; FVGPTModel.new_head (the export's new head) is E9–E11
    over exactly the rows it is given."""
    labels = ["a", "b", "c", "d"]
    g = torch.Generator().manual_seed(10)
    learned, clip = ref.l2(torch.randn(4, 64, generator=g)).float(), ref.l2(torch.randn(4, 64, generator=g)).float()
    rows = FVGPTModel(backbone, ClassSplit.paper(labels)).tables(labels)
    rows.learned, rows.clip = learned, clip
    picked = rows.rows([2, 0])
    assert picked.labels == ["c", "a"] and torch.equal(picked.learned, learned[[2, 0]])
    assert torch.equal(picked.clip, clip[[2, 0]])
    model = FVGPTModel(backbone, ClassSplit.paper(labels), TrainConfig(data="unused"), PromptLearner(context(11)))
    perturb(model.new_plugin(S_FDC), 12)
    f = ref.l2(torch.randn(5, 64, generator=g)).float()
    z_pc, b = model.new_head(f, learned[[2, 0]], clip[[2, 0]])
    want = ref.heads(model.plugin.state_dict(), f, learned[[2, 0]], clip[[2, 0]], backbone.logit_scale, S_FDC)
    assert torch.allclose(z_pc.double(), want["z_pc"], atol=1e-4) and torch.allclose(b.double(), want["b"], atol=1e-5)
    assert torch.allclose(model.base_head(f, model.plugin.adapt_text(learned)).double(),
                          ref.heads(model.plugin.state_dict(), f, learned, clip, backbone.logit_scale, S_FDC)["z_fdc"],
                          atol=1e-4)


@pytest.mark.parametrize("method", ["coop", "kgcoop"])
def test_new_prompt_starts_as_the_method_says(backbone, method):
    """Stage 1's start: CoOp draws N(0, 0.02²) context vectors; KgCoOp starts from the words "a photo of a"."""
    cfg = TrainConfig(data="unused", method=method, n_ctx=4)
    torch.manual_seed(0)
    classes = ClassSplit.paper(["a", "b"])
    model = FVGPTModel.new_prompt(backbone, classes, cfg)
    ctx = model.context
    assert ctx.shape == (4, 64) and ctx.requires_grad and model.plugin is None
    assert model.cfg is cfg and model.classes is classes and model.backbone is backbone
    if method == "coop":
        assert 0.015 < ctx.std() < 0.025
    else:
        ids = backbone.tokenizer(["a photo of a"])[0, 1:5]
        assert torch.equal(ctx, backbone.model.token_embedding.weight[ids])
