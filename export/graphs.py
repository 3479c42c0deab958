"""torch → ONNX for the bundle's graphs (tower, heads, text), with the batch and label-set axes kept dynamic.

The graph modules here are thin wrappers: every computation is a method of the model object (fvgpt.model), so the
exported graphs compute exactly what training and evaluation computed.

Graphs are traced at batch 2, never 1: a trace at batch 1 can specialise a reshape inside attention to a single
image, and the graph then fails or silently mixes images at other batch sizes; tests run the graphs at batches 1, 3
and 8 against torch.

Attention: nn.MultiheadAttention exports as a chain of Transposes, Slices and MatMuls around a softmax. At opset ≥ 23
ONNX has one `Attention` op, which takes (batch, tokens, width) tensors and the head count directly, and ONNX Runtime
runs it as one fused kernel. `fused_attention` swaps every batch-first self-attention for the same math routed through
a custom op that exports as exactly that node: the ViT-B/16 graph goes from 49 Transposes and 36 Slices to one
Transpose, and its int8 graph from 33.6 to 32.0 ms/image (batch 8, 2 threads). The parity gate compares the exported
graph against the *unswapped* torch model.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnxscript import opset23
from torch import nn

from fvgpt.explain import ExplainTower
from fvgpt.mmrl import MMRL, text_features, trunk_blocks
from fvgpt.model import FVGPTModel

TRACE_BATCH = 2
TWO_GB = 2 * 1024**3
FUSED_ATTENTION_OPSET = 23


@torch.library.custom_op("fvgpt::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Multi-head scaled-dot-product attention on (B, S, D) projections; `mask` is additive, like MHA's float mask."""
    b, s, d = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, s, heads, d // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, s, d)


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, heads: int) -> torch.Tensor:
    return torch.empty_like(q)


def _attention_onnx(q, k, v, mask, heads: int):
    return opset23.Attention(q, k, v, mask, q_num_heads=heads, kv_num_heads=heads)[0]


