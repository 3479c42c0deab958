"""MMRL (Guo et al., CVPR 2025) as a stage-1 learner: a shared representation space R (rep_tokens × rep_dim),
projected by per-layer linear maps into the upper layers of both CLIP towers; decoupled logits for base and new.

Where the tokens go (the spec, shared/research/backbones.md §2.1, from MMRL's clip/model_mmrl.py): with the first
representation layer ℓ (1-based; 6 of 12 for ViT-B/16, ⌈layers/2⌉ otherwise), blocks 0..ℓ−2 of each tower are CLIP's
own, untouched. At the input of block ℓ−1 the tower's first projection of R is inserted right after the first token
(the class token / the start token); at the input of every later block those positions are overwritten by that
layer's projection. Image outputs: f_c = ln_post(class token) · proj (CLIP's frozen projection) and
f_r = mean of ln_post(the representation tokens) · P_r (learned). Text: a hand-written template, no context; the
causal mask grows with the inserted tokens and the EOT token moves by rep_tokens.

So the image tower splits after block ℓ−2: the trunk (patch embedding .. block ℓ−2) is CLIP's, shared by the vanilla
pass that Prior Calibration needs and the MMRL pass; `image_features` runs it once for both (spec §2.4).
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, TextEncoder, class_features, patch_tokens, vit
from .losses import mmrl_objective

if TYPE_CHECKING:
    from .config import TrainConfig
    from .model import FVGPTModel

REP_STD = 0.02  # N(0, 0.02²) init of R (MMRL's trainers/mmrl.py)


def first_rep_layer(configured: int | None, layers: int) -> int:
    """The first layer (1-based) with representation tokens: configured, else ⌈layers/2⌉ (MMRL's 6 of 12; ours for
    other depths, spec §4); at most `layers`."""
    return min(configured or math.ceil(layers / 2), layers)


class MMRL(nn.Module):
    own_tower = True

    def __init__(self, rep: torch.Tensor, to_visual: nn.ModuleList, to_text: nn.ModuleList, proj_rep: torch.Tensor,
                 alpha: float, template: str, logit_scale: float):
        """rep: R (rep_tokens, rep_dim); to_visual / to_text: one Linear(rep_dim → width) per layer from the first
        representation layer to the tower's last; proj_rep: P_r (visual width, D); alpha: the base fusion weight α;
        logit_scale: MMRL's 100 (cfg.mmrl_scale)."""
        super().__init__()
        self.rep = nn.Parameter(rep.detach().float().clone())
        self.to_visual, self.to_text = to_visual, to_text
        self.proj_rep = nn.Parameter(proj_rep.detach().float().clone())
        self.fusion = {"base": (alpha, 1.0 - alpha), "new": (1.0, 0.0)}  # base: α·z_c + (1 − α)·z_r; new: z_c
        self.template = template
        self.logit_scale = logit_scale

    @classmethod
    def shaped(cls, backbone: Backbone, cfg: TrainConfig) -> MMRL:
        """The learner's parameters at their initialisation: R ~ N(0, 0.02²); one default-initialised Linear per
        tower, copied to every layer (MMRL's _get_clones: all layers start equal); P_r ~ width^-0.5·N(0, 1) (not
        CLIP's proj: MMRL loads CLIP with strict=False and the checkpoint has no proj_rep)."""
        visual = vit(backbone, "mmrl")
        width, layers = visual.conv1.out_channels, len(visual.transformer.resblocks)
        text = backbone.text
        text_width, text_layers = text.token_embedding.weight.shape[1], len(text.transformer.resblocks)
        dev = backbone.device
        rep = torch.randn(cfg.rep_tokens, cfg.rep_dim, device=dev) * REP_STD
        one_visual, one_text = nn.Linear(cfg.rep_dim, width, device=dev), nn.Linear(cfg.rep_dim, text_width, device=dev)
        to_visual = nn.ModuleList(copy.deepcopy(one_visual)
                                  for _ in range(layers - first_rep_layer(cfg.rep_layer, layers) + 1))
        to_text = nn.ModuleList(copy.deepcopy(one_text)
                                for _ in range(text_layers - first_rep_layer(cfg.rep_layer, text_layers) + 1))
        proj_rep = width ** -0.5 * torch.randn(width, backbone.embed_dim, device=dev)
        return cls(rep, to_visual, to_text, proj_rep, cfg.mmrl_alpha, cfg.mmrl_template, cfg.mmrl_scale)

    for_config = shaped

    @classmethod
    def from_state(cls, backbone: Backbone, cfg: TrainConfig, tensors: dict[str, torch.Tensor]) -> MMRL:
        with torch.random.fork_rng(devices=[]):  # the shapes only: loading draws nothing from the caller's RNG
            learner = cls.shaped(backbone, cfg)
        learner.load_state_dict({k: v.to(backbone.device) for k, v in tensors.items()})
        return learner

    # ---- the representation tokens of each layer (input-independent) ----------------------------------------------
    def visual_tokens(self) -> torch.Tensor:
        """R_v,k = F^v_k(R): (layers with tokens, rep_tokens, visual width)."""
        return torch.stack([proj(self.rep) for proj in self.to_visual])

    def text_tokens(self) -> torch.Tensor:
        """R_t,k = F^t_k(R): (layers with tokens, rep_tokens, text width)."""
        return torch.stack([proj(self.rep) for proj in self.to_text])

    # ---- image tower: trunk, then the vanilla branch and the MMRL branch ------------------------------------------
    def trunk(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's own tower up to the first representation block: tokens (B, 1 + patches, width)."""
        x = visual.ln_pre(patch_tokens(visual, pixels))
        for block in visual.transformer.resblocks[:trunk_blocks(visual, len(self.to_visual))]:
            x = block(x)
        return x

    @staticmethod
    def vanilla_branch(visual: nn.Module, x: torch.Tensor, start: int) -> torch.Tensor:
        """The rest of CLIP's own tower from the trunk's tokens: L2-normalised features (B, D)."""
        for block in visual.transformer.resblocks[start:]:
            x = block(x)
        return class_features(visual, x)

    @staticmethod
    def branch(visual: nn.Module, x: torch.Tensor, tokens: torch.Tensor, proj_rep: torch.Tensor) -> torch.Tensor:
        """The MMRL branch from the trunk's tokens with the layers' tokens R_v (K, n, width): [f_c, f_r] (B, 2, D),
        each L2-normalised."""
        blocks = visual.transformer.resblocks
        start, n, batch = len(blocks) - tokens.shape[0], tokens.shape[1], x.shape[0]
        for k, block in enumerate(blocks[start:]):
            rep = tokens[k].to(x.dtype).expand(batch, -1, -1)
            x = torch.cat([x[:, :1], rep, x[:, 1 if k == 0 else 1 + n:]], dim=1)  # insert at k = 0, then overwrite
            x = block(x)
        x = visual.ln_post(x[:, :1 + n])
        f_c = x[:, 0] @ visual.proj
        f_r = x[:, 1:].mean(dim=1) @ proj_rep.to(x.dtype)
        return F.normalize(torch.stack([f_c, f_r], dim=1), dim=-1)

    def tuned_image(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """MMRL's image features [f_c, f_r] (B, 2, D): trunk + MMRL branch (the foreground view in stage 2)."""
        return self.branch(visual, self.trunk(visual, pixels), self.visual_tokens(), self.proj_rep)

    def image_features(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """[CLIP's own features, f_c, f_r] (B, 3, D): the trunk once, then both branches (about 1.58 passes for
        ViT-B/16, spec §2.4)."""
        x = self.trunk(visual, pixels)
        with torch.no_grad():
            clip = self.vanilla_branch(visual, x, trunk_blocks(visual, len(self.to_visual)))
        return torch.cat([clip.unsqueeze(1), self.branch(visual, x, self.visual_tokens(), self.proj_rep)], dim=1)

    # ---- text tower -----------------------------------------------------------------------------------------------
    def encode_text(self, encoder: TextEncoder, token_ids: torch.Tensor) -> torch.Tensor:
        return text_features(encoder, token_ids, self.text_tokens())

    # ---- stage 1 --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher(self, model: FVGPTModel, labels: list[str]) -> torch.Tensor:
        """CLIP's text features of MMRL's own template (its text_features_clip)."""
        return model.encode_text(labels, learned=False, template=self.template)

    def objective(self, model: FVGPTModel, pixels: torch.Tensor, learned: torch.Tensor, targets: torch.Tensor,
                  teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """α·CE(z_c) + (1 − α)·CE(z_r) + λ·(1 − cos(f_c, f_CLIP)) + λ·(1 − cos(g, g_CLIP)) (MMRL_Loss)."""
        clip, tuned = model.split(model.image_features(pixels))
        cfg = model.cfg
        z_c, z_r = (model.tuned_logits(tuned, learned, weights) for weights in ((1.0, 0.0), (0.0, 1.0)))
        return mmrl_objective(z_c, z_r, tuned[:, 0], clip, learned, teacher, targets, cfg.mmrl_alpha, cfg.reg_weight)


def trunk_blocks(visual: nn.Module, rep_layers: int) -> int:
    """Blocks before the first one with representation tokens (ViT-B/16: 5)."""
    return len(visual.transformer.resblocks) - rep_layers


def text_features(encoder: TextEncoder, token_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """MMRL's text tower with the layers' tokens R_t (K, n, width): inserted after the start token at the input of
    block L − K, overwritten at every later block; the causal mask grows by n, the EOT token moves by n."""
    blocks = encoder.transformer.resblocks
    start, n = len(blocks) - tokens.shape[0], tokens.shape[1]
    x = encoder.embed(token_ids)
    length = x.shape[1] + n
    grown = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
    for i, block in enumerate(blocks):
        if i >= start:
            rep = tokens[i - start].to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], rep, x[:, 1 if i == start else 1 + n:]], dim=1)
        x = block(x, attn_mask=grown if i >= start else encoder.attn_mask)
    return encoder.pool(x, token_ids, shift=n)
