"""`fvgpt eval --attention` (fvgpt/attention.py): the alignment metric on synthetic maps whose answer is worked out
by hand (and by upsampling the map to pixels, as the metric is defined), the paired bootstrap, and the command on the
tiny run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fvgpt.attention import alignment, bootstrap_ci, patch_fractions
from fvgpt.cli import main


def pixel_fg_mass(grid_map: np.ndarray, mask: np.ndarray) -> float:
    """The definition on pixels: the map upsampled (each patch over its pixels), ReLU, mass inside the mask."""
    scale = mask.shape[0] // grid_map.shape[0]
    up = np.maximum(np.kron(grid_map, np.ones((scale, scale))), 0)
    return float((up * mask).sum() / up.sum())


def test_fg_mass_and_pointing_game_on_maps_with_known_answers():
    g = 4  # 4×4 patches of 2×2 pixels over an 8×8 image
    left = np.zeros((8, 8), bool)
    left[:, :4] = True  # foreground: the left half = patch columns 0 and 1
    corner = np.zeros((8, 8), bool)
    corner[0, 0] = True  # foreground: one pixel of patch (0, 0), a quarter of it
    m = np.zeros((g, g), np.float32)
    m[0, 0], m[0, 3], m[1, 1] = 3.0, 1.0, -5.0  # the negative patch is ignored (ReLU), not rescaled (min-max)
    maps = torch.from_numpy(np.stack([m, m, -np.abs(m) - 1]).reshape(3, -1))
    masks = torch.from_numpy(np.stack([left, corner, left]))
    got = alignment(maps, patch_fractions(masks, g))
    # image 0: 3 of the 4 units of positive mass lie in the left half; the top patch is all foreground
    assert got["fg_mass"][0].item() == pytest.approx(0.75) == pytest.approx(pixel_fg_mass(m, left))
    # image 1: one pixel of patch (0, 0) holds 3 of 16 pixel-units; the top patch is 1/4 foreground: a miss
    assert got["fg_mass"][1].item() == pytest.approx(3 / 16) == pytest.approx(pixel_fg_mass(m, corner))
    assert got["hit"].tolist()[:2] == [1.0, 0.0]
    assert torch.isnan(got["fg_mass"][2])  # no positive value: left out, not counted as 0 or 1


def test_paired_bootstrap_interval():
    assert bootstrap_ci(np.full(50, 0.2)) == pytest.approx((0.2, 0.2, 0.2))
    rng = np.random.default_rng(1)
    diff = rng.normal(0.1, 0.05, 400)
    mean, lo, hi = bootstrap_ci(np.concatenate([diff, [np.nan]]))
    se = diff.std(ddof=1) / np.sqrt(len(diff))  # the normal-theory interval the bootstrap should approach
    assert mean == pytest.approx(diff.mean())
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.3 * se) and hi == pytest.approx(mean + 1.96 * se, abs=0.3 * se)


def test_eval_attention_on_the_tiny_run(tiny_run, tmp_path, capsys):
    figure = tmp_path / "maps.png"
    assert main(["eval", str(tiny_run), "--attention", "--figure", str(figure), "--figure-images", "3",
                 "--quiet", "--out", str(tmp_path / "attention.json")]) == 0
    result = json.loads((tmp_path / "attention.json").read_text())
    classes = json.loads((tiny_run / "classes.json").read_text())
    assert result["images"] > 0 and 0 < result["chance"] < 1
    for m in ("decomposition", "maskclip"):
        assert set(result["maps"][m]) == {"zero-shot", "coop", "fvgpt"}
        for row in result["maps"][m].values():
            assert 0 <= row["fg_mass"] <= 1 and 0 <= row["hit"] <= 1
        for pair, d in result["differences"][m].items():
            assert pair in ("fvgpt - coop", "coop - zero-shot")
            mean, lo, hi = d["fg_mass"]
            assert lo <= mean <= hi
    sheet = Image.open(figure)
    assert sheet.size == (160 * 4, 20 + 160 * 3)  # image + three rows' maps, three images
    out = capsys.readouterr().out
    assert "fvgpt - coop" in out and "chance fg_mass" in out and len(classes) > 0


def test_figure_without_attention_is_a_usage_error(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--figure", "x.png"]) == 2
    assert "error: --figure draws the maps of --attention" in capsys.readouterr().err
