"""Inference modules (method.md §8): one image pass, two heads, every text feature precomputed.

These torch modules are the reference that evaluation uses and that export traces into ONNX, so the served graph
and the evaluated model are the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, TextEncoder
from .plugin import FVGPTPlugin
from .prompts import encode_prompts


@dataclass
class TextTables:
    """Precomputed per-class text features for a label set (rows follow `labels`)."""

    labels: list[str]
    tuned: torch.Tensor  # T: learned-context features (C, D)
    clip: torch.Tensor  # T^CLIP: zero-shot template features (C, D)


@torch.no_grad()
def text_tables(backbone: Backbone, labels: list[str], ctx: torch.Tensor | None) -> TextTables:
    encoder = TextEncoder(backbone)
    clip = encode_prompts(encoder, backbone, labels, None)
    tuned = encode_prompts(encoder, backbone, labels, ctx) if ctx is not None else clip
    return TextTables(labels, tuned, clip)


class CalibratedHead(nn.Module):
    """New head for any label set: z_PC from image features and that set's two text tables (E9–E11)."""

    def __init__(self, plugin: FVGPTPlugin, logit_scale: float):
        super().__init__()
        self.plugin = plugin
        self.logit_scale = logit_scale

    def forward(self, features: torch.Tensor, tuned: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        z_full = self.logit_scale * features @ tuned.t()
        z_clip = self.logit_scale * features @ clip.t()
        return self.plugin.calibrate(z_full, z_clip)[0]


class CosineHead(nn.Module):
    """Zero-shot head for any label set: scale · f · Tᵀ."""

    def __init__(self, logit_scale: float):
        super().__init__()
        self.logit_scale = logit_scale

    def forward(self, features: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * features @ clip.t()


class FVGPTClassifier(nn.Module):
    """pixels (B,3,H,W) → (features (B,D), base logits (B,C_base), new logits (B,C)).

    base: 100·L2(f + MLP_v(f))·G̃ᵀ over the base classes (G̃ precomputed);
    new: Prior Calibration over every bundled class. For CoOp/KgCoOp the tuned model and zero-shot CLIP share the
    image tower, so f serves both z_full and z_CLIP (one ViT pass).
    """

    def __init__(self, backbone: Backbone, plugin: FVGPTPlugin, tables: TextTables, base_flags: list[bool]):
        super().__init__()
        self.visual = backbone.model.visual
        self.plugin = plugin
        self.head = CalibratedHead(plugin, backbone.logit_scale)
        base_idx = torch.tensor([i for i, b in enumerate(base_flags) if b], device=tables.tuned.device)
        with torch.no_grad():
            self.register_buffer("adapted_base", plugin.adapt_text(tables.tuned[base_idx]))
        self.register_buffer("tuned", tables.tuned.clone())
        self.register_buffer("clip", tables.clip.clone())

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = F.normalize(self.visual(pixels), dim=-1)
        return f, self.plugin.base_logits(f, self.adapted_base), self.head(f, self.tuned, self.clip)


class ZeroShotClassifier(nn.Module):
    """pixels → (features, zero-shot logits) for plain CLIP with hand-crafted prompts."""

    def __init__(self, backbone: Backbone, tables: TextTables):
        super().__init__()
        self.visual = backbone.model.visual
        self.head = CosineHead(backbone.logit_scale)
        self.register_buffer("clip", tables.clip.clone())

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.normalize(self.visual(pixels), dim=-1)
        return f, self.head(f, self.clip)
