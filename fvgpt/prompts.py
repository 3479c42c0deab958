"""Stage 1's trainable part: the learned context of CoOp (n_ctx vectors shared by all classes, class token at the
end), optionally initialised from words (KgCoOp: "a photo of a"). The text tower splices it in (backbone.TextEncoder);
the prompt text around it comes from fvgpt.labels."""
from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone


class PromptLearner(nn.Module):
    def __init__(self, ctx: torch.Tensor):
        super().__init__()
        self.ctx = nn.Parameter(ctx.detach().float().clone())

    @classmethod
    def initial(cls, backbone: Backbone, n_ctx: int, init: str | None = None, std: float = 0.02) -> PromptLearner:
        """CoOp's start: N(0, 0.02²) vectors, or the token embeddings of `init` (which must be n_ctx tokens)."""
        if not init:
            width = backbone.text.token_embedding.weight.shape[1]
            return cls(torch.randn(n_ctx, width, device=backbone.device) * std)
        ids = backbone.tokenize([init])[0]
        n_tokens = int((ids > 0).sum()) - 2  # minus SOT / EOT
        if n_tokens != n_ctx:
            raise ValueError(f"context init {init!r} is {n_tokens} tokens, but n_ctx = {n_ctx}")
        with torch.no_grad():
            return cls(backbone.text.token_embedding(ids[1:1 + n_ctx]))
