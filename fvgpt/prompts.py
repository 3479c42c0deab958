"""Stage 1's trainable part for CoOp and KgCoOp: the learned context (n_ctx vectors shared by all classes, class token
at the end), optionally initialised from words (KgCoOp: "a photo of a"). The text tower splices it in
(backbone.TextEncoder); the prompt text around it comes from fvgpt.labels. The image tower stays CLIP's own.

Every stage-1 learner (this one, fvgpt.promptsrc.PromptSRC, fvgpt.mmrl.MMRL) offers the same small interface to the
model object (fvgpt.model.FVGPTModel):

    own_tower             whether its image features come from a tower of its own
    fusion                base / new head → weights of the learner's image features in its logits (MMRL: 2 kinds)
    logit_scale           the scale of its logits; None: the backbone's s
    template              the learned prompt's text around the class name
    encode_text(encoder, token_ids)        its text features (grads reach its parameters)
    image_features(visual, pixels)         (own tower only) [CLIP's features, its own] stacked (B, 1 + K, D)
    tuned_image(visual, pixels)            (own tower only) its own features (B, K, D)
    teacher(model, labels)                 the text features its regulariser pulls toward (None: no regulariser)
    objective(model, pixels, learned, targets, teacher)   the stage-1 loss terms {"loss", ...}
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, TextEncoder
from .labels import learned_template
from .losses import kgcoop_regulariser

if TYPE_CHECKING:
    from .config import TrainConfig
    from .model import FVGPTModel

ONE_KIND = {"base": (1.0,), "new": (1.0,)}  # one image feature per image, the same logits for base and new


def initial_context(backbone: Backbone, n_ctx: int, init: str | None, std: float = 0.02) -> torch.Tensor:
    """CoOp's start: N(0, 0.02²) vectors, or the token embeddings of `init` (which must be n_ctx tokens)."""
    if not init:
        width = backbone.text.token_embedding.weight.shape[1]
        return torch.randn(n_ctx, width, device=backbone.device) * std
    ids = backbone.tokenize([init])[0]
    n_tokens = int((ids > 0).sum()) - 2  # minus SOT / EOT
    if n_tokens != n_ctx:
        raise ValueError(f"context init {init!r} is {n_tokens} tokens, but n_ctx = {n_ctx}")
    with torch.no_grad():
        return backbone.text.token_embedding(ids[1:1 + n_ctx]).clone()


class PromptLearner(nn.Module):
    own_tower = False
    fusion = ONE_KIND
    logit_scale = None  # the backbone's s

    def __init__(self, ctx: torch.Tensor):
        super().__init__()
        self.ctx = nn.Parameter(ctx.detach().float().clone())

    @classmethod
    def initial(cls, backbone: Backbone, n_ctx: int, init: str | None = None) -> PromptLearner:
        """CoOp's start: N(0, 0.02²) vectors, or the token embeddings of `init` (which must be n_ctx tokens)."""
        return cls(initial_context(backbone, n_ctx, init))

    @classmethod
    def for_config(cls, backbone: Backbone, cfg: TrainConfig) -> PromptLearner:
        return cls.initial(backbone, cfg.n_ctx, cfg.ctx_init)

    @classmethod
    def from_state(cls, backbone: Backbone, cfg: TrainConfig, tensors: dict[str, torch.Tensor]) -> PromptLearner:
        return cls(tensors["ctx"].to(backbone.device))

    @property
    def template(self) -> str:
        return learned_template(self.ctx.shape[0])

    def encode_text(self, encoder: TextEncoder, token_ids: torch.Tensor) -> torch.Tensor:
        return encoder(token_ids, self.ctx)

    def teacher(self, model: FVGPTModel, labels: list[str]) -> torch.Tensor | None:
        """KgCoOp pulls the learned text features toward the zero-shot template's; CoOp has no regulariser."""
        return model.tables(labels).clip if model.cfg.method == "kgcoop" else None

    def objective(self, model: FVGPTModel, pixels: torch.Tensor, learned: torch.Tensor, targets: torch.Tensor,
                  teacher: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """CE of z_full over the labels, plus KgCoOp's regulariser (weight cfg.kg_weight) against `teacher`."""
        ce = F.cross_entropy(model.logits(model.encode_image(pixels), learned), targets)
        if teacher is None:
            return {"loss": ce, "ce": ce.detach()}
        kg = kgcoop_regulariser(learned, teacher)
        return {"loss": ce + model.cfg.kg_weight * kg, "ce": ce.detach(), "kg": kg.detach()}
