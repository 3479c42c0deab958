"""The world's micro-CLIP: the committed checkpoint (recorded sha256, local-file loading, it knows the world), and the
pretraining command's output loading as local weights that a run is then tied to."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from fvgpt.backbone import load_backbone
from fvgpt.rundir import RunDirError, load_run
from fvgpt.train import train
from fvgpt.world import WORLD_MODEL, PretrainConfig
from fvgpt.world_clip import CHECKPOINT, CHECKPOINT_SHA256, file_sha256, probe, pretrain_world_clip, verified_checkpoint

README = Path(__file__).resolve().parents[1] / "fvgpt" / "weights" / "README.md"


def test_committed_checkpoint_has_its_recorded_sha256_and_knows_the_world():
    assert file_sha256(CHECKPOINT) == CHECKPOINT_SHA256 and verified_checkpoint() == CHECKPOINT
    assert CHECKPOINT_SHA256 in README.read_text()
    assert CHECKPOINT.stat().st_size <= 20 * 2**20
    backbone = load_backbone(WORLD_MODEL, str(CHECKPOINT))
    assert backbone.pretrained == str(CHECKPOINT) and backbone.embed_dim == 128
    acc = probe(backbone, images=120)
    # chance: 1/8 for colour and scene, 1/4 for pattern; a random-init model stays there. (Shape it never learned:
    # fvgpt/weights/README.md.)
    assert acc["colour"] > 80 and acc["scene"] > 70 and acc["pattern"] > 40, acc
    random_init = probe(load_backbone(WORLD_MODEL, "none"), images=120)
    assert random_init["colour"] < 35, random_init


def test_pretraining_writes_weights_that_load_as_a_local_file_and_train(demo_data, tmp_path):
    out = tmp_path / "tiny.safetensors"
    record = pretrain_world_clip(out, PretrainConfig(model="fvgpt-tiny", steps=4, batch=8), progress=False)
    assert record["sha256"] == file_sha256(out) and record["images_per_s"] > 0
    assert set(record["probe"]) == {"object", "shape", "colour", "pattern", "scene"}
    again = tmp_path / "again.safetensors"
    pretrain_world_clip(again, PretrainConfig(model="fvgpt-tiny", steps=4, batch=8), progress=False)
    assert file_sha256(again) == record["sha256"]  # reproducible: same settings, same bytes
    random_init, pretrained = load_backbone("fvgpt-tiny", "none"), load_backbone("fvgpt-tiny", str(out))
    assert pretrained.fingerprint() != random_init.fingerprint()
    assert not torch.equal(pretrained.model.visual.conv1.weight, random_init.model.visual.conv1.weight)
    run = train(tiny_config(demo_data, pretrained=str(out), prompt_epochs=1, plugin_epochs=1), tmp_path / "run",
                progress=False)
    assert json.loads((run / "config.json").read_text())["train"]["pretrained"] == str(out)
    assert load_run(run, require_plugin=True).model.backbone.fingerprint() == pretrained.fingerprint()
    out.write_bytes(again.read_bytes())  # same bytes: still the run's weights
    load_run(run)
    pretrain_world_clip(out, PretrainConfig(model="fvgpt-tiny", steps=5, batch=8), progress=False)
    with pytest.raises(RunDirError, match="fingerprint"):  # other weights under the same path are refused
        load_run(run)
