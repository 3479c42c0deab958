"""The model object of the method: frozen CLIP + learned prompt + FVG-PT plugin, from features to heads to losses.

Training (both stages), evaluation and export all go through `FVGPTModel`, so there is one forward:

    pixels ─tower─► f ─┬─ z_full = s·f·Tᵀ          (learned prompt, "CoOp")
                       ├─ z_clip = s·f·T_CLIPᵀ     (zero-shot CLIP; same f: CoOp/KgCoOp never change the tower)
                       ├─ z_FDC  = S·L2(f + MLP_v(f))·G̃ᵀ        base head (E5–E6)
                       └─ z_PC   = (1−b)·z_full + b·z_clip      new head (E9–E11)

A model without a learned prompt is zero-shot CLIP; one without a plugin is the stage-1 model (CoOp/KgCoOp).
Equations: docs/method.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, ImageTower, TextEncoder
from .classes import ClassSplit
from .config import TrainConfig
from .data import foreground_view
from .labels import ZERO_SHOT_TEMPLATE, learned_template, prompts
from .losses import kgcoop_regulariser, plugin_objective
from .plugin import FVGPTPlugin
from .prompts import PromptLearner

TEXT_CHUNK = 256  # labels per text-tower call: bounds memory for label sets of thousands


@dataclass
class TextTables:
    """Text features of one label set (rows follow `labels`)."""

    labels: list[str]
    learned: torch.Tensor  # T: the prompt with the learned context (C, D); the zero-shot prompt if there is none
    clip: torch.Tensor  # T_CLIP: the zero-shot template "a photo of a {}." (C, D)

    def rows(self, ids: list[int]) -> TextTables:
        return TextTables([self.labels[i] for i in ids], self.learned[ids], self.clip[ids])


@dataclass
class Heads:
    """Every head's logits for one batch of images over one label set."""

    z_full: torch.Tensor  # the prompt-tuned model (stage 1)
    z_clip: torch.Tensor  # zero-shot CLIP
    z_fdc: torch.Tensor | None = None  # FVG-PT base head (z_full without FDC); None without the plugin
    z_pc: torch.Tensor | None = None  # FVG-PT new head: Prior Calibration (the FDC head over the labels without it)
    b: torch.Tensor | None = None  # the BRG's blend weight per image (0 without Prior Calibration)


