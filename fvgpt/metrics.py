"""Evaluation metrics: accuracy, the harmonic mean of Base and New, the paper's average row, and the foreground
shift index D_fg (docs/method.md E13)."""
from __future__ import annotations

import torch

from .stats import kl_div


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Top-1 accuracy in percent; None when there is no image to score (never NaN)."""
    return float((logits.argmax(-1) == labels).float().mean() * 100) if len(labels) else None


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN/(B+N)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def average_row(rows: list[tuple[float | None, float | None]]) -> tuple[float | None, float | None, float | None]:
    """The paper's "Average" row over datasets or seeds: mean Base, mean New, and the HM of those means. A column
    that some run cannot score (no test images of that split) has no mean: None, never NaN or a partial mean."""
    bases, news = [b for b, _ in rows], [n for _, n in rows]
    base = None if None in bases else sum(bases) / len(rows)
    new = None if None in news else sum(news) / len(rows)
    return base, new, None if base is None or new is None else harmonic_mean(base, new)


def foreground_shift(z_full: torch.Tensor, z_fg: torch.Tensor, tau: float) -> torch.Tensor:
    """E13: D_fg = KL(p_full ‖ p_fg) per sample, p = softmax(z/τ); 0 when both views give the same prediction."""
    return kl_div(z_full, z_fg, tau)
