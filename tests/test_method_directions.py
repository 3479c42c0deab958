"""Every KL and cross-entropy of the method checked in its direction (docs/method.md E3, E4, E7, E8, E12, E13,
KgCoOp's regulariser, PromptSRC's and MMRL's stage-1 objectives), on asymmetric distributions where the reversed
direction gives another number, against the plain formulas of tests/method_reference.py. Each test first asserts
that the inputs do tell the directions apart."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import method_reference as ref
from fvgpt.config import TrainConfig
from fvgpt.losses import (distillation_loss, kgcoop_regulariser, mmrl_objective, plugin_objective,
                          prior_calibration_loss, promptsrc_objective, trust_target)
from fvgpt.metrics import foreground_shift
from fvgpt.model import Heads
from fvgpt.plugin import FVGPTPlugin
from fvgpt.stats import kl_div, prob_cosine, softmax_stats

N, C = 6, 5


def logits(seed: int, scale: float = 4.0, n: int = N) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed)) * scale


def assert_direction(actual: torch.Tensor, forward: torch.Tensor, reverse: torch.Tensor) -> None:
    """`actual` equals the stated direction and the inputs make the reverse direction a different number."""
    assert not torch.allclose(forward, reverse, rtol=1e-2), "inputs too symmetric to tell the directions apart"
    assert torch.allclose(actual.double(), forward, rtol=1e-5, atol=1e-6), (actual, forward, reverse)


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_kl_div_is_teacher_to_student(tau):
    teacher, student = logits(0), logits(1)
    actual = kl_div(teacher, student, tau)
    assert actual.dtype == torch.float32 and actual.shape == (N,)
    assert_direction(actual, ref.kl(teacher, student, tau), ref.kl(student, teacher, tau))
    assert kl_div(teacher.half(), student.half(), tau).dtype == torch.float32  # statistics stay fp32


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_softmax_statistics(tau):
    z, w = logits(2), logits(3)
    p, h = softmax_stats(z, tau)
    assert torch.allclose(p.double(), ref.probs(z, tau), atol=1e-6)
    assert torch.allclose(h.double(), ref.entropy(z, tau), atol=1e-5)
    assert torch.allclose(prob_cosine(p, softmax_stats(w, tau)[0]).double(), ref.prob_cos(z, w, tau), atol=1e-6)


def test_trust_target_direction_and_margin():
    """E3: r* = 1[CE(z_fg, y) + δ < CE(z_full, y)]: swapping the views, moving δ or making the comparison
    non-strict changes r*."""
    z_full, z_fg, y = logits(4, n=200), logits(5, n=200), torch.arange(200) % C
    ce_full, ce_fg = ref.ce(z_full, y), ref.ce(z_fg, y)
    for delta in (0.0, 0.5, -0.5):
        want = (ce_fg + delta < ce_full).float()
        assert not torch.equal(want, (ce_full + delta < ce_fg).float())
        assert torch.equal(trust_target(z_full, z_fg, y, delta), want)
    assert not torch.equal((ce_fg + 0.5 < ce_full).float(), (ce_fg < ce_full + 0.5).float())
    assert not trust_target(z_full, z_full, y, 0.0).any()  # a tie is not "the foreground is better"
    assert trust_target(z_full, z_full, y, -1e-3).all()


@pytest.mark.parametrize("r", [torch.zeros(N), torch.ones(N), torch.linspace(0.1, 0.9, N)])
def test_distillation_directions(r):
    """E7: KL(p_fg ‖ p_FDC) weighted by r, KL(p_full ‖ p_FDC) by 1 − r; the FDC head is the student."""
    z_fdc, z_full, z_fg = logits(6), logits(7), logits(8)
    forward = (r * ref.kl(z_fg, z_fdc, 2.0) + (1 - r) * ref.kl(z_full, z_fdc, 2.0)).mean()
    reverse = (r * ref.kl(z_fdc, z_fg, 2.0) + (1 - r) * ref.kl(z_fdc, z_full, 2.0)).mean()
    assert_direction(distillation_loss(z_fdc, z_full, z_fg, r, 2.0), forward, reverse)
    swapped = ((1 - r) * ref.kl(z_fg, z_fdc, 2.0) + r * ref.kl(z_full, z_fdc, 2.0)).mean()  # teachers swapped
    assert not torch.allclose(forward, swapped, rtol=1e-2)


def test_distillation_does_not_train_the_gate():
    r = torch.full((N,), 0.3, requires_grad=True)
    z_fdc = logits(9).requires_grad_(True)
    distillation_loss(z_fdc, logits(10), logits(11), r, 2.0).backward()
    assert r.grad is None and z_fdc.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_prior_calibration_loss_direction(tau):
    """E12: CE(z_PC, y) on raw logits + KL(p_CLIP ‖ softmax(z_PC/τ)): zero-shot CLIP is the teacher."""
    z_pc, z_clip, y = logits(12), logits(13), torch.tensor([0, 1, 2, 3, 4, 0])
    ce = ref.ce(z_pc, y).mean()
    forward, reverse = ce + ref.kl(z_clip, z_pc, tau).mean(), ce + ref.kl(z_pc, z_clip, tau).mean()
    assert_direction(prior_calibration_loss(z_pc, z_clip, y, tau, True), forward, reverse)
    without_kl = prior_calibration_loss(z_pc, z_clip, y, tau, False)
    assert torch.allclose(without_kl.double(), ce, atol=1e-6)
    if tau != 1:  # the cross-entropy is on raw logits, never on z_PC/τ
        assert_direction(without_kl, ce, ref.ce(z_pc / tau, y).mean())


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_foreground_shift_direction(tau):
    """E13: D_fg = KL(p_full ‖ p_fg): the full view is the reference distribution."""
    z_full, z_fg = logits(14), logits(15)
    assert_direction(foreground_shift(z_full, z_fg, tau), ref.kl(z_full, z_fg, tau), ref.kl(z_fg, z_full, tau))


def test_kgcoop_regulariser():
    """1 − mean over classes of cos(T_c, T_CLIP,c): per class, then averaged (symmetric, so no direction)."""
    g = torch.Generator().manual_seed(16)
    learned, zero_shot = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g) + 0.5
    want = 1 - (ref.l2(learned.double()) * ref.l2(zero_shot.double())).sum(-1).mean()
    of_means = 1 - F.cosine_similarity(learned.mean(0), zero_shot.mean(0), dim=0)
    assert not torch.allclose(want, of_means.double(), rtol=1e-2)
    assert torch.allclose(kgcoop_regulariser(learned, zero_shot).double(), want, atol=1e-6)
    stacked = kgcoop_regulariser(learned.view(1, 5, 8).expand(2, 5, 8), zero_shot.view(1, 5, 8).expand(2, 5, 8))
    assert torch.allclose(stacked.double(), want, atol=1e-6)  # the cosine is over the feature axis, the last


def _unit_rows(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 8, generator=g) + shift, dim=-1)


@pytest.mark.parametrize("weights", [(25.0, 10.0), (3.0, 0.5)])
def test_promptsrc_objective_directions(weights):
    """PromptSRC: the logit self-regulation is KL(p_CLIP ‖ p) at τ = 1 summed and divided by B·C (its F.kl_div with
    the prompted model's log-probabilities as input), not the reverse KL, not a batch mean; the L1 terms are element
    means, each with its own weight; CE on the prompted logits."""
    z, z_clip, y = logits(20), logits(21), torch.arange(N) % C
    text, text_clip = _unit_rows(C, 22), _unit_rows(C, 23, 0.4)
    image, image_clip = _unit_rows(N, 24), _unit_rows(N, 25, 0.2)
    out = promptsrc_objective(z, z_clip, text, text_clip, image, image_clip, y, *weights)
    want = ref.promptsrc_loss(z, z_clip, text, text_clip, image, image_clip, y, *weights)
    n = z.numel()
    assert_direction(out["scl_logits"], ref.kl(z_clip, z, 1.0).sum() / n, ref.kl(z, z_clip, 1.0).sum() / n)
    assert not torch.allclose(want["scl_logits"], ref.kl(z_clip, z, 1.0).mean(), rtol=1e-2)  # / B·C, not / B
    assert_direction(out["ce"], ref.ce(z, y).mean(), ref.ce(z_clip, y).mean())
    for key in ("loss", "ce", "scl_text", "scl_image", "scl_logits"):
        assert torch.allclose(out[key].double(), want[key], rtol=1e-5, atol=1e-6), key
    assert not torch.allclose(want["scl_text"], want["scl_image"], rtol=1e-2)  # weights swapped would show


@pytest.mark.parametrize("alpha, reg", [(0.7, 1.0), (0.2, 3.0)])
def test_mmrl_objective_directions(alpha, reg):
    """MMRL: α·CE on the class-token logits and (1 − α)·CE on the representation logits (not swapped), λ times one
    minus the mean per-row cosine of the class feature to CLIP's and of each class's text to CLIP's."""
    z_c, z_r, y = logits(30), logits(31, 8.0), torch.arange(N) % C
    image, image_clip = _unit_rows(N, 32), _unit_rows(N, 33, 0.3)
    text, text_clip = _unit_rows(C, 34), _unit_rows(C, 35, 0.6)
    out = mmrl_objective(z_c, z_r, image, image_clip, text, text_clip, y, alpha, reg)
    want = ref.mmrl_loss(z_c, z_r, image, image_clip, text, text_clip, y, alpha, reg)
    assert_direction(out["loss"], want["loss"], ref.mmrl_loss(z_r, z_c, image, image_clip, text, text_clip, y, alpha,
                                                              reg)["loss"])
    for key in ("loss", "ce_class", "ce_rep", "reg_image", "reg_text"):
        assert torch.allclose(out[key].double(), want[key], rtol=1e-5, atol=1e-6), key
    assert not torch.allclose(want["reg_image"], 1 - ref.cos_rows(image.mean(0), image_clip.mean(0)), rtol=1e-2)


def _objective_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    z = {k: torch.randn(8, C, generator=g) * 4 for k in ("z_full", "z_fg", "z_clip", "z_fdc")}
    b = torch.rand(8, generator=g)
    z["z_pc"] = (1 - b)[:, None] * z["z_full"] + b[:, None] * z["z_clip"]
    area = torch.tensor([0.3, 0.5, 0.7, 0.02, 0.98, 0.01, 0.99, 0.4])  # the bounds themselves are usable
    has_mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0])
    return z, b, area, has_mask, torch.arange(8) % C