class _FusedSelfAttention(nn.Module):
    """nn.MultiheadAttention(batch_first=True) self-attention: QKV projection, one attention op, output projection."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.heads = mha.num_heads
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(torch.ops.fvgpt.attention(q, k, v, attn_mask, self.heads)), None


@contextmanager
def fused_attention(module: nn.Module) -> Iterator[None]:
    """Temporarily replace every batch-first self-attention nn.MultiheadAttention inside `module`."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if (isinstance(child, nn.MultiheadAttention) and child.batch_first and child._qkv_same_embed_dim
                    and child.in_proj_bias is not None):
                swapped.append((parent, name, child))
                setattr(parent, name, _FusedSelfAttention(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class ExplainGraph(nn.Module):
    """pixels (B, 3, S, S) → features (B, D) and patch_contrib (B, P, D): the tower's explain graph
    (fvgpt.explain.ExplainTower); its last block is written out for the CLS query, the others keep fused attention."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.explain = ExplainTower(model.backbone.model.visual)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.explain(pixels)


class TextGraph(nn.Module):
    """token ids (N, L), context (n_ctx, W), use_context (N,) → L2-normalised text features (N, D).

    The learned context is an input, so the graph depends only on the backbone: every bundle on it ships the same
    bytes (its `text_id`), and a server loads it once for all of them."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.encoder = model.text_encoder

    def forward(self, token_ids: torch.Tensor, context: torch.Tensor, use_context: torch.Tensor) -> torch.Tensor:
        return self.encoder(token_ids, context, use_context)


class FVGPTHeadsGraph(nn.Module):
    """features (B, D), learned and clip rows (L, D), adapted rows (K, D) → base_logits (B, K) = z_FDC (E6) and
    new_logits (B, L) = z_PC (E9–E11). The plugin's weights are constants of the graph."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, learned: torch.Tensor, clip: torch.Tensor,
                adapted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.base_head(features, adapted), self.model.new_head(features, learned, clip)[0]


class OwnTowerHeadsGraph(FVGPTHeadsGraph):
    """The heads of a learner with a tower of its own (PromptSRC, MMRL): its features (B, K, D) and CLIP's
    clip_features (B, D) from two tower roles; otherwise FVGPTHeadsGraph."""

    def forward(self, features: torch.Tensor, clip_features: torch.Tensor, learned: torch.Tensor, clip: torch.Tensor,
                adapted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(torch.cat([clip_features.unsqueeze(1), features], dim=1), learned, clip, adapted)


class PromptedTowerGraph(nn.Module):
    """pixels → PromptSRC's prompted image features (B, 1, D); its visual prompts are constants of the graph."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.visual, self.prompt = model.tower.visual, model.prompt

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.prompt.tuned_image(self.visual, pixels)


class TrunkGraph(nn.Module):
    """pixels → the tokens after CLIP's blocks before MMRL's first representation layer (B, tokens, width)."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.visual, self.prompt = model.tower.visual, model.prompt

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.prompt.trunk(self.visual, pixels)


class ClipBranchGraph(nn.Module):
    """The trunk's tokens → CLIP's own image features (B, D): the rest of the vanilla tower."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.visual, self.start = model.tower.visual, trunk_blocks(model.tower.visual, len(model.prompt.to_visual))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return MMRL.vanilla_branch(self.visual, tokens, self.start)


class MMRLBranchGraph(nn.Module):
    """The trunk's tokens → MMRL's [f_c, f_r] (B, 2, D); its layers' tokens R_v = F^v(R) and P_r are constants."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.visual = model.tower.visual
        with torch.no_grad():
            self.register_buffer("rep", model.prompt.visual_tokens().detach().clone())
            self.register_buffer("proj_rep", model.prompt.proj_rep.detach().clone())
        self.branch = model.prompt.branch

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.branch(self.visual, tokens, self.rep, self.proj_rep)


class PromptSRCTextGraph(nn.Module):
    """token ids (N, L), context (n_ctx, W), deep prompts (depth − 1, n_ctx, W) → PromptSRC's text features (N, D).
    The prompts are inputs, so the graph is the same for every PromptSRC classifier on the backbone."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.encoder = model.text_encoder

    def forward(self, token_ids: torch.Tensor, context: torch.Tensor, text_deep: torch.Tensor) -> torch.Tensor:
        return self.encoder(token_ids, context, deep=text_deep)


class MMRLTextGraph(nn.Module):
    """token ids (N, L), the layers' tokens R_t (K, n, W) → MMRL's text features (N, D); the tokens are an input."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.encoder = model.text_encoder

    def forward(self, token_ids: torch.Tensor, rep_text: torch.Tensor) -> torch.Tensor:
        return text_features(self.encoder, token_ids, rep_text)


class CosineHeadsGraph(nn.Module):
    """Zero-shot CLIP: features (B, D), clip rows (L, D) → logits (B, L) = s·f·Tᵀ."""

    def __init__(self, model: FVGPTModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        return self.model.logits(features, clip)


def export_graph(module: nn.Module, example: dict[str, torch.Tensor], path: Path, output_names: list[str],
                 dynamic: dict[str, dict[int, str]], opset: int, max_dims: dict[str, int]) -> None:
    """Export with torch.export (the supported exporter); `dynamic` names each input's dynamic axes."""
    dims = {name: torch.export.Dim(name, min=1, max=max_dims.get(name, 1 << 16))
            for axes in dynamic.values() for name in axes.values()}
    shapes = {arg: {axis: dims[name] for axis, name in dynamic.get(arg, {}).items()} or None for arg in example}
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > TWO_GB * 0.9
    fused = opset >= FUSED_ATTENTION_OPSET
    with warnings.catch_warnings(), fused_attention(module) if fused else nullcontext():
        warnings.simplefilter("ignore")  # exporter chatter; failures still raise
        program = torch.onnx.export(module.eval(), kwargs=example, dynamo=True, input_names=list(example),
                                    output_names=output_names, dynamic_shapes=shapes, opset_version=opset,
                                    external_data=big, verbose=False, report=False,
                                    custom_translation_table={torch.ops.fvgpt.attention.default: _attention_onnx})
    program.save(str(path), external_data=big)
    onnx.checker.check_model(str(path))
