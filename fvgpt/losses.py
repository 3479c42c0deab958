"""The training objectives: stage 1 (CoOp cross-entropy, KgCoOp's regulariser, PromptSRC's and MMRL's objectives) and
stage 2 (docs/method.md E3, E4, E7, E8, E12, E14). They take logits computed by the model object (fvgpt.model) and
weights from the TrainConfig."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .stats import kl_div

if TYPE_CHECKING:
    from .model import Heads
    from .plugin import FVGPTPlugin


def kgcoop_regulariser(learned: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """KgCoOp: 1 − mean cosine between the learned-prompt and the hand-crafted text features of each class."""
    return 1.0 - F.cosine_similarity(learned, zero_shot, dim=-1).mean()


def promptsrc_objective(z: torch.Tensor, z_clip: torch.Tensor, text: torch.Tensor, text_clip: torch.Tensor,
                        image: torch.Tensor, image_clip: torch.Tensor, labels: torch.Tensor, text_weight: float,
                        image_weight: float) -> dict[str, torch.Tensor]:
    """PromptSRC: CE(z, y) + L_SCL, the self-regulation toward frozen CLIP on the same images (its trainers/
    promptsrc.py): text_weight·mean|G − G_CLIP| + image_weight·mean|f − f_CLIP| (L1 over elements, unit-norm
    features) + Σ p_CLIP·(log p_CLIP − log p) / (B·C), i.e. KL(p_CLIP ‖ p) summed and divided by the logits' size,
    at temperature 1. z: the prompted model's logits; z_clip: CLIP's on the regulariser's text features."""
    ce = F.cross_entropy(z, labels)
    scl_text = F.l1_loss(text, text_clip)
    scl_image = F.l1_loss(image, image_clip)
    scl_logits = F.kl_div(F.log_softmax(z, dim=-1), F.log_softmax(z_clip, dim=-1), reduction="sum",
                          log_target=True) / z.numel()
    loss = ce + text_weight * scl_text + image_weight * scl_image + scl_logits
    return {"loss": loss, "ce": ce.detach(), "scl_text": scl_text.detach(), "scl_image": scl_image.detach(),
            "scl_logits": scl_logits.detach()}


def mmrl_objective(z_class: torch.Tensor, z_rep: torch.Tensor, image: torch.Tensor, image_clip: torch.Tensor,
                   text: torch.Tensor, text_clip: torch.Tensor, labels: torch.Tensor, alpha: float,
                   reg_weight: float) -> dict[str, torch.Tensor]:
    """MMRL: α·CE(z_c, y) + (1 − α)·CE(z_r, y) + λ·(1 − mean cos(f_c, f_CLIP)) + λ·(1 − mean cos(g, g_CLIP)) (its
    MMRL_Loss); no regulariser on the representation features."""
    ce_class, ce_rep = F.cross_entropy(z_class, labels), F.cross_entropy(z_rep, labels)
    reg_image = 1 - F.cosine_similarity(image, image_clip, dim=-1).mean()
    reg_text = 1 - F.cosine_similarity(text, text_clip, dim=-1).mean()
    loss = alpha * ce_class + (1 - alpha) * ce_rep + reg_weight * reg_image + reg_weight * reg_text
    return {"loss": loss, "ce_class": ce_class.detach(), "ce_rep": ce_rep.detach(), "reg_image": reg_image.detach(),
            "reg_text": reg_text.detach()}


def trust_target(z_full: torch.Tensor, z_fg: torch.Tensor, labels: torch.Tensor, delta: float) -> torch.Tensor:
    """E3: r* = 1[CE(z_fg, y) + δ < CE(z_full, y)] on raw logits, per sample, without gradient."""
    with torch.no_grad():
        ce_fg = F.cross_entropy(z_fg.float(), labels, reduction="none")
        ce_full = F.cross_entropy(z_full.float(), labels, reduction="none")
        return (ce_fg + delta < ce_full).float()


def distillation_loss(z_fdc: torch.Tensor, z_full: torch.Tensor, z_fg: torch.Tensor, r: torch.Tensor,
                      tau: float) -> torch.Tensor:
    """E7: mean_i [ r_i·KL(p_fg ‖ p_FDC) + (1 − r_i)·KL(p_full ‖ p_FDC) ], with r detached (the gate trains only
    through E4; otherwise it could lower L_dist by choosing whichever teacher is closer)."""
    r = r.detach()
    return (r * kl_div(z_fg, z_fdc, tau) + (1 - r) * kl_div(z_full, z_fdc, tau)).mean()


def prior_calibration_loss(z_pc: torch.Tensor, z_clip: torch.Tensor, labels: torch.Tensor, tau: float,
                           use_kl: bool) -> torch.Tensor:
    """E12: CE(z_PC, y) + KL(p_CLIP ‖ softmax(z_PC/τ)) (the KL term optional)."""
    loss = F.cross_entropy(z_pc, labels)
    return loss + kl_div(z_clip, z_pc, tau).mean() if use_kl else loss


def plugin_objective(plugin: FVGPTPlugin, heads: Heads, z_fg: torch.Tensor, area: torch.Tensor,
                     has_mask: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """E14: L_total = L_base + λ_new·L_PC for one batch; `heads` on the full image, `z_fg` the backbone's logits
    on the foreground view.

    Samples without a usable foreground view (no mask, or area outside [area_min, area_max]) get r := 0, so they
    distil only toward p_full, and are left out of the FRG's BCE. The switches (ablations) drop a branch's terms:
    cfg.fdc the whole L_base (r := 0), cfg.frg only L_FRG (r := 1 on usable views), cfg.prior_calibration L_PC.
    """
    usable = has_mask.bool() & (area >= cfg.area_min) & (area <= cfg.area_max)
    r_star = trust_target(heads.z_full, z_fg, labels, cfg.delta)
    zero = torch.zeros((), device=labels.device)
    if not cfg.fdc:  # ablation: no base branch (no adapters, no gate): the base head is z_full, nothing to train
        r, l_frg, l_dist, l_base = torch.zeros_like(r_star), zero, zero, zero
    else:
        if cfg.frg:
            r_logit = plugin.trust_logit(heads.z_full, z_fg, area)
            r = torch.where(usable, torch.sigmoid(r_logit), torch.zeros_like(r_logit))
            # E4 over usable samples only; a batch without any keeps the graph connected with a zero term
            l_frg = (F.binary_cross_entropy_with_logits(r_logit[usable], r_star[usable]) if usable.any()
                     else r_logit.sum() * 0.0)
        else:  # ablation: no gate, every usable foreground view is the teacher
            r, l_frg = usable.float(), zero
        l_dist = distillation_loss(heads.z_fdc, heads.z_full, z_fg, r, cfg.tau)
        l_base = F.cross_entropy(heads.z_fdc, labels) + cfg.lambda_rg * l_frg + cfg.lambda_d * l_dist  # E8
    l_pc = (prior_calibration_loss(heads.z_pc, heads.z_clip, labels, cfg.tau, cfg.pc_kl) if cfg.prior_calibration
            else zero)  # ablation: no new branch (new classes go through the adapters), nothing to train
    total = l_base + cfg.lambda_new * l_pc
    return {"loss": total, "base": l_base.detach(), "frg": l_frg.detach(), "dist": l_dist.detach(),
            "pc": l_pc.detach(), "r": r.detach().mean(), "r_star": r_star.mean(), "b": heads.b.detach().mean()}