@pytest.mark.parametrize("overrides", [
    {},
    {"tau": 3.0, "lambda_d": 3.0, "lambda_rg": 0.5, "lambda_new": 2.0, "delta": 0.25, "pc_kl": False},
    {"area_min": 0.35, "area_max": 0.6, "tau": 1.0},
    {"fdc": False, "lambda_new": 2.0},
    {"frg": False, "prior_calibration": False, "lambda_d": 3.0},
])
def test_every_term_of_the_objective(overrides):
    """E4, E7, E8, E12, E14 from given logits: every reported term equals the plain formula with the config's
    values (τ, λs, δ, the usable-area bounds), and the FRG's BCE sees only usable samples."""
    cfg = dataclasses.replace(TrainConfig(data="unused"), **overrides)
    torch.manual_seed(0)
    plugin = FVGPTPlugin(16, 8, 32, 1e-3, 10.0, cfg.tau)
    z, b, area, has_mask, y = _objective_inputs(17)
    heads = Heads(z["z_full"], z["z_clip"], z["z_fdc"], z["z_pc"], b)
    out = plugin_objective(plugin, heads, z["z_fg"], area, has_mask, y, cfg)
    want = ref.loss_terms(plugin.state_dict(), z["z_full"], z["z_fg"], z["z_clip"], z["z_fdc"], z["z_pc"], b, area,
                          has_mask, y, **overrides)
    assert 0 < want["r_star"] < 1 and 0 < want["usable"].sum() < 8 and want["loss"] > 0
    for key in ("loss", "base", "frg", "dist", "pc", "r", "r_star", "b"):
        assert torch.allclose(out[key].double(), want[key], rtol=1e-5, atol=1e-6), key
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert out["loss"].requires_grad == (cfg.fdc and cfg.frg)  # the given heads are constants; the FRG runs here


