"""torch → ONNX for the three bundle graphs, with the batch (and label-set) axes kept dynamic.

Graphs are traced at batch 2, never 1, so no reshape inside attention is specialised to a single image
(anchors.md §C pitfall 2); tests run every graph at batches 1, 3 and 8 against torch.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
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


def export_graph(module: nn.Module, example: dict[str, torch.Tensor], path: Path, output_names: list[str],
                 dynamic: dict[str, dict[int, str]], opset: int, max_dims: dict[str, int]) -> None:
    """Export with torch.export (the supported exporter); `dynamic` names each input's dynamic axes."""
    dims = {name: torch.export.Dim(name, min=1, max=max_dims.get(name, 1 << 16))
            for axes in dynamic.values() for name in axes.values()}
    shapes = {arg: {axis: dims[name] for axis, name in dynamic.get(arg, {}).items()} or None for arg in example}
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > TWO_GB * 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter; failures still raise
        program = torch.onnx.export(module.eval(), kwargs=example, dynamo=True, input_names=list(example),
                                    output_names=output_names, dynamic_shapes=shapes, opset_version=opset,
                                    external_data=big, verbose=False, report=False)
    program.save(str(path), external_data=big)
    onnx.checker.check_model(str(path))