class FVGPTModel(nn.Module):
    def __init__(self, backbone: Backbone, classes: ClassSplit, cfg: TrainConfig | None = None,
                 prompt: PromptLearner | None = None, plugin: FVGPTPlugin | None = None):
        """cfg: the training configuration (its losses' weights); None for a model that is never trained."""
        super().__init__()
        self.backbone = backbone
        self.classes = classes
        self.cfg = cfg
        self.tower = ImageTower(backbone)
        self.text_encoder = TextEncoder(backbone)
        self.prompt = prompt
        self.plugin = plugin
        self.logit_scale = backbone.logit_scale  # s

    @classmethod
    def new_prompt(cls, backbone: Backbone, classes: ClassSplit, cfg: TrainConfig) -> FVGPTModel:
        """Stage 1's starting point: a fresh learned context (random, or from cfg.ctx_init)."""
        return cls(backbone, classes, cfg, PromptLearner.initial(backbone, cfg.n_ctx, cfg.ctx_init))

    def new_plugin(self, fdc_logit_scale: float) -> FVGPTPlugin:
        """Stage 2's starting point: a fresh plugin on this backbone (attached to the model)."""
        c = self.cfg
        self.plugin = FVGPTPlugin(self.backbone.embed_dim, c.bottleneck, c.gate_hidden, c.fdc_init_scale,
                                  fdc_logit_scale, c.tau).to(self.backbone.device)
        return self.plugin

    @property
    def context(self) -> torch.Tensor | None:
        return None if self.prompt is None else self.prompt.ctx

    # ---- features ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen tower: never tracked by autograd."""
        return self.tower(pixels)

    def encode_text(self, labels: list[str], learned: bool) -> torch.Tensor:
        """Text features of `labels` with the learned prompt (learned=True; gradients reach the context when it
        trains) or with the zero-shot template."""
        ctx = self.context if learned else None
        texts = prompts(labels, learned_template(ctx.shape[0]) if ctx is not None else ZERO_SHOT_TEMPLATE)
        parts = [self.text_encoder(self.backbone.tokenize(texts[i:i + TEXT_CHUNK]), ctx)
                 for i in range(0, len(texts), TEXT_CHUNK)]
        return torch.cat(parts)

    @torch.no_grad()
    def tables(self, labels: list[str]) -> TextTables:
        clip = self.encode_text(labels, learned=False)
        return TextTables(list(labels), clip if self.prompt is None else self.encode_text(labels, True), clip)

    # ---- heads ------------------------------------------------------------------------------------------------
    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """z = s · cos(f, t): CLIP's similarity logits, the only place they are formed."""
        return self.logit_scale * image_features @ text_features.t()

    def _on(self, branch: str) -> bool:
        """Whether a branch of the plugin ("fdc", "prior_calibration") is on: always, unless the config switches it
        off (an ablation)."""
        return self.cfg is None or getattr(self.cfg, branch)

    def adapted_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """The base head's text rows: G̃ = L2(T + MLP_t(T)) (E5), or T itself without FDC (ablation)."""
        return self.plugin.adapt_text(text_features) if self._on("fdc") else text_features

    def base_head(self, image_features: torch.Tensor, adapted_text: torch.Tensor) -> torch.Tensor:
        """z_FDC (E6) against adapted text rows G̃ = adapted_text(T); without FDC (ablation) z_full = s·f·Tᵀ."""
        if self._on("fdc"):
            return self.plugin.base_logits(image_features, adapted_text)
        return self.logits(image_features, adapted_text)

    def new_head(self, image_features: torch.Tensor, learned: torch.Tensor,
                 clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_PC, b) over exactly the label set whose rows are given (E9–E11)."""
        return self._new_head(image_features, self.logits(image_features, learned),
                              self.logits(image_features, clip), learned)

    def _new_head(self, image_features: torch.Tensor, z_full: torch.Tensor, z_clip: torch.Tensor,
                  learned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior Calibration (E9–E11); without it (ablation) the FDC head over these labels with b ≡ 0: the paper's
        rows without PC send new classes through the adapters."""
        if self._on("prior_calibration"):
            return self.plugin.calibrate(z_full, z_clip)
        z_fdc = self.base_head(image_features, self.adapted_text(learned))
        return z_fdc.float(), torch.zeros(z_fdc.shape[0], device=z_fdc.device)

    def heads(self, image_features: torch.Tensor, tables: TextTables) -> Heads:
        z_full, z_clip = self.logits(image_features, tables.learned), self.logits(image_features, tables.clip)
        if self.plugin is None:
            return Heads(z_full, z_clip)
        z_pc, b = self._new_head(image_features, z_full, z_clip, tables.learned)
        return Heads(z_full, z_clip, self.base_head(image_features, self.adapted_text(tables.learned)), z_pc, b)

    # ---- training objectives ----------------------------------------------------------------------------------
    def prompt_loss(self, pixels: torch.Tensor, targets: torch.Tensor, labels: list[str],
                    zero_shot: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Stage 1 on one batch: CE of z_full over `labels` (targets index into them), plus KgCoOp's regulariser
        against the zero-shot text features of those labels when given."""
        learned = self.encode_text(labels, learned=True)
        ce = F.cross_entropy(self.logits(self.encode_image(pixels), learned), targets)
        if zero_shot is None:
            return {"loss": ce, "ce": ce.detach()}
        kg = kgcoop_regulariser(learned, zero_shot)
        return {"loss": ce + self.cfg.kg_weight * kg, "ce": ce.detach(), "kg": kg.detach()}

    def plugin_loss(self, pixels: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor, targets: torch.Tensor,
                    tables: TextTables) -> dict[str, torch.Tensor]:
        """Stage 2 on one batch (E14): the heads on the full image; the frozen backbone's logits on the foreground
        view x_fg = x ⊙ m are the FRG's input and a distillation teacher."""
        x_fg = foreground_view(pixels, masks, self.backbone.preprocess, self.cfg.fg_fill)
        f, f_fg = self.encode_image(torch.cat([pixels, x_fg])).split(pixels.shape[0])  # one frozen pass for both
        z_fg = self.logits(f_fg, tables.learned)
        return plugin_objective(self.plugin, self.heads(f, tables), z_fg, masks.mean(dim=(1, 2, 3)), has_mask,
                                targets, self.cfg)