def test_the_ablation_switches():
    """frg=False: every usable foreground view is the teacher (r = 1 there, 0 elsewhere) and L_FRG is a zero scalar;
    prior_calibration=False: L_PC is a zero scalar, so the objective is L_base alone; fdc=False: L_base, L_FRG,
    L_dist and r are zero scalars, the objective is L_PC alone and reaches only the BRG (benchmarks.method's
    ablations)."""
    torch.manual_seed(0)
    plugin = FVGPTPlugin(16, 8, 32, 1e-3, 10.0, 2.0)
    z, b, area, has_mask, y = _objective_inputs(21)
    heads = Heads(z["z_full"], z["z_clip"], z["z_fdc"], z["z_pc"], b)
    usable = (has_mask.bool() & (area >= 0.02) & (area <= 0.98)).double()
    assert 0 < usable.sum() < 8
    no_frg = plugin_objective(plugin, heads, z["z_fg"], area, has_mask, y, TrainConfig(data="unused", frg=False))
    dist = (usable * ref.kl(z["z_fg"], z["z_fdc"], 2.0) + (1 - usable) * ref.kl(z["z_full"], z["z_fdc"], 2.0)).mean()
    base = ref.ce(z["z_fdc"], y).mean() + 10.0 * dist
    pc = ref.ce(z["z_pc"], y).mean() + ref.kl(z["z_clip"], z["z_pc"], 2.0).mean()
    assert no_frg["frg"].shape == () and no_frg["frg"] == 0 and torch.allclose(no_frg["r"].double(), usable.mean())
    for key, value in (("dist", dist), ("base", base), ("pc", pc), ("loss", base + pc)):
        assert torch.allclose(no_frg[key].double(), value, rtol=1e-5, atol=1e-6), key
    full = ref.loss_terms(plugin.state_dict(), z["z_full"], z["z_fg"], z["z_clip"], z["z_fdc"], z["z_pc"], b, area,
                          has_mask, y)
    no_pc = plugin_objective(plugin, heads, z["z_fg"], area, has_mask, y,
                             TrainConfig(data="unused", prior_calibration=False))
    assert no_pc["pc"].shape == () and no_pc["pc"] == 0 and full["pc"] > 0
    for key, value in (("base", full["base"]), ("frg", full["frg"]), ("dist", full["dist"]), ("loss", full["base"])):
        assert torch.allclose(no_pc[key].double(), value, rtol=1e-5, atol=1e-6), key
    z_pc, b_gate = plugin.calibrate(z["z_full"], z["z_clip"])  # the BRG in the graph, as in a real step
    pc_only = plugin_objective(plugin, Heads(z["z_full"], z["z_clip"], z["z_full"], z_pc, b_gate), z["z_fg"], area,
                               has_mask, y, TrainConfig(data="unused", fdc=False))
    for key in ("base", "frg", "dist", "r"):
        assert pc_only[key].shape == () and pc_only[key] == 0, key
    pc = ref.ce(z_pc, y).mean() + ref.kl(z["z_clip"], z_pc, 2.0).mean()
    for key, value in (("pc", pc), ("loss", pc), ("r_star", full["r_star"])):
        assert torch.allclose(pc_only[key].double(), value, rtol=1e-5, atol=1e-6), key
    pc_only["loss"].backward()  # only the BRG trains
    assert all(p.grad is None for m in (plugin.image_adapter, plugin.text_adapter, plugin.frg) for p in m.parameters())
    assert all(p.grad is not None and p.grad.any() for p in plugin.brg.parameters())


