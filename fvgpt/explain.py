"""Where the image tower looked, per patch: the last-layer decomposition of the CLS feature (Gandelsman et al., ICLR
2024, "Interpreting CLIP's image representation via text-based decomposition") and, for measurement only, MaskCLIP's
dense features (Zhou et al., ECCV 2022).

The CLS token leaving the last block is

    x_cls = x_in + ls_1(b_o + Σ_j Σ_h a_hj · W_o^h v_hj) + ls_2(MLP(...))

and `ln_post` is linear once its standard deviation is fixed at the one of x_cls, so the image feature splits exactly
into a sum of terms, one per token j of the last attention (plus the residual, biases and the MLP). `patch_contrib`
is each patch's term, projected by `proj` and divided by the feature's norm: a label's map is patch_contrib · t for
its unit text row t, in units of cos(feature, t), and the maps of all patches plus the remaining terms sum to that
cosine. Only the last layer's direct path is attributed (the MLP and earlier layers are not): what the map shows is
what the last attention gathered, weighted by how much it points toward the label.

The last block is computed for the CLS query only (the feature needs nothing else), so the explain graph costs about
what the plain tower costs. CoOp, KgCoOp and the FVG-PT plugin leave the tower frozen: a class-agnostic map (the
attention itself) cannot differ between them; a map differs only through the text row t it is read with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FVGPTError


class ExplainError(FVGPTError):
    pass


def _check_visual(visual: nn.Module) -> None:
    """The decomposition needs open_clip's plain ViT: CLS-token pooling, a LayerNorm `ln_post`, a `proj` matrix and
    nn.MultiheadAttention blocks."""
    problems = []
    if not all(hasattr(visual, a) for a in ("conv1", "transformer", "ln_post", "proj", "class_embedding")):
        problems.append(f"{type(visual).__name__} is not open_clip's VisionTransformer")
    else:
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            problems.append("it does not pool the CLS token")
        if not isinstance(visual.ln_post, nn.LayerNorm):
            problems.append("its ln_post is not a LayerNorm")
        if visual.proj is None:
            problems.append("it has no output projection")
        block = visual.transformer.resblocks[-1]
        if not isinstance(block.attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            problems.append("its last block's attention is not nn.MultiheadAttention self-attention")
    if problems:
        raise ExplainError("this image tower cannot carry explain maps: " + "; ".join(problems))


class ExplainTower(nn.Module):
    """pixels (B, 3, S, S) → features (B, D) (what ImageTower computes), patch_contrib (B, P, D) and, with
    dense=True, MaskCLIP's dense features (B, P, D) (L2-normalised per patch).

    The last block's attention weights are read here (once), before `fvgpt_export.graphs.fused_attention` may swap
    the block's nn.MultiheadAttention during export (the swapped module has `.heads`, not `.num_heads`)."""

    def __init__(self, visual: nn.Module, dense: bool = False):
        super().__init__()
        _check_visual(visual)
        self.visual, self.dense = visual, dense
        last = visual.transformer.resblocks[-1]
        self.last = last
        self.heads = last.attn.num_heads
        self.in_proj_weight, self.in_proj_bias = last.attn.in_proj_weight, last.attn.in_proj_bias
        self.out_proj = last.attn.out_proj

    @property
    def grid(self) -> int:
        return int(self.visual.grid_size[0])

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = self.visual
        x = v._embeds(pixels)
        for block in v.transformer.resblocks[:-1]:
            x = block(x)
        last = self.last
        b, n, w = x.shape
        h = self.heads
        q, k, val = F.linear(last.ln_1(x), self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q0 = q[:, :1].reshape(b, 1, h, w // h).transpose(1, 2)  # (B, H, 1, dh): the CLS query only
        k = k.reshape(b, n, h, w // h).transpose(1, 2)
        vh = val.reshape(b, n, h, w // h).transpose(1, 2)  # (B, H, N, dh)
        attn = torch.softmax(q0 @ k.transpose(-1, -2) / (w // h) ** 0.5, dim=-1)  # (B, H, 1, N)
        weighted = (attn.transpose(-1, -2) * vh).transpose(1, 2).reshape(b, n, w)  # (B, N, W): Σ_h a_hj·v_hj
        per_token = last.ls_1(weighted @ self.out_proj.weight.t())  # (B, N, W): each token's term, no bias
        cls = x[:, 0] + last.ls_1(self.out_proj(weighted.sum(1)))
        cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
        ln = v.ln_post
        sigma = torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + ln.eps)  # (B, 1)
        pooled = ln(cls) @ v.proj
        norm = pooled.norm(dim=-1, keepdim=True)  # (B, 1)
        patches = per_token[:, 1:]
        linear = (patches - patches.mean(-1, keepdim=True)) * ln.weight / sigma[:, None]
        contrib = (linear @ v.proj) / norm[:, None]
        outputs = (pooled / norm, contrib)
        if self.dense:
            outputs += (self._dense(x, val),)
        return outputs

    def _dense(self, x: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """MaskCLIP: each patch through the last block with its attention replaced by its own value (out_proj, the
        residual, the MLP), then ln_post and proj; L2-normalised per patch."""
        last, v = self.last, self.visual
        y = x[:, 1:] + last.ls_1(self.out_proj(val[:, 1:]))
        y = y + last.ls_2(last.mlp(last.ln_2(y)))
        return F.normalize(v.ln_post(y) @ v.proj, dim=-1)


def label_maps(patch_contrib: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, P, D) patch terms · (B, D) one unit text row per image → (B, P) maps (contributions to the cosine)."""
    return torch.einsum("bpd,bd->bp", patch_contrib, rows)
