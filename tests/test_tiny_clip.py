"""The embedded default's pretrained fvgpt-tiny, and the local-checkpoint weights path it exercises."""
from __future__ import annotations

import json

import torch

from conftest import tiny_config
from fvgpt.backbone import load_backbone
from fvgpt.rundir import load_run
from fvgpt.tiny_clip import pretrain_tiny_clip
from fvgpt.train import train


def test_pretrained_checkpoint_loads_as_local_weights_and_trains(demo_data, tmp_path):
    ckpt = pretrain_tiny_clip(tmp_path / "tiny.safetensors", steps=6, batch=16, progress=False)
    random_init = load_backbone("fvgpt-tiny", "none")
    pretrained = load_backbone("fvgpt-tiny", str(ckpt))
    assert pretrained.fingerprint() != random_init.fingerprint()
    assert not torch.equal(pretrained.model.visual.conv1.weight, random_init.model.visual.conv1.weight)
    run = train(tiny_config(demo_data, pretrained=str(ckpt), prompt_epochs=1, plugin_epochs=1),
                tmp_path / "run", progress=False)
    assert json.loads((run / "config.json").read_text())["train"]["pretrained"] == str(ckpt)
    assert load_run(run, require_plugin=True).model.backbone.fingerprint() == pretrained.fingerprint()
    ckpt.write_bytes(ckpt.read_bytes()[:-1024] + bytes(1024))  # the weights changed under the run
    try:
        load_run(run)
    except RuntimeError as exc:
        assert "fingerprint" in str(exc) or "could not load" in str(exc)
    else:
        raise AssertionError("a run must refuse weights that differ from those it was trained on")
