"""Every default of the method pinned three ways: the table written below, docs/method.md's "Defaults" table, and
the defaults of fvgpt.config.TrainConfig (plus the few defaults that live in code: template, activations, sizes,
init scale, schedule). A default that changes in one place only fails here."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
from torch import nn

import fvgpt.config
import fvgpt.mmrl
import fvgpt.promptsrc
import fvgpt.train
from fvgpt import labels
from fvgpt.config import TrainConfig, config_fields, field_default
from fvgpt.data import train_transform
from fvgpt.model import FVGPTModel
from fvgpt.plugin import FVGPTPlugin
from fvgpt.rundir import BackboneRecord
from fvgpt.train import _lr_at

METHOD_MD = Path(__file__).resolve().parents[1] / "docs" / "method.md"

# config field → (default, how docs/method.md's table writes it when that is not simply the number)
DEFAULTS: dict[str, tuple[object, str | None]] = {
    "shots": (16, None),
    "method": ("coop", "coop"),
    "n_ctx": (4, None),
    "ctx_init": (None, "per method (below)"),  # resolved per method: PER_METHOD below
    "kg_weight": (2.0, None),
    "prompt_epochs": (10, None),
    "prompt_lr": (None, "per method (below)"),
    "prompt_batch": (None, "per method (below)"),
    "prompt_augment": (None, "per method (below)"),
    "crop_scale": (None, "per method (below)"),
    "optimizer": (None, "per method (below)"),
    "n_ctx_vision": (4, None),
    "prompt_depth": (None, "9, or the tower's layers if fewer"),
    "text_loss_weight": (25.0, None),
    "image_loss_weight": (10.0, None),
    "gpa_mean": (15.0, None),
    "gpa_std": (1.0, None),
    "rep_tokens": (5, None),
    "rep_dim": (512, None),
    "rep_layer": (None, "6 of 12: ⌈layers/2⌉"),
    "mmrl_alpha": (0.7, None),
    "reg_weight": (1.0, None),
    "mmrl_scale": (100.0, None),
    "mmrl_template": (None, "its per-dataset template"),
    "plugin_epochs": (10, None),
    "plugin_lr": (None, "per method (below)"),
    "plugin_batch": (None, "per method (below)"),
    "bottleneck": (64, None),
    "gate_hidden": (32, None),
    "fdc_init_scale": (0.001, None),
    "fdc_logit_scale": (None, "the stage-1 model's s_b"),  # resolved when a run starts, below
    "fg_fill": ("mean", "mean"),
    "tau": (2.0, None),
    "lambda_d": (10.0, None),
    "lambda_rg": (1.0, None),
    "lambda_new": (1.0, None),
    "fdc": (True, "on"),
    "frg": (True, "on"),
    "prior_calibration": (True, "on"),
    "pc_kl": (True, "on"),
    "delta": (0.0, None),
    "area_min": (0.02, None),
    "area_max": (0.98, None),
    "momentum": (0.9, None),
    "weight_decay": (0.0005, None),
    "warmup_epochs": (1, None),
    "warmup_lr": (1e-5, None),
    "eval_batch": (100, None),
}
# the per-method defaults (docs/method.md, "Per method"): method → field → value
PER_METHOD = {
    "coop": {"ctx_init": None, "prompt_augment": False, "prompt_lr": 0.0035, "prompt_batch": 4, "plugin_lr": 0.0035,
             "plugin_batch": 4, "optimizer": "sgd", "crop_scale": 0.08},
    "kgcoop": {"ctx_init": "a photo of a", "prompt_augment": True, "prompt_lr": 0.0035, "prompt_batch": 4,
               "plugin_lr": 0.0035, "plugin_batch": 4, "optimizer": "sgd", "crop_scale": 0.08},
    "promptsrc": {"ctx_init": "a photo of a", "prompt_augment": True, "prompt_lr": 0.0025, "prompt_batch": 32,
                  "plugin_lr": 0.0025, "plugin_batch": 32, "optimizer": "sgd", "crop_scale": 0.08},
    "mmrl": {"ctx_init": None, "prompt_augment": True, "prompt_lr": 0.001, "prompt_batch": 4, "plugin_lr": 0.001,
             "plugin_batch": 4, "optimizer": "adamw", "crop_scale": 0.5},
}
ZERO_SHOT_TEMPLATE = "a photo of a {}."
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?")


def docs_defaults() -> list[tuple[list[str], str, str]]:
    """(config fields, default cell, setting) for each row of docs/method.md's "Defaults" table."""
    text = METHOD_MD.read_text()
    section = text[text.index("## Defaults"):]
    section = re.split(r"\n##+ ", section[4:])[0]  # up to the next heading ("### Per method" has its own table)
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["setting", "config field", "default", "source"], header
    out = []
    for line in rows[2:]:
        setting, field_cell, default, _ = (c.strip() for c in line.strip("|").split("|"))
        out.append((re.findall(r"`([^`]+)`", field_cell), default, setting))
    return out


