"""The properties a faithful FVG-PT implementation must pass (docs/method.md, "Properties"), numbered as there."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from fvgpt.backbone import load_backbone
from fvgpt.classes import ClassSplit
from fvgpt.config import TrainConfig
from fvgpt.data import foreground_view, load_mask, mask_path_for, train_transform
from fvgpt.losses import distillation_loss, plugin_objective, trust_target
from fvgpt.metrics import foreground_shift, harmonic_mean
from fvgpt.model import FVGPTModel, Heads
from fvgpt.plugin import FVGPTPlugin, trainable_parameter_count
from fvgpt.prompts import PromptLearner
from fvgpt.stats import kl_div, softmax_stats

D = 32
CFG = TrainConfig(data="unused")
TAU = CFG.tau


def FVGPTPluginD(dim: int = D, logit_scale: float = 100.0) -> FVGPTPlugin:
    return FVGPTPlugin(dim, CFG.bottleneck, CFG.gate_hidden, CFG.fdc_init_scale, logit_scale, CFG.tau)


def objective(plugin, f, text, z_full, z_fg, z_clip, area, has_mask, labels):
    """L_total from backbone logits, the way FVGPTModel.plugin_loss composes it."""
    z_pc, b = plugin.calibrate(z_full, z_clip)
    heads = Heads(z_full, z_clip, plugin.base_logits(f, plugin.adapt_text(text)), z_pc, b)
    return plugin_objective(plugin, heads, z_fg, area, has_mask, labels, CFG)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("fvgpt-tiny", "none")


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


# 1 ─ mask path mapping, binarisation, NEAREST resize
def test_mask_path_mapping_and_binarisation(tmp_path):
    root = tmp_path / "ROOT"
    assert mask_path_for(root / "a" / "b" / "c.jpg", root) == root / "mask" / "a" / "b" / "c.jpg"
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = (200, 200, 200)  # mean 0.78 > 0.5: foreground
    arr[:, 4:6] = (255, 100, 0)  # mean 0.46: background, although two channels are bright
    Image.fromarray(arr).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", (8, 8))
    assert mask[:, :4].all() and not mask[:, 4:].any()
    resized = load_mask(tmp_path / "m.png", (16, 20))  # size mismatch → NEAREST, still binary
    assert resized.shape == (20, 16) and set(np.unique(resized)) <= {0, 1}
    assert resized[:, :8].all() and not resized[:, 8:].any()


# 2 ─ paired augmentation shares geometry; photometric steps leave the mask alone
def test_paired_augmentation_keeps_image_and_mask_aligned(backbone):
    size = 96
    yy, xx = np.mgrid[:size, :size]
    blob = ((xx - 30) ** 2 + (yy - 40) ** 2 < 20 ** 2) | ((xx > 60) & (yy > 55))
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = blob * 255  # red channel = the mask
    transform = train_transform(backbone.preprocess, augment=True)
    mean, std = torch.tensor(backbone.preprocess.mean), torch.tensor(backbone.preprocess.std)
    masks = []
    for seed in range(12):
        torch.manual_seed(seed)
        x, m = transform(Image.fromarray(img), tv_tensors.Mask(torch.from_numpy(blob.astype(np.uint8))[None]))
        red = x[0] * std[0] + mean[0]  # undo Normalize
        assert m.dtype == torch.uint8 and set(m.unique().tolist()) <= {0, 1}
        agreement = ((red > 0.5) == m[0].bool()).float().mean()
        assert agreement > 0.97, f"seed {seed}: image and mask disagree on {1 - agreement:.1%} of pixels"
        masks.append(m)
    assert any(not torch.equal(masks[0], m) for m in masks[1:]), "augmentation should vary with the seed"


# 3 ─ x_fg
@pytest.mark.parametrize("fill", ["mean", "black"])
def test_foreground_view(backbone, fill):
    x = torch.randn(2, 3, 8, 8)
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 2:5, 3:7] = 1
    x_fg = foreground_view(x, m, backbone.preprocess, fill)
    fg = m.expand_as(x).bool()
    assert torch.equal(x_fg[fg], x[fg])
    pre = backbone.preprocess
    want = torch.zeros(3) if fill == "mean" else -torch.tensor(pre.mean) / torch.tensor(pre.std)
    bg = x_fg.permute(0, 2, 3, 1)[~m[:, 0].bool()]
    assert torch.allclose(bg, want.expand_as(bg))


# 4 ─ FRG inputs
def test_frg_inputs_and_trust_range():
    z = torch.randn(5, 7) * 10
    u = FVGPTPluginD().frg_inputs(z, z, torch.ones(5))
    assert u.shape == (5, 3)
    assert torch.allclose(u[:, 0], torch.zeros(5), atol=1e-6)  # ΔH = 0
    assert torch.allclose(u[:, 1], torch.ones(5), atol=1e-6)  # cos = 1
    assert torch.equal(u[:, 2], torch.ones(5))  # A = 1 for an all-ones mask
    r = torch.sigmoid(FVGPTPluginD().trust_logit(z, torch.randn(5, 7), torch.rand(5)))
    assert ((r > 0) & (r < 1)).all()


# 5 ─ r*
def test_trust_target_matches_cross_entropy_comparison():
    z_full, z_fg = torch.randn(64, 6, requires_grad=True), torch.randn(64, 6, requires_grad=True)
    y = torch.randint(0, 6, (64,))
    r_star = trust_target(z_full, z_fg, y, 0.0)
    assert not r_star.requires_grad and set(r_star.unique().tolist()) <= {0.0, 1.0}
    ce = lambda z: F.cross_entropy(z, y, reduction="none")  # noqa: E731
    assert torch.equal(r_star, (ce(z_fg) < ce(z_full)).float())
    assert 0 < r_star.mean() < 1


# 6 ─ FDC starts near identity
def test_fdc_adapters_start_near_identity():
    plugin = FVGPTPluginD()
    f, g = unit(16, D), unit(10, D)
    f_t, g_t = plugin.image_adapter(f), plugin.adapt_text(g)
    assert (F.cosine_similarity(f_t, f) > 0.999).all() and (F.cosine_similarity(g_t, g) > 0.999).all()
    assert torch.allclose(f_t.norm(dim=-1), torch.ones(16)) and torch.allclose(g_t.norm(dim=-1), torch.ones(10))
    z_full, z_fdc = 100 * f @ g.t(), plugin.base_logits(f, g_t)
    assert torch.equal(z_fdc.argmax(-1), z_full.argmax(-1))


# 7 ─ L_dist
def test_distillation_loss_limits():
    z_fdc, z_full, z_fg = torch.randn(8, 5), torch.randn(8, 5), torch.randn(8, 5)
    assert torch.allclose(distillation_loss(z_fdc, z_full, z_fg, torch.zeros(8), TAU), kl_div(z_full, z_fdc, TAU).mean())
    assert torch.allclose(distillation_loss(z_fdc, z_full, z_fg, torch.ones(8), TAU), kl_div(z_fg, z_fdc, TAU).mean())
    assert distillation_loss(z_full, z_full, z_full, torch.rand(8), TAU).abs() < 1e-6
    assert distillation_loss(z_fdc, z_full, z_fg, torch.rand(8), TAU) >= 0


# 8 ─ BRG blend
def test_prior_calibration_blend_bounds():
    plugin = FVGPTPluginD()
    z_full, z_clip = torch.randn(6, 4) * 5, torch.randn(6, 4) * 5
    last = plugin.brg.mlp[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-100.0)  # b → 0
    assert torch.allclose(plugin.calibrate(z_full, z_clip)[0], z_full, atol=1e-6)
    with torch.no_grad():
        last.bias.fill_(100.0)  # b → 1
    assert torch.allclose(plugin.calibrate(z_full, z_clip)[0], z_clip, atol=1e-6)
    z_pc, b = FVGPTPluginD().calibrate(z_full, z_clip)
    lo, hi = torch.minimum(z_full, z_clip), torch.maximum(z_full, z_clip)
    assert ((z_pc >= lo - 1e-6) & (z_pc <= hi + 1e-6)).all() and ((b > 0) & (b < 1)).all()


# 9 ─ freezing and the parameter count
def test_only_plugin_parameters_train(backbone):
    assert trainable_parameter_count(512, 64, 32) == 132_546
    assert sum(p.numel() for p in FVGPTPluginD(512).parameters()) == 132_546
    classes = ClassSplit.paper(["red circle", "blue cross", "green square", "yellow cross"])
    model = FVGPTModel(backbone, classes, CFG, PromptLearner.initial(backbone, 4).requires_grad_(False))
    plugin = model.new_plugin(backbone.logit_scale)
    img = torch.randn(4, 3, backbone.preprocess.size, backbone.preprocess.size)
    masks = (torch.rand(4, 1, *img.shape[-2:]) > 0.5).float()
    model.plugin_loss(img, masks, torch.ones(4), torch.tensor([0, 1, 1, 0]), model.tables(classes.base_names))[
        "loss"].backward()
    for name, p in backbone.model.named_parameters():
        assert p.grad is None or not p.grad.any(), f"backbone parameter {name} received a gradient"
    assert model.prompt.ctx.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.parameters())


# 10 ─ gradient routing
def test_pc_loss_reaches_only_the_brg():
    plugin = FVGPTPluginD()
    f, text = unit(6, D), unit(4, D)
    z_full, z_clip, y = 20 * f @ text.t(), 20 * f @ unit(4, D).t(), torch.randint(0, 4, (6,))
    z_pc, _ = plugin.calibrate(z_full, z_clip)
    (F.cross_entropy(z_pc, y) + kl_div(z_clip, z_pc, TAU).mean()).backward()
    brg = {id(p) for p in plugin.brg.parameters()}
    for p in plugin.parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in brg)
    plugin.zero_grad(set_to_none=True)
    F.cross_entropy(plugin.base_logits(f, plugin.adapt_text(text)), y).backward()
    assert all(p.grad is None for p in plugin.brg.parameters())


# 11 ─ decoupled heads;  12 ─ no mask at inference;  13 ─ precomputed tables = online text encoding
def test_heads_are_decoupled_and_precomputed_equals_online(backbone):
    classes = ClassSplit.paper(["red circle", "blue cross", "green square", "yellow cross"])
    model = FVGPTModel(backbone, classes, CFG, PromptLearner.initial(backbone, 4).requires_grad_(False)).eval()
    model.new_plugin(backbone.logit_scale).requires_grad_(False)
    x = torch.randn(3, 3, backbone.preprocess.size, backbone.preprocess.size)
    with torch.no_grad():
        f = model.encode_image(x)  # the only input is the image batch: no mask exists at inference
        tables = model.tables(list(classes.names))
        heads = model.heads(f, tables)
        # 13: tables encoded once equal the text encoded now, and the image features are the tower's
        s = backbone.logit_scale
        learned = model.text_encoder(backbone.tokenize([f"X X X X {c}." for c in classes.names]), model.context)
        clip = model.text_encoder(backbone.tokenize([f"a photo of a {c}." for c in classes.names]))
        assert torch.allclose(tables.learned, learned, atol=1e-6) and torch.allclose(tables.clip, clip, atol=1e-6)
        assert torch.allclose(f, F.normalize(backbone.model.encode_image(x), dim=-1), atol=1e-6)
        assert torch.allclose(heads.z_full, s * f @ learned.t(), atol=1e-4)
        base = model.heads(f, tables.rows(classes.base_ids))
        # 11: adapters/FRG never touch the new head; the BRG never touches the base head
        plugin = model.plugin
        original = copy.deepcopy(plugin.state_dict())
        for module in (plugin.image_adapter, plugin.text_adapter, plugin.frg):
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(model.heads(f, tables).z_pc, heads.z_pc)
        assert not torch.equal(model.heads(f, tables.rows(classes.base_ids)).z_fdc, base.z_fdc)
        plugin.load_state_dict(original)
        for p in plugin.brg.parameters():
            p.add_(torch.randn_like(p))
        assert torch.equal(model.heads(f, tables.rows(classes.base_ids)).z_fdc, base.z_fdc)
        assert not torch.equal(model.heads(f, tables).z_pc, heads.z_pc)


# 14 ─ numerical safety
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_entropy_is_finite_for_peaked_logits(dtype):
    z = torch.full((2, 10), -100.0, dtype=dtype)
    z[:, 3] = 100.0
    for tau in (1.0, 2.0):
        p, h = softmax_stats(z, tau)
        assert torch.isfinite(h).all() and torch.isfinite(p).all() and (h >= 0).all() and h.dtype == torch.float32


# 15 ─ D_fg
def test_foreground_shift_index():
    z = torch.randn(5, 8) * 4
    assert foreground_shift(z, z, 1.0).abs().max() < 1e-6
    assert (foreground_shift(z, torch.randn(5, 8) * 4, 2.0) >= 0).all()


# 16 ─ smoke training: L_total goes down; r moves toward r*
def test_loss_decreases_and_trust_learns_the_reliable_view():
    torch.manual_seed(0)
    n, c = 256, 5
    y = torch.randint(0, c, (n,))
    informative = F.one_hot(y, c).float() * 6 + torch.randn(n, c)
    fg_reliable = torch.rand(n) < 0.5
    # where the foreground view is reliable it is peaked on the label and the full view is noise; else the reverse
    z_fg = torch.where(fg_reliable[:, None], informative, torch.randn(n, c))
    z_full = torch.where(fg_reliable[:, None], torch.randn(n, c), informative)
    f, text = unit(n, D), unit(c, D)
    plugin = FVGPTPluginD(logit_scale=20.0)
    opt = torch.optim.Adam(plugin.parameters(), lr=1e-2)
    args = (plugin, f, text, z_full, z_fg, z_full, torch.full((n,), 0.3), torch.ones(n), y)
    r_star = trust_target(z_full, z_fg, y, 0.0)
    first = objective(*args)
    gap0 = (torch.sigmoid(plugin.trust_logit(z_full, z_fg, torch.full((n,), 0.3))) - r_star).abs().mean()
    for _ in range(150):
        loss = objective(*args)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = objective(*args)
    gap = (torch.sigmoid(plugin.trust_logit(z_full, z_fg, torch.full((n,), 0.3))) - r_star).abs().mean()
    assert last["loss"] < first["loss"] * 0.9
    assert gap < gap0 and gap < 0.25


def test_unusable_masks_get_zero_trust():
    plugin, n = FVGPTPluginD(), 6
    z = torch.randn(n, 4)
    area = torch.tensor([0.5, 0.5, 0.01, 0.99, 0.5, 0.5])
    has_mask = torch.tensor([1.0, 0, 1, 1, 1, 1])
    out = objective(plugin, unit(n, D), unit(4, D), z, z + 1, z, area, has_mask, torch.zeros(n, dtype=torch.long))
    usable = torch.tensor([True, False, False, False, True, True])
    r = torch.sigmoid(plugin.trust_logit(z, z + 1, area))
    assert torch.allclose(out["r"], torch.where(usable, r, torch.zeros_like(r)).mean())


# 17 ─ HM and the average row
def test_harmonic_mean_and_average_row():
    from fvgpt.metrics import average_row

    assert round(harmonic_mean(82.40, 73.62), 2) == 77.76
    base, new, hm = average_row([(90.0, 60.0), (74.8, 87.24)])
    assert (base, new) == pytest.approx((82.40, 73.62)) and round(hm, 2) == 77.76
    assert hm != pytest.approx((harmonic_mean(90, 60) + harmonic_mean(74.8, 87.24)) / 2)
