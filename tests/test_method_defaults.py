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

from fvgpt import labels
from fvgpt.backbone import load_backbone
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
    "ctx_init": (None, '"a photo of a" (random for CoOp)'),  # resolved per method, below
    "kg_weight": (2.0, None),
    "prompt_epochs": (10, None),
    "prompt_lr": (0.0035, None),
    "prompt_batch": (4, None),
    "prompt_augment": (None, "off for CoOp (centre crop), on for KgCoOp"),  # resolved per method, below
    "crop_scale": (0.08, None),
    "plugin_epochs": (10, None),
    "plugin_lr": (0.0035, None),
    "plugin_batch": (4, None),
    "bottleneck": (64, None),
    "gate_hidden": (32, None),
    "fdc_init_scale": (0.001, None),
    "fdc_logit_scale": (None, "the backbone's s"),  # resolved to s when a run starts, below
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
ZERO_SHOT_TEMPLATE = "a photo of a {}."
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("fvgpt-tiny", "none")


def docs_defaults() -> list[tuple[list[str], str, str]]:
    """(config fields, default cell, setting) for each row of docs/method.md's "Defaults" table."""
    text = METHOD_MD.read_text()
    section = text[text.index("## Defaults"):]
    section = section[:section.index("\n## ", 4)] if "\n## " in section[4:] else section
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
    method_fields = {f.name for f in config_fields() if f.metadata["group"] in ("prompt", "plugin", "optimiser")}
    assert method_fields <= documented, f"undocumented method settings: {sorted(method_fields - documented)}"


def test_method_dependent_defaults_resolve_as_documented(backbone):
    coop, kgcoop = TrainConfig(data="d"), TrainConfig(data="d", method="kgcoop")
    assert (coop.ctx_init, coop.prompt_augment) == (None, False)
    assert (kgcoop.ctx_init, kgcoop.prompt_augment) == ("a photo of a", True)
    assert BackboneRecord.of(backbone, coop).fdc_logit_scale == backbone.logit_scale
    assert BackboneRecord.of(backbone, dataclasses.replace(coop, fdc_logit_scale=50.0)).fdc_logit_scale == 50.0


def test_defaults_that_live_in_code():
    rows = {setting: (names, cell) for names, cell, setting in docs_defaults()}
    names, cell = rows["zero-shot template"]
    assert names == ["fvgpt.labels.ZERO_SHOT_TEMPLATE"] and cell == f'"{ZERO_SHOT_TEMPLATE}"'
    assert labels.ZERO_SHOT_TEMPLATE == ZERO_SHOT_TEMPLATE
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