def test_every_documented_default_matches_the_table_and_the_config():
    config_defaults = {f.name: field_default(f) for f in config_fields()}
    documented = set()
    for names, cell, setting in docs_defaults():
        names = [n for n in names if "." not in n]  # module constants (the template) are checked below
        if not names:
            continue
        documented.update(names)
        for name in names:
            assert name in DEFAULTS, f"docs/method.md documents {name!r} ({setting}); add it to DEFAULTS"
            assert config_defaults[name] == DEFAULTS[name][0], (name, config_defaults[name])
        words = [DEFAULTS[n][1] for n in names]
        if any(w is not None for w in words):
            assert [cell] == words, f"docs/method.md: {setting}: {cell!r}"
        else:
            numbers = [float(x) for x in NUMBER.findall(cell)]
            assert numbers == pytest.approx([float(DEFAULTS[n][0]) for n in names]), f"{setting}: {cell!r}"
    assert documented == set(DEFAULTS), sorted(set(DEFAULTS) ^ documented)
    method_fields = {f.name for f in config_fields()
                     if f.metadata["group"] in ("prompt", "promptsrc", "mmrl", "plugin", "optimiser")}
    assert method_fields <= documented, f"undocumented method settings: {sorted(method_fields - documented)}"


def docs_per_method() -> dict[str, dict[str, str]]:
    """docs/method.md's "Per method" table: method → field → cell."""
    text = METHOD_MD.read_text()
    section = text[text.index("### Per method"):]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table: dict[str, dict[str, str]] = {m: {} for m in header[1:]}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for method, cell in zip(header[1:], cells[1:]):
            table[method][re.findall(r"`([^`]+)`", cells[0])[0]] = cell
    return table


def documented(cell: str):
    words = {"random": None, "none (no context)": None, "on": True, "off": False}
    if cell in words:
        return words[cell]
    if cell.startswith('"'):
        return cell.strip('"')
    return float(cell) if NUMBER.fullmatch(cell) else cell


def test_method_dependent_defaults_resolve_as_documented(backbone):
    """Each method's values: the table here = docs/method.md's "Per method" = what TrainConfig resolves; a value given
    explicitly wins; S defaults to the stage-1 model's scale (MMRL: 100)."""
    assert sorted(PER_METHOD) == sorted(fvgpt.config.METHODS)
    docs = docs_per_method()
    assert sorted(docs) == sorted(PER_METHOD)
    for method, values in PER_METHOD.items():
        cfg = TrainConfig(data="d", method=method)
        assert set(docs[method]) == set(values) == set(fvgpt.config.PER_METHOD)
        for name, value in values.items():
            assert getattr(cfg, name) == value and documented(docs[method][name]) == value, (method, name)
        assert TrainConfig(data="d", method=method, prompt_lr=0.5, crop_scale=0.3).prompt_lr == 0.5
    coop, mmrl = TrainConfig(data="d"), TrainConfig(data="d", method="mmrl")
    assert TrainConfig(data="d", method="mmrl", crop_scale=0.3).crop_scale == 0.3
    assert BackboneRecord.of(backbone, coop).fdc_logit_scale == backbone.logit_scale
    assert BackboneRecord.of(backbone, mmrl).fdc_logit_scale == 100.0 != backbone.logit_scale
    assert BackboneRecord.of(backbone, dataclasses.replace(coop, fdc_logit_scale=50.0)).fdc_logit_scale == 50.0
    assert mmrl.mmrl_template == "a photo of a {}." and coop.mmrl_template is None
    assert TrainConfig(data="", dataset="oxford_pets", root="/r", method="mmrl").mmrl_template == \
        "a photo of a {}, a type of pet."
    assert coop.with_method("mmrl").optimizer == "adamw"
    assert mmrl.with_method("coop", keep=("crop_scale",)).crop_scale == 0.5
    assert mmrl.with_method("coop").crop_scale == 0.08 and mmrl.with_method("coop").mmrl_template is None