def test_a_batch_without_usable_masks_keeps_the_gate_in_the_graph():
    cfg = TrainConfig(data="unused")
    plugin = FVGPTPlugin(16, 8, 32, 1e-3, 10.0, cfg.tau)
    z, b, area, _, y = _objective_inputs(18)
    heads = Heads(z["z_full"], z["z_clip"], z["z_fdc"], z["z_pc"], b)
    out = plugin_objective(plugin, heads, z["z_fg"], area, torch.zeros(8), y, cfg)
    assert out["frg"] == 0 and out["r"] == 0
    out["loss"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in plugin.frg.parameters())


def test_statistics_reduce_over_the_class_axis_only():
    """Extra leading axes (views, heads) are batch axes: every statistic is taken over the last axis alone."""
    z, w = logits(19, n=6).view(2, 3, C), logits(20, n=6).view(2, 3, C)
    for tau in (1.0, 2.0):
        p, h = softmax_stats(z, tau)
        assert p.shape == z.shape and torch.allclose(p.double(), ref.probs(z, tau), atol=1e-6)
        assert h.shape == (2, 3) and torch.allclose(h.double(), ref.entropy(z, tau), atol=1e-5)
        assert torch.allclose(kl_div(z, w, tau).double(), ref.kl(z, w, tau), atol=1e-5)
        assert torch.allclose(foreground_shift(z, w, tau).double(), ref.kl(z, w, tau), atol=1e-5)
        q = softmax_stats(w, tau)[0]
        assert torch.allclose(prob_cosine(p, q).double(), ref.prob_cos(z, w, tau), atol=1e-6)


