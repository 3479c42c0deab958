"""PromptSRC (Khattak et al., ICCV 2023) as a stage-1 learner: independent deep prompts in both CLIP towers, trained
with self-regulating losses toward frozen CLIP, and Gaussian prompt aggregation (GPA) over epochs.

Where the prompts go (the spec, shared/research/backbones.md §1.1, from PromptSRC's clip/model.py):
- text: n_ctx context vectors replace the 4 placeholder tokens after the start token (CoOp's splice, initialised from
  "a photo of a"); at the input of text blocks 1..depth−1 those positions are replaced again by that block's prompts;
- image: n_ctx_vision prompt tokens are appended after the positional embedding, before ln_pre (no positional
  embedding of their own); at the input of visual blocks 1..depth−1 the last n_ctx_vision tokens are replaced by that
  block's prompts. Block 0 never gets a deep prompt; depth = min(9, the tower's layers) unless configured.
The image tower is this classifier's own (the prompts join before block 0); CLIP's own tower, frozen, gives the
features the regulariser and Prior Calibration need.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .backbone import Backbone, TextEncoder, class_features, patch_tokens, vit
from .labels import learned_template, prompts
from .losses import promptsrc_objective
from .prompts import ONE_KIND, initial_context

if TYPE_CHECKING:
    from .config import TrainConfig
    from .model import FVGPTModel

DEPTH = 9  # PromptSRC's PROMPT_DEPTH_VISION / _TEXT for ViT-B/16 (12 layers)
PROMPT_STD = 0.02  # N(0, 0.02²) init of every prompt but the text context (PromptSRC's clip/model.py)
# The teacher text of the regulariser: the mean of these templates' CLIP text features (PromptSRC's
# trainers/imagenet_templates.py, IMAGENET_TEMPLATES: 60 of the CLIP notebook's ImageNet prompts).
TEACHER_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
)


def prompt_depth(configured: int | None, layers: int) -> int:
    """Layers that get prompts in a tower of `layers` blocks: PromptSRC's 9, at most the tower's depth (ours for
    towers under 9 blocks, spec §4)."""
    return min(configured or DEPTH, layers)


class PromptSRC(nn.Module):
    own_tower = True
    fusion = ONE_KIND
    logit_scale = None  # the backbone's s (PromptSRC's exp(logit_scale))

    def __init__(self, ctx: torch.Tensor, text_deep: torch.Tensor, vision_ctx: torch.Tensor,
                 vision_deep: torch.Tensor):
        """ctx (n_ctx, W_text); text_deep (depth_text − 1, n_ctx, W_text); vision_ctx (n_ctx_vision, W_visual);
        vision_deep (depth_visual − 1, n_ctx_vision, W_visual)."""
        super().__init__()
        self.ctx = nn.Parameter(ctx.detach().float().clone())
        self.text_deep = nn.Parameter(text_deep.detach().float().clone())
        self.vision_ctx = nn.Parameter(vision_ctx.detach().float().clone())
        self.vision_deep = nn.Parameter(vision_deep.detach().float().clone())

    @classmethod
    def for_config(cls, backbone: Backbone, cfg: TrainConfig) -> PromptSRC:
        """PromptSRC's start: the text context from cfg.ctx_init ("a photo of a"), every other prompt N(0, 0.02²)."""
        visual, dev = vit(backbone, "promptsrc"), backbone.device
        text = backbone.text
        text_width, text_layers = text.token_embedding.weight.shape[1], len(text.transformer.resblocks)
        width, layers = visual.conv1.out_channels, len(visual.transformer.resblocks)
        ctx = initial_context(backbone, cfg.n_ctx, cfg.ctx_init, PROMPT_STD)
        text_deep = torch.randn(prompt_depth(cfg.prompt_depth, text_layers) - 1, cfg.n_ctx, text_width, device=dev)
        vision_ctx = torch.randn(cfg.n_ctx_vision, width, device=dev)
        vision_deep = torch.randn(prompt_depth(cfg.prompt_depth, layers) - 1, cfg.n_ctx_vision, width, device=dev)
        return cls(ctx, text_deep * PROMPT_STD, vision_ctx * PROMPT_STD, vision_deep * PROMPT_STD)

    @classmethod
    def from_state(cls, backbone: Backbone, cfg: TrainConfig, tensors: dict[str, torch.Tensor]) -> PromptSRC:
        vit(backbone, "promptsrc")
        return cls(*(tensors[k].to(backbone.device) for k in ("ctx", "text_deep", "vision_ctx", "vision_deep")))

    @property
    def template(self) -> str:
        return learned_template(self.ctx.shape[0])

    # ---- towers ---------------------------------------------------------------------------------------------------
    def encode_text(self, encoder: TextEncoder, token_ids: torch.Tensor) -> torch.Tensor:
        return encoder(token_ids, self.ctx, deep=self.text_deep)

    def tuned_image(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The prompted image tower: L2-normalised features (B, 1, D)."""
        x = patch_tokens(visual, pixels)
        n = self.vision_ctx.shape[0]
        x = visual.ln_pre(torch.cat([x, self.vision_ctx.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1))
        for i, block in enumerate(visual.transformer.resblocks):
            if 0 < i <= self.vision_deep.shape[0]:
                x = torch.cat([x[:, :-n], self.vision_deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            x = block(x)
        return class_features(visual, x).unsqueeze(1)

    def image_features(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """[CLIP's own features, the prompted tower's] (B, 2, D): two full passes (spec §1.4)."""
        with torch.no_grad():
            clip = nn.functional.normalize(visual(pixels), dim=-1)
        return torch.cat([clip.unsqueeze(1), self.tuned_image(visual, pixels)], dim=1)

    # ---- stage 1 --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher(self, model: FVGPTModel, labels: list[str]) -> torch.Tensor:
        """L2(mean over the 60 templates of CLIP's unnormalised text features) per label (PromptSRC's
        fixed_embeddings)."""
        encoder, bb = model.text_encoder, model.backbone
        feats = torch.stack([encoder(bb.tokenize(prompts(labels, t)), normalize=False) for t in TEACHER_TEMPLATES])
        return nn.functional.normalize(feats.mean(0), dim=-1)

    def objective(self, model: FVGPTModel, pixels: torch.Tensor, learned: torch.Tensor, targets: torch.Tensor,
                  teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE + L_SCL (text, image, logits) against frozen CLIP on the same augmented images."""
        clip, tuned = model.split(model.image_features(pixels))
        cfg = model.cfg
        return promptsrc_objective(model.tuned_logits(tuned, learned), model.logits(clip, teacher), learned, teacher,
                                   tuned[:, 0], clip, targets, cfg.text_loss_weight, cfg.image_loss_weight)


class PromptAverage:
    """Gaussian prompt aggregation: Σ_e w_e·θ_e over the epochs e = 1..E, accumulated after each epoch, loaded at the
    end of stage 1 (PromptSRC's trainer). Over the learner's prompt tensors only (upstream weighs its whole state
    dict, whose frozen part only moves by rounding; spec §1.2)."""

    def __init__(self, weights: list[float]):
        self.weights = weights
        self.total: dict[str, torch.Tensor] = {}

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> PromptAverage:
        return cls(gpa_weights(cfg.prompt_epochs, cfg.gpa_mean, cfg.gpa_std))

    def add(self, epoch: int, weights: dict[str, torch.Tensor]) -> None:
        """Add the weights after epoch `epoch` (0-based)."""
        w = self.weights[epoch]
        for name, value in weights.items():
            part = w * value.detach()
            self.total[name] = self.total[name] + part if name in self.total else part

    def result(self) -> dict[str, torch.Tensor]:
        return dict(self.total)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.total)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.total = dict(state)


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA's weight of each epoch 1..epochs: N(e; mean, std), normalised to sum 1 (PromptSRC's get_gauss); computed
    from log-densities so that a mean far beyond the epochs cannot underflow every weight to 0."""
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    return [w / sum(weights) for w in weights]
