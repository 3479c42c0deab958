"""FVG-PT training objective (method.md E3, E4, E7, E8, E12, E14) and the D_fg metric (E13)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .plugin import TAU, FVGPTPlugin


def kl_div(p_teacher_logits: torch.Tensor, q_student_logits: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Per-sample KL(softmax(t/τ) ‖ softmax(s/τ)), summed over classes, no τ² factor (method.md §10 #7)."""
    log_p = F.log_softmax(p_teacher_logits.float() / tau, dim=-1)
    log_q = F.log_softmax(q_student_logits.float() / tau, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def trust_target(z_full: torch.Tensor, z_fg: torch.Tensor, labels: torch.Tensor, delta: float = 0.0) -> torch.Tensor:
    """E3: r* = 1[CE(z_fg, y) + δ < CE(z_full, y)] on raw logits, per sample, without gradient."""
    with torch.no_grad():
        ce_fg = F.cross_entropy(z_fg.float(), labels, reduction="none")
        ce_full = F.cross_entropy(z_full.float(), labels, reduction="none")
        return (ce_fg + delta < ce_full).float()


def distillation_loss(z_fdc: torch.Tensor, z_full: torch.Tensor, z_fg: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """E7: mean_i [ r_i·KL(p_fg ‖ p_FDC) + (1 − r_i)·KL(p_full ‖ p_FDC) ], r detached (method.md §10 #8)."""
    r = r.detach()
    return (r * kl_div(z_fg, z_fdc) + (1 - r) * kl_div(z_full, z_fdc)).mean()


@dataclass(frozen=True)
class LossWeights:
    lambda_d: float = 10.0  # RDBOOST_LAMBDA_D (--lambda_base)
    lambda_rg: float = 1.0  # RDBOOST_LAMBDA_RG
    lambda_new: float = 1.0  # BDPC_LAMBDA (--lambda_new)
    use_pc_kl: bool = True  # BDPC_USE_KL
    delta: float = 0.0  # RDBOOST_DELTA
    area_min: float = 0.02  # RDBOOST_AREA_MIN
    area_max: float = 0.98  # RDBOOST_AREA_MAX


def fvgpt_loss(plugin: FVGPTPlugin, f: torch.Tensor, text_tuned: torch.Tensor, z_full: torch.Tensor,
               z_fg: torch.Tensor, z_clip: torch.Tensor, area: torch.Tensor, has_mask: torch.Tensor,
               labels: torch.Tensor, w: LossWeights) -> dict[str, torch.Tensor]:
    """E14: L_total = L_base + λ_new·L_PC for one batch of frozen-backbone outputs.

    Samples without a usable foreground view (no mask, or area outside [area_min, area_max]) get r := 0 — they
    distil only toward p_full — and are left out of the FRG's BCE (method.md §10 #3).
    """
    usable = has_mask.bool() & (area >= w.area_min) & (area <= w.area_max)
    r_logit = plugin.trust_logit(z_full, z_fg, area)
    r = torch.where(usable, torch.sigmoid(r_logit), torch.zeros_like(r_logit))
    r_star = trust_target(z_full, z_fg, labels, w.delta)
    if usable.any():  # E4, over usable samples only
        l_frg = F.binary_cross_entropy_with_logits(r_logit[usable], r_star[usable])
    else:
        l_frg = r_logit.sum() * 0.0
    z_fdc = plugin.base_logits(f, plugin.adapt_text(text_tuned))
    l_dist = distillation_loss(z_fdc, z_full, z_fg, r)
    l_base = F.cross_entropy(z_fdc, labels) + w.lambda_rg * l_frg + w.lambda_d * l_dist  # E8
    z_pc, b = plugin.calibrate(z_full, z_clip)
    l_pc = F.cross_entropy(z_pc, labels)  # E12
    if w.use_pc_kl:
        l_pc = l_pc + kl_div(z_clip, z_pc).mean()
    total = l_base + w.lambda_new * l_pc
    return {"loss": total, "base": l_base.detach(), "frg": l_frg.detach(), "dist": l_dist.detach(),
            "pc": l_pc.detach(), "r": r.detach().mean(), "r_star": r_star.mean(), "b": b.detach().mean()}


def foreground_shift(z_full: torch.Tensor, z_fg: torch.Tensor, tau: float) -> torch.Tensor:
    """E13: D_fg = KL(p_full ‖ p_fg) per sample (p = softmax(z/τ)); 0 when the two views agree."""
    return kl_div(z_full, z_fg, tau)


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN/(B+N); the paper's average row is the HM of the averaged Base and New (method.md §9.1)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def average_row(rows: list[tuple[float, float]]) -> tuple[float, float, float]:
    """The paper's "Average" row over datasets or seeds: mean Base, mean New, and the HM of those means."""
    base = sum(b for b, _ in rows) / len(rows)
    new = sum(n for _, n in rows) / len(rows)
    return base, new, harmonic_mean(base, new)