def test_the_plugin_works_on_the_last_axis_in_fp32():
    """The gates, the adapters and the blend treat leading axes as batch axes, and run in fp32 whatever the input
    precision (docs/method.md: statistics and gates never in reduced precision)."""
    torch.manual_seed(1)
    plugin = FVGPTPlugin(16, 8, 32, 0.1, 10.0, 2.0)
    weights = plugin.state_dict()
    z_full, z_fg, z_clip = logits(21, n=6).view(2, 3, C), logits(22, n=6).view(2, 3, C), logits(23, n=6).view(2, 3, C)
    area = torch.rand(2, 3, dtype=torch.float64)
    u = plugin.frg_inputs(z_full.half(), z_fg.half(), area)
    assert u.dtype == torch.float32 and torch.allclose(u.double(), ref.frg_inputs(z_full.half(), z_fg.half(), area),
                                                       atol=1e-5)
    s = plugin.brg_inputs(z_full, z_clip)
    assert s.shape == (2, 3, 3) and torch.allclose(s.double(), ref.brg_inputs(z_full, z_clip), atol=1e-5)
    gate = plugin.trust_logit(z_full, z_fg, area)
    want_gate = ref.gate_logit(ref.frg_inputs(z_full, z_fg, area), weights, "frg")
    assert gate.shape == (2, 3) and torch.allclose(gate.double(), want_gate, atol=1e-5)
    assert plugin.brg(s.half()).dtype == torch.float32
    z_pc, b = plugin.calibrate(z_full.half(), z_clip.half())
    want_b = torch.sigmoid(ref.gate_logit(ref.brg_inputs(z_full.half(), z_clip.half()), weights, "brg"))
    assert z_pc.dtype == b.dtype == torch.float32 and torch.allclose(b.double(), want_b, atol=1e-5)
    want_pc = (1 - want_b)[..., None] * z_full.half().double() + want_b[..., None] * z_clip.half().double()
    assert torch.allclose(z_pc.double(), want_pc, atol=1e-4)
    f = torch.randn(2, 3, 16)
    assert torch.allclose(plugin.adapt_text(f).double(), ref.l2(f + ref.mlp(f, weights, "text_adapter")), atol=1e-6)
    assert torch.allclose(plugin.image_adapter(f).double(), ref.l2(f + ref.mlp(f, weights, "image_adapter")),
                          atol=1e-6)