def test_defaults_that_live_in_code():
    rows = {setting: (names, cell) for names, cell, setting in docs_defaults()}
    names, cell = rows["zero-shot template"]
    assert names == ["fvgpt.labels.ZERO_SHOT_TEMPLATE"] and cell == f'"{ZERO_SHOT_TEMPLATE}"'
    assert labels.ZERO_SHOT_TEMPLATE == ZERO_SHOT_TEMPLATE
    assert rows["AdamW betas"][0] == ["fvgpt.train.ADAM_BETAS"] and fvgpt.train.ADAM_BETAS == (0.9, 0.999)
    names, cell = rows["PromptSRC teacher templates"]
    assert names == ["fvgpt.promptsrc.TEACHER_TEMPLATES"] and cell == "60 ImageNet templates"
    templates = fvgpt.promptsrc.TEACHER_TEMPLATES
    assert len(set(templates)) == 60 and templates[0] == ZERO_SHOT_TEMPLATE and templates[-1] == "itap of the {}."
    assert all(t.count("{}") == 1 for t in templates)
    assert [fvgpt.promptsrc.prompt_depth(None, n) for n in (12, 9, 4, 2)] == [9, 9, 4, 2]
    assert fvgpt.promptsrc.prompt_depth(3, 12) == 3 and fvgpt.promptsrc.PROMPT_STD == 0.02
    assert [fvgpt.mmrl.first_rep_layer(None, n) for n in (12, 4, 3, 2)] == [6, 2, 2, 1]
    assert fvgpt.mmrl.first_rep_layer(9, 4) == 4 and fvgpt.mmrl.REP_STD == 0.02
    assert fvgpt.promptsrc.gpa_weights(10, 15, 1)[-1] == pytest.approx(0.99592, abs=1e-5)  # the spec's 0.9959
    assert fvgpt.promptsrc.gpa_weights(10, 1000, 1)[-1] == 1.0  # a mean far past the epochs: the last, no underflow
    assert rows["activations of adapters and gates"][1] == "ReLU"
    plugin = FVGPTPlugin(512, 64, 32, 1e-3, 100.0, 2.0)
    for adapter in (plugin.image_adapter, plugin.text_adapter):
        first, act, last = adapter.mlp
        assert isinstance(act, nn.ReLU) and (first.in_features, first.out_features) == (512, 64)
        assert (last.in_features, last.out_features) == (64, 512)
        assert 0.9e-3 < last.weight.std() < 1.1e-3 and not last.bias.any()  # init scale, zero bias
    for gate in (plugin.frg, plugin.brg):
        first, act, last = gate.mlp
        assert isinstance(act, nn.ReLU) and (first.in_features, first.out_features, last.out_features) == (3, 32, 1)


def test_new_plugin_takes_the_config(backbone):
    cfg = TrainConfig(data="d", bottleneck=8, gate_hidden=5, fdc_init_scale=0.5, tau=3.0)
    plugin = FVGPTModel(backbone, None, cfg).new_plugin(42.0)
    assert (plugin.logit_scale, plugin.tau) == (42.0, 3.0)
    assert plugin.image_adapter.mlp[0].out_features == 8 and plugin.text_adapter.mlp[0].out_features == 8
    assert plugin.frg.mlp[0].out_features == 5 and plugin.brg.mlp[0].out_features == 5
    assert plugin.image_adapter.mlp[0].in_features == backbone.embed_dim
    assert 0.3 < plugin.text_adapter.mlp[2].weight.std() < 0.7


def test_schedule_and_augmentation_defaults(backbone):
    cfg = TrainConfig(data="d")
    lr, epochs = cfg.plugin_lr, cfg.plugin_epochs
    assert _lr_at(cfg, lr, 0, epochs) == 1e-5  # one warm-up epoch at 1e-5
    for epoch in range(1, epochs):
        assert _lr_at(cfg, lr, epoch, epochs) == pytest.approx(0.0035 * (1 + math.cos(math.pi * epoch / 10)) / 2)
    steps = train_transform(backbone.preprocess, True).transforms
    crop = next(t for t in steps if type(t).__name__ == "RandomResizedCrop")
    assert crop.scale == (0.08, 1.0) and any(type(t).__name__ == "RandomHorizontalFlip" for t in steps)
