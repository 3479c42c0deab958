"""Statistics of class-probability distributions, shared by the gates (E1, E9), the losses (E7, E12) and the
foreground-shift metric (E13). Always fp32: gates and softmax statistics never run in reduced precision."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_stats(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, H(p)) for p = softmax(z/τ), natural-log entropy through log-softmax so peaked logits stay finite."""
    log_p = F.log_softmax(logits.float() / tau, dim=-1)
    p = log_p.exp()
    return p, -(p * log_p).sum(-1)


def prob_cosine(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """cos(p, q) between two probability vectors, per sample."""
    return F.cosine_similarity(p, q, dim=-1, eps=1e-12)


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample KL(softmax(t/τ) ‖ softmax(s/τ)), summed over classes, with no τ² factor."""
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
