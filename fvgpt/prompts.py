"""Stage-1 prompt learners: CoOp (learned generic context, class token at the end) and KgCoOp's regulariser.

The learned prompt for class c is "X X X X <c>." whose four placeholder embeddings are replaced by the learned
context; the zero-shot prompt is the hand-crafted template "a photo of a <c>." (method.md §10 #11).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, TextEncoder

ZERO_SHOT_TEMPLATE = "a photo of a {}."


def clean_label(name: str) -> str:
    return name.replace("_", " ").strip()


def learned_template(n_ctx: int) -> str:
    """"X X X X {}.": the placeholders whose embeddings the learned context replaces (written into bundles)."""
    return " ".join(["X"] * n_ctx) + " {}."


def learned_prompts(labels: list[str], n_ctx: int) -> list[str]:
    return [learned_template(n_ctx).format(clean_label(c)) for c in labels]


def template_prompts(labels: list[str], template: str = ZERO_SHOT_TEMPLATE) -> list[str]:
    return [template.format(clean_label(c)) for c in labels]


class PromptLearner(nn.Module):
    """The only trainable part of stage 1: n_ctx context vectors shared by all classes (CoOp, CSC = False)."""

    def __init__(self, backbone: Backbone, n_ctx: int = 4, init: str | None = None, std: float = 0.02):
        super().__init__()
        width = backbone.text.token_embedding.weight.shape[1]
        if init:
            ids = backbone.tokenize([init])[0]
            n_tokens = int((ids > 0).sum()) - 2  # minus SOT / EOT
            if n_tokens != n_ctx:
                raise ValueError(f"context init {init!r} is {n_tokens} tokens, but n_ctx = {n_ctx}")
            with torch.no_grad():
                vectors = backbone.text.token_embedding(ids[1:1 + n_ctx]).clone()
        else:
            vectors = torch.randn(n_ctx, width, device=backbone.device) * std
        self.ctx = nn.Parameter(vectors.float())

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]


def encode_prompts(encoder: TextEncoder, backbone: Backbone, labels: list[str], ctx: torch.Tensor | None,
                   chunk: int = 256) -> torch.Tensor:
    """Text features for `labels` with the learned context (ctx given) or with the zero-shot template (ctx None).

    Gradients flow into ctx when it requires grad (stage 1); callers wrap in no_grad otherwise.
    """
    texts = learned_prompts(labels, ctx.shape[0]) if ctx is not None else template_prompts(labels)
    feats = [encoder(backbone.tokenize(texts[i:i + chunk]), ctx) for i in range(0, len(texts), chunk)]
    return torch.cat(feats)


def kgcoop_loss(tuned: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """KgCoOp's knowledge-guided regulariser: 1 - mean cosine between tuned and hand-crafted text features."""
    return 1.0 - F.cosine_similarity(tuned, zero_shot, dim=-1).mean()
