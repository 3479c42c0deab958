"""The FVG-PT plugin's trainable parts (docs/method.md E1–E11): FRG, FDC adapters, and the BRG of Prior Calibration.

132,546 parameters for D = 512. Each unit names the equation it implements; every statistic and gate runs in fp32,
whatever the precision of the features that reach it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .stats import prob_cosine, softmax_stats


class ReliabilityGate(nn.Module):
    """E2 / E10: σ(MLP(u)) with MLP = Linear(3→g) → ReLU → Linear(g→1). Returns the logit before the sigmoid."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return self.mlp(stats.float()).squeeze(-1)


class ResidualAdapter(nn.Module):
    """E5: L2Norm(x + MLP(x)) with MLP = Linear(D→h) → ReLU → Linear(h→D).

    The last layer starts at std `init_scale` with zero bias, so the adapter starts near the identity and
    z_FDC ≈ z_full at initialisation, without an extra parameter.
    """

    def __init__(self, dim: int, bottleneck: int, init_scale: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, bottleneck), nn.ReLU(), nn.Linear(bottleneck, dim))
        nn.init.normal_(self.mlp[2].weight, std=init_scale)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.mlp(x), dim=-1)


class FVGPTPlugin(nn.Module):
    """MLP_v and MLP_t (FDC), MLP_FRG and MLP_BRG, with the temperature τ of their statistics and the scale S of E6."""

    def __init__(self, dim: int, bottleneck: int, gate_hidden: int, init_scale: float, logit_scale: float, tau: float):
        super().__init__()
        self.image_adapter = ResidualAdapter(dim, bottleneck, init_scale)  # MLP_v
        self.text_adapter = ResidualAdapter(dim, bottleneck, init_scale)  # MLP_t
        self.frg = ReliabilityGate(gate_hidden)
        self.brg = ReliabilityGate(gate_hidden)
        self.logit_scale = logit_scale  # S
        self.tau = tau

    def frg_inputs(self, z_full: torch.Tensor, z_fg: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
        """E1: u = [H(p_full) − H(p_fg), cos(p_full, p_fg), A(x_fg)]."""
        p_full, h_full = softmax_stats(z_full, self.tau)
        p_fg, h_fg = softmax_stats(z_fg, self.tau)
        return torch.stack([h_full - h_fg, prob_cosine(p_full, p_fg), area.float()], dim=-1)

    def trust_logit(self, z_full: torch.Tensor, z_fg: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
        """E2 before the sigmoid: r = σ(trust_logit). Training only: it needs the foreground view."""
        return self.frg(self.frg_inputs(z_full, z_fg, area))

    def adapt_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """G̃ = L2Norm(g + MLP_t(g)). Input-independent, so a bundle stores it precomputed."""
        return self.text_adapter(text_features)

    def base_logits(self, image_features: torch.Tensor, adapted_text: torch.Tensor) -> torch.Tensor:
        """E6: z_FDC = S · L2Norm(f + MLP_v(f)) · G̃ᵀ, on the full image only."""
        return self.logit_scale * self.image_adapter(image_features) @ adapted_text.t()

    def brg_inputs(self, z_full: torch.Tensor, z_clip: torch.Tensor) -> torch.Tensor:
        """E9: s = [H(p_full), H(p_CLIP), cos(p_full, p_CLIP)]."""
        p_full, h_full = softmax_stats(z_full, self.tau)
        p_clip, h_clip = softmax_stats(z_clip, self.tau)
        return torch.stack([h_full, h_clip, prob_cosine(p_full, p_clip)], dim=-1)

    def calibrate(self, z_full: torch.Tensor, z_clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E10–E11: b = σ(MLP_BRG(s)); z_PC = (1 − b)·z_full + b·z_CLIP, in fp32. Returns (z_PC, b)."""
        b = torch.sigmoid(self.brg(self.brg_inputs(z_full, z_clip)))
        return (1 - b).unsqueeze(-1) * z_full.float() + b.unsqueeze(-1) * z_clip.float(), b


def trainable_parameter_count(dim: int, bottleneck: int, gate_hidden: int) -> int:
    """Closed form (docs/method.md): 2·(2Dh + h + D) + 2·(3g + g + g + 1); 132,546 for D = 512, h = 64, g = 32."""
    return 2 * (2 * dim * bottleneck + bottleneck + dim) + 2 * (3 * gate_hidden + gate_hidden + gate_hidden + 1)
