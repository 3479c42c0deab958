"""Frozen CLIP backbones from open_clip, and the text path with a learned CoOp context spliced in.

One factory (`load_backbone`) resolves the weights source the same way for training, evaluation and export:
`none` (random init, deterministic given `init_seed`), an open_clip pretrained tag (needs network once), or a
local checkpoint file. A fingerprint of the weights is stored in the run dir so a rebuilt model can be checked
against the one that was trained.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .errors import FVGPTError
from .preprocess import Preprocess

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

TINY_MODEL = "fvgpt-tiny"


@dataclass
class Backbone:
    name: str
    pretrained: str
    model: nn.Module
    tokenizer: object
    preprocess: Preprocess
    eval_transform: object  # open_clip's own preprocessing callable (PIL image -> tensor)

    @property
    def embed_dim(self) -> int:
        return int(self.text.text_projection.shape[-1] if isinstance(self.text.text_projection, nn.Parameter)
                   else self.text.text_projection.out_features)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def text(self) -> nn.Module:
        """The module that owns the text tower's parts (CLIP keeps them on the model, CustomTextCLIP on `.text`)."""
        return getattr(self.model, "text", self.model)

    @property
    def context_length(self) -> int:
        return int(self.text.positional_embedding.shape[0])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def vocabulary_path(self) -> Path:
        """The BPE vocabulary of the text tower's tokenizer, which bundles ship so that serving needs no open_clip.
        Only open_clip's SimpleTokenizer (CLIP's BPE, 'lower' cleaning, plain truncation) is reproduced there."""
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower, default_bpe

        tok = self.tokenizer
        if type(tok) is not SimpleTokenizer or tok.clean_fn is not _clean_lower or tok.reduction_fn is not None:
            raise BackboneError(f"{self.name}: its tokenizer ({type(tok).__name__}) is not CLIP's BPE tokenizer; "
                                f"bundles can only ship that one")
        return Path(default_bpe())

    def fingerprint(self) -> str:
        """sha256 over every parameter and buffer: identifies the exact frozen weights a run was trained on."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()


class BackboneError(FVGPTError):
    pass


def load_backbone(name: str, pretrained: str = "none", device: str = "cpu", init_seed: int = 0) -> Backbone:
    """Create a frozen open_clip model.

    pretrained: "none" (random init with `init_seed`), a path to a local checkpoint file, or an open_clip tag
    such as "openai" (downloaded once into the Hugging Face cache; fails offline).
    """
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown model {name!r}; choose one of open_clip.list_models(), e.g. ViT-B-16 or "
                            f"{TINY_MODEL}")
    source = None if pretrained.lower() == "none" else pretrained
    if source is not None and not Path(source).is_file():
        known = open_clip.list_pretrained_tags_by_model(name)
        if source not in known:
            raise BackboneError(f"--pretrained {pretrained!r} is neither a file nor a pretrained tag of {name} "
                                f"(tags: {', '.join(known) or 'none'})")
    devices = torch.device(device)
    if devices.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError("--device cuda requested but torch sees no CUDA device")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model, _, eval_transform = open_clip.create_model_and_transforms(name, pretrained=source, device=device)
        except Exception as exc:  # network errors, bad checkpoints: say which source failed
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise BackboneError(f"could not load {name} weights from {pretrained!r}{offline}: {exc}") from exc
    model.eval().requires_grad_(False)
    text_owner = getattr(model, "text", model)
    if getattr(text_owner, "text_pool_type", getattr(text_owner, "pool_type", "argmax")) != "argmax":
        raise BackboneError(f"{name}: only CLIP-style text towers (EOT/argmax pooling) are supported")
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    if cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise BackboneError(f"{name}: resize mode {cfg['resize_mode']!r} is not supported")
    preprocess = Preprocess(size=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                            interpolation=cfg.get("interpolation", "bicubic"),
                            resize_mode=cfg.get("resize_mode", "shortest"))
    return Backbone(name=name, pretrained=pretrained, model=model, tokenizer=open_clip.get_tokenizer(name),
                    preprocess=preprocess, eval_transform=eval_transform)


def vit(backbone: Backbone, method: str) -> nn.Module:
    """The visual tower, checked to be a CLIP ViT whose blocks a prompt learner can loop over (PromptSRC, MMRL): class
    token first and pooled, `ln_post` on every token before pooling, a projection."""
    visual = backbone.model.visual
    ok = (hasattr(visual, "conv1") and hasattr(visual, "transformer") and getattr(visual, "attn_pool", None) is None
          and getattr(visual, "pool_type", None) == "tok" and not getattr(visual, "final_ln_after_pool", True)
          and getattr(visual, "proj", None) is not None)
    if not ok:
        raise BackboneError(f"{backbone.name}: {method} needs a CLIP ViT image tower (class-token pooling after "
                            f"ln_post, a projection); this one is {type(visual).__name__}")
    return visual


def patch_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT input up to (not including) ln_pre: patch embedding, class token first, positional embedding.
    (B, 1 + patches, width)."""
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return visual.patch_dropout(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))


