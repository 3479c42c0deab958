"""torch → ONNX for the three bundle graphs, with the batch (and label-set) axes kept dynamic.

Graphs are traced at batch 2, never 1, so no reshape inside attention is specialised to a single image
(anchors.md §C pitfall 2); tests run every graph at batches 1, 3 and 8 against torch.

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

from fvgpt.backbone import Backbone, TextEncoder

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


class TextGraph(nn.Module):
    """token ids (N, L) [+ use_context (N,)] → L2-normalised text features (N, D); the learned context is a constant."""

    def __init__(self, backbone: Backbone, ctx: torch.Tensor | None):
        super().__init__()
        self.encoder = TextEncoder(backbone)
        self.has_context = ctx is not None
        if ctx is not None:
            self.register_buffer("ctx", ctx.detach().clone())

    def forward(self, token_ids: torch.Tensor, use_context: torch.Tensor | None = None) -> torch.Tensor:
        if not self.has_context:
            return self.encoder(token_ids)
        return self.encoder(token_ids, self.ctx, use_context)


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
