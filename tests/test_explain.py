"""Explain maps (fvgpt/explain.py, `fvgpt export --explain`, fvgpt_runtime.explain): the last-layer decomposition is
checked against a reference built from open_clip's own modules (nn.MultiheadAttention's attention probabilities, the
real block's output), its terms sum to the feature, and the exported graphs reproduce torch at several batch sizes
while the plain tower graph stays byte for byte what it was.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fvgpt.backbone import ImageTower, load_backbone
from fvgpt.explain import ExplainError, ExplainTower
from fvgpt.heatmap import overlay
from fvgpt_export.build import ExportOptions, export_zero_shot
from fvgpt_export.parity import check_explain, parity_pixels
from fvgpt_export.validate import validate_bundle
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.explain import label_grid
from fvgpt_runtime.manifest import MANIFEST, BundleError
from fvgpt_runtime.preprocess import crop_box


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("fvgpt-tiny", "none", init_seed=0)


def reference_terms(visual, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every additive term of the unnormalised CLS feature, from open_clip's modules: the last block's input and
    output captured by hooks, the attention probabilities from nn.MultiheadAttention itself (need_weights=True)."""
    captured = {}
    last = visual.transformer.resblocks[-1]
    hooks = [last.register_forward_hook(lambda m, args, out: captured.update(x_in=args[0], x_out=out))]
    with torch.no_grad():
        pooled = visual(pixels)
        for h in hooks:
            h.remove()
        x_in, x_out = captured["x_in"], captured["x_out"]
        attn = last.attn
        y = last.ln_1(x_in)
        out, probs = attn(y, y, y, need_weights=True, average_attn_weights=False)  # probs (B, H, N, N)
        heads, w = attn.num_heads, x_in.shape[-1]
        v = F.linear(y, attn.in_proj_weight[2 * w:], attn.in_proj_bias[2 * w:])  # (B, N, W)
        vh = v.reshape(*v.shape[:2], heads, w // heads)  # (B, N, H, dh)
        token = torch.einsum("bhj,bjhd->bjhd", probs[:, :, 0], vh).reshape(*v.shape)  # (B, N, W) per source token
        token = last.ls_1(token @ attn.out_proj.weight.t())
        mid = x_in[:, 0] + last.ls_1(out[:, 0])
        cls = x_out[:, 0]
        ln = visual.ln_post
        sigma = torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + ln.eps)

        def linear(t: torch.Tensor) -> torch.Tensor:  # ln_post's linear part at the CLS token's own statistics
            return ((t - t.mean(-1, keepdim=True)) * ln.weight / sigma.unsqueeze(1)) @ visual.proj

        rest = torch.stack([x_in[:, 0], last.ls_1(attn.out_proj.bias).expand_as(mid), cls - mid], 1)
        return {"pooled": pooled, "tokens": linear(token), "rest": linear(rest), "beta": ln.bias @ visual.proj}


def test_decomposition_matches_open_clip_and_sums_to_the_feature(backbone):
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = reference_terms(backbone.model.visual, pixels)
    features, contrib, dense = ExplainTower(backbone.model.visual, dense=True)(pixels)
    norm = ref["pooled"].norm(dim=-1, keepdim=True)
    assert contrib.shape == (3, 64, 64) and dense.shape == (3, 64, 64)  # 8×8 patches, D = 64
    assert torch.allclose(features, ImageTower(backbone)(pixels), atol=1e-6)
    assert torch.allclose(contrib, ref["tokens"][:, 1:] / norm[:, None], atol=1e-6)
    # every term together is the feature: the patches, the CLS token's own attention term, residual, bias, MLP, β
    total = ref["tokens"].sum(1) + ref["rest"].sum(1) + ref["beta"]
    assert torch.allclose(total, ref["pooled"], atol=1e-4)
    assert torch.allclose(contrib.sum(1), (ref["pooled"] - ref["tokens"][:, 0] - ref["rest"].sum(1) - ref["beta"])
                          / norm, atol=1e-5)
    assert torch.allclose(dense.norm(dim=-1), torch.ones(3, 64), atol=1e-5)


def test_a_tower_without_cls_pooling_is_refused(backbone):
    visual = load_backbone("fvgpt-tiny", "none").model.visual
    visual.pool_type = "avg"
    with pytest.raises(ExplainError, match="does not pool the CLS token"):
        ExplainTower(visual)


@pytest.fixture(scope="module")
def explain_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "zs"
    return export_zero_shot("fvgpt-tiny", "none", ["cat", "dog", "rocket"], out,
                            ExportOptions(progress=False, parity_images=16, precision="int8", explain=True))