def class_features(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT output from the last block's tokens: ln_post, class token, projection; L2-normalised."""
    return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)


class ImageTower(nn.Module):
    """pixels (B, 3, S, S) → L2-normalised image features (B, D): the frozen visual tower, the `tower` graph of a
    bundle. CoOp/KgCoOp (+ FVG-PT) never change it, so zero-shot CLIP and every prompt tuned on this backbone share
    it."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.visual = backbone.model.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)


class TextEncoder(nn.Module):
    """open_clip's text tower fed with token embeddings, so learned context vectors can replace placeholder tokens.

    `forward(token_ids, context, use_context, deep)` returns L2-normalised text features. Rows with use_context = 1
    have the embeddings at positions 1..n_ctx replaced by `context` (CoOp: "X X X X <label>.") and, with `deep`
    (PromptSRC), the tokens at those positions replaced again at the input of blocks 1..len(deep); rows with 0 are
    encoded as plain CLIP text (the zero-shot template). The prompts are inputs, not weights, so one exported text
    graph serves every prompt learned on this backbone. The EOT position is found with a float argmax, which ONNX
    Runtime supports on every provider (int64 ArgMax it does not).
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        owner = backbone.text
        self.token_embedding = owner.token_embedding
        self.positional_embedding = owner.positional_embedding
        self.transformer = owner.transformer
        self.ln_final = owner.ln_final
        self.text_projection = owner.text_projection
        self.register_buffer("attn_mask", owner.attn_mask, persistent=False)

    @staticmethod
    def splice(x: torch.Tensor, prompt: torch.Tensor, use_context: torch.Tensor | None) -> torch.Tensor:
        """x with the tokens at positions 1..n (after the start token) replaced by `prompt` (n, W), in the rows whose
        use_context is 1 (every row when None)."""
        n = prompt.shape[0]
        placeholder = x[:, 1:1 + n]
        new = prompt.to(x.dtype).unsqueeze(0).expand_as(placeholder)
        if use_context is not None:  # per row: the prompt, or the row's own tokens
            new = torch.where(use_context.view(-1, 1, 1) > 0.5, new, placeholder)
        return torch.cat([x[:, :1], new, x[:, 1 + n:]], dim=1)

    def embed(self, token_ids: torch.Tensor, context: torch.Tensor | None = None,
              use_context: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (the context spliced in) plus positional embeddings: the first block's input."""
        x = self.token_embedding(token_ids)
        if context is not None and context.shape[0] > 0:
            x = self.splice(x, context, use_context)
        return x + self.positional_embedding

    def pool(self, x: torch.Tensor, token_ids: torch.Tensor, shift: int = 0, normalize: bool = True) -> torch.Tensor:
        """ln_final, the token at the EOT position (+ `shift` tokens inserted before it), the projection."""
        x = self.ln_final(x)
        eot = token_ids.float().argmax(dim=-1) + shift
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, token_ids: torch.Tensor, context: torch.Tensor | None = None,
                use_context: torch.Tensor | None = None, deep: torch.Tensor | None = None,
                normalize: bool = True) -> torch.Tensor:
        x = self.embed(token_ids, context, use_context)
        for i, block in enumerate(self.transformer.resblocks):
            if deep is not None and 0 < i <= deep.shape[0]:
                x = self.splice(x, deep[i - 1], use_context)
            x = block(x, attn_mask=self.attn_mask)
        return self.pool(x, token_ids, normalize=normalize)
