"""Heatmaps from a bundle's explain graph (torch-free): pixels → features and each patch's term of them, a label's
map as the patch terms read along the label's text direction, and the map drawn over the image.

The explain graph (`fvgpt export --explain`, docs/bundle-format.md "Explain graphs") is a second graph of the image
tower with the same weights; the plain tower graph, which POST /classify runs, is untouched. A label's map on the
(g, g) patch grid is patch_contrib · t, in units of cos(image feature, t) (fvgpt/explain.py): t is the row the
served head scores that label with — the zero-shot row for a zero-shot bundle, the adapted row G̃ for FVG-PT's base
head, the learned row for its new head (Prior Calibration's blend with CLIP and FDC's image adapter are nonlinear
and left out: the map follows the head's text direction).
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fvgpt.heatmap import overlay

from .manifest import Manifest
from .preprocess import crop_box
from .sessions import SESSIONS, SessionPool

OUTPUTS = ["features", "patch_contrib"]
DISPLAY_SIDE = 384  # the overlay PNG's longer side, at most (a thumbnail of the image)


class ExplainRunner:
    """One explain graph on ONNX Runtime: pixels (B, 3, S, S) → features (B, D), patch_contrib (B, P, D)."""

    def __init__(self, path: Path, manifest: Manifest, precision: str, threads: int | None = None,
                 pool: SessionPool = SESSIONS):
        graph = manifest.explain_graph(precision)
        self.precision, self.id = graph.precision, graph.id
        self._session, self.provider = pool.get(path / graph.file, manifest.files[graph.file], "cpu", threads)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, contrib = self._session.run(OUTPUTS, {"pixels": np.ascontiguousarray(pixels, np.float32)})
        return features, contrib


def label_grid(patch_contrib: np.ndarray, row: np.ndarray) -> np.ndarray:
    """One image's (P, D) patch terms read along one (D,) text row → the (g, g) map (row-major patches)."""
    values = patch_contrib.astype(np.float32) @ row.astype(np.float32)
    g = int(round(len(values) ** 0.5))
    return values.reshape(g, g)


@dataclass
class Display:
    """What an overlay is drawn on: a thumbnail of the decoded image and the box of it the tower saw."""

    image: Image.Image
    box: tuple[float, float, float, float]

    @classmethod
    def of(cls, image: Image.Image, cfg) -> Display:
        box = crop_box(*image.size, cfg)
        thumb = image.convert("RGB")
        thumb.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
        return cls(thumb, box)

    def png_base64(self, grid: np.ndarray) -> str:
        buf = io.BytesIO()
        overlay(self.image, grid, self.box).save(buf, format="PNG", optimize=False)
        return base64.b64encode(buf.getvalue()).decode("ascii")
