"""The FVG-PT plugin (method.md §4–§6): FRG, FDC adapters, Prior Calibration with the BRG.

Each unit names the equation it implements. All statistics and gates run in fp32 (`.float()`), whatever the
precision of the features that reach them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TAU = 2.0  # τ_d = τ_PC = τ_KL (train.py: "All RDBOOST_TAU_XXX is suggested to be the same")


def softmax_stats(logits: torch.Tensor, tau: float = TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, H(p)) for p = softmax(z/τ); the entropy goes through log-softmax so peaked logits stay finite (§11 #14)."""
    log_p = F.log_softmax(logits.float() / tau, dim=-1)
    p = log_p.exp()
    return p, -(p * log_p).sum(-1)


def prob_cosine(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(p, q, dim=-1, eps=1e-12)


class ReliabilityGate(nn.Module):
    """E2 / E10: σ(MLP(u)), MLP = Linear(3→hidden) → ReLU → Linear(hidden→1). Returns the pre-sigmoid logit."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return self.mlp(stats.float()).squeeze(-1)


class ResidualAdapter(nn.Module):
    """E5: L2Norm(x + MLP(x)), MLP = Linear(D→h) → ReLU → Linear(h→D).

    The last layer starts at std `init_scale` with zero bias, so the adapter starts near identity
    (RDBOOST_FDC_INIT_SCALE = 1e-3) without an extra parameter: z_FDC ≈ z_full at initialisation.
    """

    def __init__(self, dim: int, bottleneck: int = 64, init_scale: float = 1e-3):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, bottleneck), nn.ReLU(), nn.Linear(bottleneck, dim))
        nn.init.normal_(self.mlp[2].weight, std=init_scale)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.mlp(x), dim=-1)


def frg_inputs(z_full: torch.Tensor, z_fg: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """E1: u = [H(p_full) − H(p_fg), cos(p_full, p_fg), A(x_fg)]."""
    p_full, h_full = softmax_stats(z_full)
    p_fg, h_fg = softmax_stats(z_fg)
    return torch.stack([h_full - h_fg, prob_cosine(p_full, p_fg), area.float()], dim=-1)


def brg_inputs(z_full: torch.Tensor, z_clip: torch.Tensor) -> torch.Tensor:
    """E9: s = [H(p_full), H(p_CLIP), cos(p_full, p_CLIP)]."""
    p_full, h_full = softmax_stats(z_full)
    p_clip, h_clip = softmax_stats(z_clip)
    return torch.stack([h_full, h_clip, prob_cosine(p_full, p_clip)], dim=-1)


class FVGPTPlugin(nn.Module):
    """The 132,546 trainable parameters of stage 2 (for D = 512): MLP_v, MLP_t, MLP_FRG, MLP_BRG."""

    def __init__(self, dim: int, bottleneck: int = 64, gate_hidden: int = 32, init_scale: float = 1e-3,
                 logit_scale: float = 100.0):
        super().__init__()
        self.image_adapter = ResidualAdapter(dim, bottleneck, init_scale)  # MLP_v
        self.text_adapter = ResidualAdapter(dim, bottleneck, init_scale)  # MLP_t
        self.frg = ReliabilityGate(gate_hidden)
        self.brg = ReliabilityGate(gate_hidden)
        self.logit_scale = logit_scale  # S in E6

    def trust_logit(self, z_full: torch.Tensor, z_fg: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
        """E1–E2 before the sigmoid: r = σ(trust_logit). Training only (needs the foreground view)."""
        return self.frg(frg_inputs(z_full, z_fg, area))

    def adapt_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """G̃ = L2Norm(g + MLP_t(g)); input-independent, so precomputed for serving."""
        return self.text_adapter(text_features)

    def base_logits(self, image_features: torch.Tensor, adapted_text: torch.Tensor) -> torch.Tensor:
        """E6: z_FDC = S · L2Norm(f + MLP_v(f)) · G̃ᵀ (full image only)."""
        return self.logit_scale * self.image_adapter(image_features) @ adapted_text.t()

    def calibrate(self, z_full: torch.Tensor, z_clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E10–E11: b = σ(MLP_BRG(s)); z_PC = (1 − b)·z_full + b·z_CLIP, blended in fp32. Returns (z_PC, b)."""
        b = torch.sigmoid(self.brg(brg_inputs(z_full, z_clip)))
        z_pc = (1 - b).unsqueeze(-1) * z_full.float() + b.unsqueeze(-1) * z_clip.float()
        return z_pc, b


def trainable_parameter_count(dim: int, bottleneck: int = 64, gate_hidden: int = 32) -> int:
    """Closed form from method.md §11 #9: 2·(2Dh + h + D) + 2·(3g + g + g + 1)."""
    return 2 * (2 * dim * bottleneck + bottleneck + dim) + 2 * (3 * gate_hidden + gate_hidden + gate_hidden + 1)
