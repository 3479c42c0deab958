"""The model object of the method: frozen CLIP + a stage-1 learner + the FVG-PT plugin, from features to heads to
losses.

Training (both stages), evaluation and export all go through `FVGPTModel`, so there is one forward:

    pixels ─towers─► f ─┬─ z_full = s_b·Σ_k w_k·f_k·Tᵀ                 the stage-1 model ("CoOp", ...), base fusion w
                        ├─ z_new  = the same with the new fusion         (MMRL: its class-token logits; else z_full)
                        ├─ z_clip = s·f_CLIP·T_CLIPᵀ                     zero-shot CLIP
                        ├─ z_FDC  = Σ_k w_k·S·L2(f_k + MLP_v(f_k))·G̃ᵀ   base head (E5–E6)
                        └─ z_PC   = (1−b)·z_new + b·z_clip               new head (E9–E11)

The stage-1 learner (fvgpt.prompts for CoOp/KgCoOp, fvgpt.promptsrc, fvgpt.mmrl; their interface in fvgpt.prompts)
gives T and its image features f_k: CoOp and KgCoOp see CLIP's own tower (f = f_CLIP, one pass); PromptSRC and MMRL
have towers of their own, so an image's features carry CLIP's beside theirs. Image features are one tensor:
(B, D) when the learner sees CLIP's features, else (B, 1 + K, D) = [f_CLIP, f_1..f_K] (`split`). s_b is the learner's
logit scale (the backbone's s; MMRL's 100).

A model without a learned prompt is zero-shot CLIP; one without a plugin is the stage-1 model. Equations:
docs/method.md.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .backbone import Backbone, ImageTower, TextEncoder
from .classes import ClassSplit
from .config import TrainConfig
from .data import foreground_view
from .labels import ZERO_SHOT_TEMPLATE, prompts
from .losses import plugin_objective
from .mmrl import MMRL
from .plugin import FVGPTPlugin
from .prompts import ONE_KIND, PromptLearner
from .promptsrc import PromptSRC

TEXT_CHUNK = 256  # labels per text-tower call: bounds memory for label sets of thousands
LEARNERS = {"coop": PromptLearner, "kgcoop": PromptLearner, "promptsrc": PromptSRC, "mmrl": MMRL}


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
    z_new: torch.Tensor | None = None  # the stage-1 model's logits for new classes (MMRL: z_c); None: z_full

    def __post_init__(self) -> None:
        if self.z_new is None:
            self.z_new = self.z_full


class FVGPTModel(nn.Module):
    def __init__(self, backbone: Backbone, classes: ClassSplit, cfg: TrainConfig | None = None,
                 prompt: nn.Module | None = None, plugin: FVGPTPlugin | None = None):
        """cfg: the training configuration (its losses' weights); None for a model that is never trained. prompt:
        the stage-1 learner (LEARNERS), None for zero-shot CLIP."""
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
        """Stage 1's starting point: cfg.method's learner at its initialisation."""
        return cls(backbone, classes, cfg, LEARNERS[cfg.method].for_config(backbone, cfg))

    def new_plugin(self, fdc_logit_scale: float) -> FVGPTPlugin:
        """Stage 2's starting point: a fresh plugin on this backbone (attached to the model)."""
        c = self.cfg
        self.plugin = FVGPTPlugin(self.backbone.embed_dim, c.bottleneck, c.gate_hidden, c.fdc_init_scale,
                                  fdc_logit_scale, c.tau).to(self.backbone.device)
        return self.plugin

    @property
    def context(self) -> torch.Tensor | None:
        """The learned text context (CoOp, KgCoOp, PromptSRC); None for zero-shot CLIP and MMRL."""
        return getattr(self.prompt, "ctx", None)

    @property
    def own_tower(self) -> bool:
        """Whether the stage-1 model's image features come from a tower of its own (PromptSRC, MMRL)."""
        return self.prompt is not None and self.prompt.own_tower

    def towers(self) -> str:
        """What the image features depend on besides the backbone: "clip", or the learner's method and weights when
        it has a tower of its own."""
        if not self.own_tower:
            return "clip"
        digest = hashlib.sha256()
        for key, tensor in sorted(self.prompt.state_dict().items()):
            digest.update(key.encode() + tensor.detach().cpu().float().contiguous().numpy().tobytes())
        return f"{self.cfg.method}-{digest.hexdigest()[:16]}"

    @property
    def fusion(self) -> dict[str, tuple[float, ...]]:
        """Head ("base", "new") → the weight of each of the learner's image features in its logits."""
        return ONE_KIND if self.prompt is None else self.prompt.fusion

    @property
    def tuned_scale(self) -> float:
        """s_b: the stage-1 model's logit scale (MMRL's own constant; the backbone's s otherwise)."""
        return getattr(self.prompt, "logit_scale", None) or self.logit_scale

    # ---- features ---------------------------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """f: (B, D), or (B, 1 + K, D) = [f_CLIP, the learner's K] for a learner with a tower of its own. Autograd
        reaches the learner's prompts (its stage 1); CLIP's weights never train."""
        if not self.own_tower:
            return self.tower(pixels)
        return self.prompt.image_features(self.tower.visual, pixels)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen towers: image_features never tracked by autograd."""
        return self.image_features(pixels)

    @torch.no_grad()
    def encode_tuned(self, pixels: torch.Tensor) -> torch.Tensor:
        """The stage-1 model's image features alone (B, K, D), without CLIP's (the foreground view in stage 2)."""
        if not self.own_tower:
            return self.tower(pixels).unsqueeze(1)
        return self.prompt.tuned_image(self.tower.visual, pixels)

    @staticmethod
    def split(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features → (f_CLIP (B, D), the stage-1 model's (B, K, D))."""
        return (f, f.unsqueeze(1)) if f.dim() == 2 else (f[:, 0], f[:, 1:])

    def encode_text(self, labels: list[str], learned: bool, template: str | None = None) -> torch.Tensor:
        """Text features of `labels` with the learned prompt (learned=True; gradients reach the learner when it
        trains) or with a hand-written template (default: the zero-shot one) through CLIP's own text tower."""
        if learned and self.prompt is not None:
            encode, template = partial(self.prompt.encode_text, self.text_encoder), self.prompt.template
        else:
            encode, template = self.text_encoder, template or ZERO_SHOT_TEMPLATE
        texts = prompts(labels, template)
        parts = [encode(self.backbone.tokenize(texts[i:i + TEXT_CHUNK])) for i in range(0, len(texts), TEXT_CHUNK)]
        return torch.cat(parts)

    @torch.no_grad()
    def tables(self, labels: list[str]) -> TextTables:
        clip = self.encode_text(labels, learned=False)
        return TextTables(list(labels), clip if self.prompt is None else self.encode_text(labels, True), clip)

    # ---- heads ------------------------------------------------------------------------------------------------
    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """z = s · cos(f, t): CLIP's similarity logits (zero-shot CLIP and every learner with the backbone's s)."""
        return self.logit_scale * image_features @ text_features.t()

    def tuned_logits(self, tuned: torch.Tensor, text: torch.Tensor,
                     weights: tuple[float, ...] | None = None) -> torch.Tensor:
        """The stage-1 model's logits s_b·Σ_k w_k·f_k·tᵀ from its image features (B, K, D); weights: the base
        fusion unless given."""
        weights = self.fusion["base"] if weights is None else weights
        scale = self.tuned_scale
        return sum(w * (scale * tuned[:, k] @ text.t()) for k, w in enumerate(weights) if w)

    def _on(self, branch: str) -> bool:
        """Whether a branch of the plugin ("fdc", "prior_calibration") is on: always, unless the config switches it
        off (an ablation)."""
        return self.cfg is None or getattr(self.cfg, branch)

    def adapted_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """The base head's text rows: G̃ = L2(T + MLP_t(T)) (E5), or T itself without FDC (ablation)."""
        return self.plugin.adapt_text(text_features) if self._on("fdc") else text_features

    def base_head(self, image_features: torch.Tensor, adapted_text: torch.Tensor) -> torch.Tensor:
        """z_FDC (E6) against adapted text rows G̃ = adapted_text(T); without FDC (ablation) z_full."""
        return self._base_head(self.split(image_features)[1], adapted_text)

    def _base_head(self, tuned: torch.Tensor, adapted_text: torch.Tensor) -> torch.Tensor:
        """z_FDC from the stage-1 model's image features (B, K, D), fused like its base logits (MMRL: one MLP_v on
        f_c and on f_r, spec §2.4)."""
        if not self._on("fdc"):
            return self.tuned_logits(tuned, adapted_text)
        return sum(w * self.plugin.base_logits(tuned[:, k], adapted_text)
                   for k, w in enumerate(self.fusion["base"]) if w)

    def new_head(self, image_features: torch.Tensor, learned: torch.Tensor,
                 clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_PC, b) over exactly the label set whose rows are given (E9–E11)."""
        f_clip, tuned = self.split(image_features)
        z_new = self.tuned_logits(tuned, learned, self.fusion["new"])
        return self._new_head(tuned, z_new, self.logits(f_clip, clip), learned)

    def _new_head(self, tuned: torch.Tensor, z_new: torch.Tensor, z_clip: torch.Tensor,
                  learned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior Calibration (E9–E11) on the stage-1 model's new-class logits; without it (ablation) the FDC head
        over these labels with b ≡ 0: the paper's rows without PC send new classes through the adapters."""
        if self._on("prior_calibration"):
            return self.plugin.calibrate(z_new, z_clip)
        z_fdc = self._base_head(tuned, self.adapted_text(learned))
        return z_fdc.float(), torch.zeros(z_fdc.shape[0], device=z_fdc.device)

    def heads(self, image_features: torch.Tensor, tables: TextTables) -> Heads:
        f_clip, tuned = self.split(image_features)
        z_full = self.tuned_logits(tuned, tables.learned)
        new = self.fusion["new"]
        z_new = z_full if new == self.fusion["base"] else self.tuned_logits(tuned, tables.learned, new)
        z_clip = self.logits(f_clip, tables.clip)
        if self.plugin is None:
            return Heads(z_full, z_clip, z_new=z_new)
        z_pc, b = self._new_head(tuned, z_new, z_clip, tables.learned)
        return Heads(z_full, z_clip, self._base_head(tuned, self.adapted_text(tables.learned)), z_pc, b, z_new)

    # ---- training objectives ----------------------------------------------------------------------------------
    def prompt_loss(self, pixels: torch.Tensor, targets: torch.Tensor, labels: list[str],
                    teacher: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Stage 1 on one batch: the learner's objective over `labels` (targets index into them), its regulariser
        pulling toward `teacher` (the learner's teacher() of those labels; None for CoOp)."""
        return self.prompt.objective(self, pixels, self.encode_text(labels, learned=True), targets, teacher)

    def plugin_loss(self, pixels: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor, targets: torch.Tensor,
                    tables: TextTables) -> dict[str, torch.Tensor]:
        """Stage 2 on one batch (E14): the heads on the full image; the frozen stage-1 model's logits on the
        foreground view x_fg = x ⊙ m are the FRG's input and a distillation teacher."""
        x_fg = foreground_view(pixels, masks, self.backbone.preprocess, self.cfg.fg_fill)
        if self.own_tower:  # CLIP's and the learner's pass on x, the learner's alone on x_fg (spec §1.4, §2.4)
            f, tuned_fg = self.encode_image(pixels), self.encode_tuned(x_fg)
        else:  # one frozen pass for both views
            f, f_fg = self.encode_image(torch.cat([pixels, x_fg])).split(pixels.shape[0])
            tuned_fg = f_fg.unsqueeze(1)
        z_fg = self.tuned_logits(tuned_fg, tables.learned)
        return plugin_objective(self.plugin, self.heads(f, tables), z_fg, masks.mean(dim=(1, 2, 3)), has_mask,
                                targets, self.cfg)