def test_exported_explain_graphs_equal_torch_and_leave_the_tower_alone(explain_bundle, tiny_zero_shot_bundle,
                                                                       backbone):
    m = json.loads((explain_bundle / MANIFEST).read_text())
    explain = m["towers"]["image"]["explain"]
    assert {k: g["file"] for k, g in explain.items()} == {"onnx-fp32": "tower.explain.fp32.onnx",
                                                           "onnx-int8": "tower.explain.int8.onnx"}
    checks = m["parity"]["checks"]
    assert checks["explain_fp32"]["passed"] and checks["explain_int8"]["passed"]
    assert checks["explain_int8"]["min_map_correlation"] >= 0.95
    # /classify's graph is the one a bundle without --explain has, byte for byte
    assert (explain_bundle / "tower.fp32.onnx").read_bytes() == (tiny_zero_shot_bundle / "tower.fp32.onnx").read_bytes()
    bundle = Bundle(explain_bundle)
    pixels = np.concatenate([parity_pixels(bundle.preprocess, 0),
                             np.random.default_rng(1).normal(size=(4, 3, 64, 64))]).astype(np.float32)
    torch_f, torch_c = ExplainTower(backbone.model.visual)(torch.from_numpy(pixels))
    run = bundle.explainer("fp32")
    for batch in (1, 3, 8):
        f, c = run(pixels[:batch])
        assert np.abs(f - torch_f[:batch].detach().numpy()).max() <= 1e-5
        assert np.abs(c - torch_c[:batch].detach().numpy()).max() <= 1e-5
    _, c8 = bundle.explainer("int8")(pixels)
    rows = bundle.directions(["cat", "dog"], "zero-shot")
    for i in range(len(pixels)):  # int8 maps keep fp32's shape: correlation per image and label
        for row in rows:
            a, b = label_grid(c8[i], row).ravel(), label_grid(torch_c[i].detach().numpy(), row).ravel()
            assert np.corrcoef(a, b)[0, 1] >= 0.95
    assert validate_bundle(explain_bundle)["checks"]["explain_int8"]["passed"]


def test_bundles_without_explain_say_how_to_get_it(tiny_zero_shot_bundle):
    with pytest.raises(BundleError, match="fvgpt export --explain"):
        Bundle(tiny_zero_shot_bundle).explainer()


def test_the_gate_refuses_maps_that_moved(explain_bundle):
    """The stored reference against the graphs: passes as exported; maps shifted by a constant fail fp32's bound,
    maps with their patches reversed fail int8's correlation bound."""
    from safetensors.numpy import load_file

    bundle = Bundle(explain_bundle)
    reference = load_file(str(explain_bundle / "parity_reference.safetensors"))
    pixels = parity_pixels(bundle.preprocess, bundle.manifest.parity["generated_images"])
    assert check_explain(bundle, "fp32", pixels, reference)["passed"]
    shifted = check_explain(bundle, "fp32", pixels, reference | {"explain_map": reference["explain_map"] + 1e-3})
    assert not shifted["passed"] and shifted["failures"][0].startswith("explain_map max |Δ|")
    reversed_maps = reference | {"explain_map": reference["explain_map"][:, ::-1].copy()}
    moved = check_explain(bundle, "int8", pixels, reversed_maps)
    assert not moved["passed"] and moved["failures"][0].startswith("explain_map min correlation")


def test_crop_box_is_the_part_preprocess_keeps():
    from fvgpt.preprocess import Preprocess

    cfg = Preprocess(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear",
                     resize_mode="shortest")
    x0, y0, x1, y1 = crop_box(100, 40, cfg)  # 100×40 → 80×32, centre 32 columns from 24: 0.3..0.7 of the width
    assert (x0, y0, x1, y1) == (0.3, 0.0, 0.7, 1.0)
    assert crop_box(40, 100, cfg) == (0.0, 0.3, 1.0, 0.7)
    grid = np.zeros((2, 2), np.float32)
    grid[0, 0] = 1.0  # only the top-left patch: tinted inside the box's top-left quarter, nowhere else
    drawn = np.asarray(overlay(Image.fromarray(np.full((40, 100, 3), 128, np.uint8)), grid, (x0, y0, x1, y1)))
    changed = np.argwhere((drawn != 128).any(-1))
    assert changed[:, 1].min() >= 30 and changed[:, 1].max() < 70 and changed[:, 0].max() < 40
    assert (drawn[:, :30] == 128).all() and (drawn[:, 70:] == 128).all()
