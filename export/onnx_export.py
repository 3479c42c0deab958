"""torch → ONNX for the three bundle graphs, with the batch (and label-set) axes kept dynamic.

Graphs are traced at batch 2, never 1, so no reshape inside attention is specialised to a single image
(anchors.md §C pitfall 2); tests run every graph at batches 1, 3 and 8 against torch.

At opset ≥ 23 scaled-dot-product attention exports as one ONNX `Attention` op and GELU as `Gelu`, which ONNX Runtime
runs as fused kernels. nn.MultiheadAttention reaches SDPA only after moving to sequence-first layout, which leaves
seven Transposes per block in the graph; `export_friendly_attention` swaps in the same math in batch-first layout for
the duration of the export. The parity gate compares the exported graph against the *unswapped* torch model.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from fvgpt.backbone import Backbone, TextEncoder

TRACE_BATCH = 2
TWO_GB = 2 * 1024**3


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


class _BatchFirstSelfAttention(nn.Module):
    """nn.MultiheadAttention(batch_first=True) self-attention: one QKV projection, SDPA, output projection."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.heads = mha.num_heads
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        b, s, d = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(b, s, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d)), None


@contextmanager
def export_friendly_attention(module: nn.Module) -> Iterator[None]:
    """Temporarily replace every batch-first self-attention nn.MultiheadAttention inside `module`."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if (isinstance(child, nn.MultiheadAttention) and child.batch_first and child._qkv_same_embed_dim
                    and child.in_proj_bias is not None):
                swapped.append((parent, name, child))
                setattr(parent, name, _BatchFirstSelfAttention(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def export_graph(module: nn.Module, example: dict[str, torch.Tensor], path: Path, output_names: list[str],
                 dynamic: dict[str, dict[int, str]], opset: int, max_dims: dict[str, int]) -> None:
    """Export with torch.export (the supported exporter); `dynamic` names each input's dynamic axes."""
    dims = {name: torch.export.Dim(name, min=1, max=max_dims.get(name, 1 << 16))
            for axes in dynamic.values() for name in axes.values()}
    shapes = {arg: {axis: dims[name] for axis, name in dynamic.get(arg, {}).items()} or None for arg in example}
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > TWO_GB * 0.9
    with warnings.catch_warnings(), export_friendly_attention(module):
        warnings.simplefilter("ignore")  # exporter chatter; failures still raise
        program = torch.onnx.export(module.eval(), kwargs=example, dynamo=True, input_names=list(example),
                                    output_names=output_names, dynamic_shapes=shapes, opset_version=opset,
                                    external_data=big, verbose=False, report=False)
    program.save(str(path), external_data=big)
    onnx.checker.check_model(str(path))
