"""The properties a faithful FVG-PT implementation must pass (docs/method.md, "Properties"), numbered as there.

Expectations come from tests/method_reference.py (the equations in plain float64 torch), never from fvgpt's own
helpers. The wiring of the stage-2 step and of evaluation is in test_method_wiring.py, every KL and cross-entropy's
direction in test_method_directions.py, the defaults in test_method_defaults.py.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

import method_reference as ref
from fvgpt.classes import ClassSplit
from fvgpt.config import TrainConfig
from fvgpt.data import foreground_view, load_mask, mask_path_for, train_transform
from fvgpt.losses import distillation_loss, plugin_objective, trust_target
from fvgpt.metrics import accuracy, average_row, foreground_shift, harmonic_mean
from fvgpt.model import FVGPTModel, Heads
from fvgpt.plugin import FVGPTPlugin, trainable_parameter_count
from fvgpt.prompts import PromptLearner
from fvgpt.stats import softmax_stats

D = 32
CFG = TrainConfig(data="unused")
CLASSES = ["red circle", "blue cross", "green square", "yellow cross"]


def make_plugin(dim: int = D, logit_scale: float = 100.0, hidden: int = 32) -> FVGPTPlugin:
    return FVGPTPlugin(dim, 64, hidden, 1e-3, logit_scale, ref.TAU)


def objective(plugin, f, text, z_full, z_fg, z_clip, area, has_mask, labels):
    """L_total from backbone logits, the way FVGPTModel.plugin_loss composes it."""
    z_pc, b = plugin.calibrate(z_full, z_clip)
    heads = Heads(z_full, z_clip, plugin.base_logits(f, plugin.adapt_text(text)), z_pc, b)
    return plugin_objective(plugin, heads, z_fg, area, has_mask, labels, CFG)


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


# 3 ─ x_fg; the default fill is CLIP's mean colour (0 after normalisation)
@pytest.mark.parametrize("fill", ["mean", "black", None])
def test_foreground_view(backbone, fill):
    x = torch.randn(2, 3, 8, 8)
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 2:5, 3:7] = 1
    pre = backbone.preprocess
    x_fg = foreground_view(x, m, pre, fill) if fill else foreground_view(x, m, pre)
    fg = m.expand_as(x).bool()
    assert torch.equal(x_fg[fg], x[fg])
    black = -torch.tensor(pre.mean) / torch.tensor(pre.std)  # pixel value 0 after Normalize
    want = black if fill == "black" else torch.zeros(3)
    bg = x_fg.permute(0, 2, 3, 1)[~m[:, 0].bool()]
    assert torch.allclose(bg, want.expand_as(bg))
    with pytest.raises(ValueError, match=r"^unknown foreground fill 'grey' \(mean\|black\)$"):
        foreground_view(x, m, pre, "grey")


# 4 ─ FRG inputs (E1) and the trust range (E2)
def test_frg_inputs_and_trust_range():
    z_full, z_fg, area = torch.randn(5, 7) * 4, torch.randn(5, 7) * 4, torch.rand(5)
    plugin = make_plugin()
    u = plugin.frg_inputs(z_full, z_fg, area)
    assert u.shape == (5, 3) and u.dtype == torch.float32
    assert torch.allclose(u.double(), ref.frg_inputs(z_full, z_fg, area), atol=1e-5)
    same = plugin.frg_inputs(z_full, z_full, area)  # both views agree: ΔH = 0, cos = 1, A passed through
    assert torch.allclose(same[:, :2], torch.tensor([[0.0, 1.0]]).expand(5, 2), atol=1e-6)
    assert torch.equal(same[:, 2], area)
    logit = plugin.trust_logit(z_full, z_fg, area)
    weights = plugin.state_dict()
    assert torch.allclose(logit.double(), ref.gate_logit(ref.frg_inputs(z_full, z_fg, area), weights, "frg"),
                          atol=1e-5)
    r = torch.sigmoid(logit)
    assert ((r > 0) & (r < 1)).all()


# 5 ─ r* (E3)
def test_trust_target_matches_cross_entropy_comparison():
    z_full, z_fg = torch.randn(64, 6, requires_grad=True), torch.randn(64, 6, requires_grad=True)
    y = torch.randint(0, 6, (64,))
    r_star = trust_target(z_full, z_fg, y, 0.0)
    assert not r_star.requires_grad and set(r_star.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(r_star, (ref.ce(z_fg.detach(), y) < ref.ce(z_full.detach(), y)).float())
    assert 0 < r_star.mean() < 1


# 6 ─ FDC starts near identity (E5 with the init scale)
def test_fdc_adapters_start_near_identity():
    torch.manual_seed(0)
    plugin = make_plugin()
    f, g = unit(64, D), unit(10, D)
    f_t, g_t = plugin.image_adapter(f), plugin.adapt_text(g)
    assert (F.cosine_similarity(f_t, f) > 0.999).all() and (F.cosine_similarity(g_t, g) > 0.999).all()
    assert torch.allclose(f_t.norm(dim=-1), torch.ones(64)) and torch.allclose(g_t.norm(dim=-1), torch.ones(10))
    z_full, z_fdc = 100 * f @ g.t(), plugin.base_logits(f, g_t)
    shift = (z_fdc - z_full).abs().max()
    assert shift < 0.05 * (z_full.max() - z_full.min())
    top2 = z_full.topk(2).values
    clear = top2[:, 0] - top2[:, 1] > 2 * shift  # where no shift of that size can reorder the top class
    assert clear.sum() > 32 and torch.equal(z_fdc.argmax(-1)[clear], z_full.argmax(-1)[clear])


# 7 ─ L_dist (E7)
def test_distillation_loss_limits():
    z_fdc, z_full, z_fg = torch.randn(8, 5) * 3, torch.randn(8, 5) * 3, torch.randn(8, 5) * 3
    at = lambda r: distillation_loss(z_fdc, z_full, z_fg, r, ref.TAU).double()  # noqa: E731
    assert torch.allclose(at(torch.zeros(8)), ref.kl(z_full, z_fdc, ref.TAU).mean(), atol=1e-6)
    assert torch.allclose(at(torch.ones(8)), ref.kl(z_fg, z_fdc, ref.TAU).mean(), atol=1e-6)
    assert distillation_loss(z_full, z_full, z_full, torch.rand(8), ref.TAU).abs() < 1e-6
    assert distillation_loss(z_fdc, z_full, z_fg, torch.rand(8), ref.TAU) >= 0


# 8 ─ BRG blend (E11)
def test_prior_calibration_blend_bounds():
    plugin = make_plugin()
    z_full, z_clip = torch.randn(6, 4) * 5, torch.randn(6, 4) * 5
    last = plugin.brg.mlp[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-100.0)  # b → 0
    assert torch.allclose(plugin.calibrate(z_full, z_clip)[0], z_full, atol=1e-6)
    with torch.no_grad():
        last.bias.fill_(100.0)  # b → 1
    assert torch.allclose(plugin.calibrate(z_full, z_clip)[0], z_clip, atol=1e-6)
    z_pc, b = make_plugin().calibrate(z_full, z_clip)
    lo, hi = torch.minimum(z_full, z_clip), torch.maximum(z_full, z_clip)
    assert ((z_pc >= lo - 1e-6) & (z_pc <= hi + 1e-6)).all() and ((b > 0) & (b < 1)).all()


# 9 ─ freezing and the parameter count
@pytest.mark.parametrize("dim, bottleneck, hidden", [(512, 64, 32), (64, 16, 8), (32, 64, 5)])
def test_parameter_count_matches_the_modules(dim, bottleneck, hidden):
    plugin = FVGPTPlugin(dim, bottleneck, hidden, 1e-3, 100.0, ref.TAU)
    assert trainable_parameter_count(dim, bottleneck, hidden) == sum(p.numel() for p in plugin.parameters())
    assert trainable_parameter_count(512, 64, 32) == 132_546


def test_only_plugin_parameters_get_gradients(backbone):
    classes = ClassSplit.paper(CLASSES)
    prompt = PromptLearner.initial(backbone, 4)
    assert prompt.ctx.requires_grad  # a trainable context: stage 2 must still not reach it
    model = FVGPTModel(backbone, classes, CFG, prompt)
    plugin = model.new_plugin(backbone.logit_scale)
    img = torch.randn(4, 3, backbone.preprocess.size, backbone.preprocess.size)
    masks = (torch.rand(4, 1, *img.shape[-2:]) > 0.5).float()
    model.plugin_loss(img, masks, torch.ones(4), torch.tensor([0, 1, 1, 0]), model.tables(classes.base_names))[
        "loss"].backward()
    for name, p in backbone.model.named_parameters():
        assert p.grad is None, f"backbone parameter {name} received a gradient"
    assert prompt.ctx.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.parameters())


# 10 ─ gradient routing
def test_pc_loss_reaches_only_the_brg():
    plugin = make_plugin()
    f, text = unit(6, D), unit(4, D)
    z_full, z_clip, y = 20 * f @ text.t(), 20 * f @ unit(4, D).t(), torch.randint(0, 4, (6,))
    z_pc, _ = plugin.calibrate(z_full, z_clip)
    (F.cross_entropy(z_pc, y) + ref.kl(z_clip, z_pc, ref.TAU).mean()).backward()
    brg = {id(p) for p in plugin.brg.parameters()}
    for p in plugin.parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in brg)
    plugin.zero_grad(set_to_none=True)
    F.cross_entropy(plugin.base_logits(f, plugin.adapt_text(text)), y).backward()
    assert all(p.grad is None for p in plugin.brg.parameters())


# 11 ─ decoupled heads;  12 ─ no mask at inference;  13 ─ precomputed tables = online text encoding
def test_heads_are_decoupled_and_precomputed_equals_online(backbone):
    classes = ClassSplit.paper(CLASSES)
    model = FVGPTModel(backbone, classes, CFG, PromptLearner.initial(backbone, 4).requires_grad_(False)).eval()
    model.new_plugin(backbone.logit_scale).requires_grad_(False)
    x = torch.randn(3, 3, backbone.preprocess.size, backbone.preprocess.size)
    with torch.no_grad():
        f = model.encode_image(x)
        tables = model.tables(list(classes.names))
        heads = model.heads(f, tables)
        # 13: tables encoded once equal open_clip's text tower with the context spliced in, and the image
        # features are open_clip's
        s = backbone.logit_scale
        learned = ref.text_features(backbone.model, backbone.tokenizer, ref.learned_texts(CLASSES, 4), model.context)
        clip = ref.text_features(backbone.model, backbone.tokenizer, ref.zero_shot_texts(CLASSES))
        assert torch.allclose(tables.learned, learned, atol=1e-5) and torch.allclose(tables.clip, clip, atol=1e-5)
        assert not torch.allclose(tables.learned, tables.clip, atol=1e-3)
        assert torch.allclose(f, ref.image_features(backbone.model, x), atol=1e-6)
        assert torch.allclose(heads.z_full, s * f @ learned.t(), atol=1e-4)
        assert torch.allclose(heads.z_clip, s * f @ clip.t(), atol=1e-4)
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


def test_inference_uses_no_mask_and_no_frg(backbone):
    """12: the inference path takes images only, and the FRG (which needs the foreground view) never runs."""
    assert list(inspect.signature(FVGPTModel.encode_image).parameters) == ["self", "pixels"]
    assert list(inspect.signature(FVGPTModel.heads).parameters) == ["self", "image_features", "tables"]
    model = FVGPTModel(backbone, ClassSplit.paper(CLASSES), CFG, PromptLearner.initial(backbone, 4)).eval()
    plugin = model.new_plugin(backbone.logit_scale)
    calls = []
    plugin.frg.register_forward_hook(lambda *_: calls.append("frg"))
    with torch.no_grad():
        heads = model.heads(model.encode_image(torch.randn(2, 3, 64, 64)), model.tables(CLASSES))
    assert heads.z_fdc is not None and heads.z_pc is not None and calls == []


# 14 ─ numerical safety
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_entropy_is_finite_for_peaked_logits(dtype):
    z = torch.full((2, 10), -100.0, dtype=dtype)
    z[:, 3] = 100.0
    for tau in (1.0, 2.0):
        p, h = softmax_stats(z, tau)
        assert torch.isfinite(h).all() and torch.isfinite(p).all() and (h >= 0).all() and h.dtype == torch.float32
        assert h.max() < 1e-6 and torch.allclose(p[:, 3], torch.ones(2))


# 15 ─ D_fg (E13)
def test_foreground_shift_index():
    z, other = torch.randn(5, 8) * 4, torch.randn(5, 8) * 4
    assert foreground_shift(z, z, 1.0).abs().max() < 1e-6
    shift = foreground_shift(z, other, 2.0)
    assert (shift >= 0).all() and torch.allclose(shift.double(), ref.kl(z, other, 2.0), atol=1e-5)


# 16 ─ smoke training: L_total goes down; r moves toward r*
def test_loss_decreases_and_trust_learns_the_reliable_view():
    torch.manual_seed(0)
    n, c = 48, 5
    y = torch.randint(0, c, (n,))
    informative = F.one_hot(y, c).float() * 6 + torch.randn(n, c)
    fg_reliable = torch.rand(n) < 0.5
    # where the foreground view is reliable it is peaked on the label and the full view is noise; else the reverse
    z_fg = torch.where(fg_reliable[:, None], informative, torch.randn(n, c))
    z_full = torch.where(fg_reliable[:, None], torch.randn(n, c), informative)
    f, text = unit(n, D), unit(c, D)
    plugin = make_plugin(logit_scale=20.0)
    opt = torch.optim.Adam(plugin.parameters(), lr=3e-2)
    area = torch.full((n,), 0.3)
    args = (plugin, f, text, z_full, z_fg, z_full, area, torch.ones(n), y)
    r_star = (ref.ce(z_fg, y) < ref.ce(z_full, y)).float()
    first = objective(*args)
    gap0 = (torch.sigmoid(plugin.trust_logit(z_full, z_fg, area)) - r_star).abs().mean()
    for _ in range(30):
        loss = objective(*args)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = objective(*args)
    gap = (torch.sigmoid(plugin.trust_logit(z_full, z_fg, area)) - r_star).abs().mean()
    assert last["loss"] < first["loss"] * 0.9
    assert gap < gap0 and gap < 0.25


def test_unusable_masks_get_zero_trust():
    plugin, n = make_plugin(), 6
    z = torch.randn(n, 4)
    area = torch.tensor([0.5, 0.5, 0.01, 0.99, 0.5, 0.5])
    has_mask = torch.tensor([1.0, 0, 1, 1, 1, 1])
    out = objective(plugin, unit(n, D), unit(4, D), z, z + 1, z, area, has_mask, torch.zeros(n, dtype=torch.long))
    usable = torch.tensor([True, False, False, False, True, True])
    r = torch.sigmoid(plugin.trust_logit(z, z + 1, area))
    assert torch.allclose(out["r"], torch.where(usable, r, torch.zeros_like(r)).mean())


# 17 ─ HM and the average row
def test_harmonic_mean_and_average_row():
    assert round(harmonic_mean(82.40, 73.62), 2) == 77.76
    assert accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) is None  # nothing to score: None, not NaN
    assert accuracy(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]]), torch.tensor([1, 2])) == 50.0
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(50.0, 0.0) == 0.0 and harmonic_mean(40.0, 40.0) == 40.0
    base, new, hm = average_row([(90.0, 60.0), (74.8, 87.24)])
    assert (base, new) == pytest.approx((82.40, 73.62)) and round(hm, 2) == 77.76
    assert hm != pytest.approx((harmonic_mean(90, 60) + harmonic_mean(74.8, 87.24)) / 2)
    # a column some run cannot score has no mean (None), and the other column still averages over every run
    assert average_row([(90.0, None), (70.0, None), (50.0, None)]) == (70.0, None, None)
    assert average_row([(None, 50.0), (80.0, 70.0), (60.0, 60.0)]) == (None, 60.0, None)
