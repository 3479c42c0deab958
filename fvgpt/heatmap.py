"""Heatmaps drawn over images (torch-free: NumPy and PIL): what `POST /explain` returns as a PNG and what
`fvgpt eval --attention` draws in its figure.

A map is a (g, g) grid over the preprocessed (centre-cropped or squashed) square the tower saw, so it is drawn only
inside that square's box in the original image; the rest of the image is left as it is. Negative values (patches
that pull away from the label) are not drawn: the map is ReLU'd, then scaled by its maximum, for display only.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

ALPHA = 0.55  # the map's opacity where it is strongest
# a perceptually ordered ramp (dark blue → cyan → yellow → red), 5 stops interpolated to 256 entries
_STOPS = np.array([[0, 0, 96], [0, 128, 255], [0, 230, 200], [255, 230, 0], [230, 0, 0]], np.float32)
LUT = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _STOPS[:, c]) for c in range(3)], -1).astype(np.uint8)


def normalised(grid: np.ndarray) -> np.ndarray:
    """ReLU, then divided by the maximum: values in [0, 1] (all zeros when nothing is positive)."""
    pos = np.maximum(np.asarray(grid, np.float32), 0)
    top = float(pos.max()) if pos.size else 0.0
    return pos / top if top > 0 else pos


def overlay(image: Image.Image, grid: np.ndarray, box: tuple[float, float, float, float]) -> Image.Image:
    """`image` (any mode) with `grid` tinted over `box` (x0, y0, x1, y1 as fractions of its width and height)."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    x0, y0, x1, y1 = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    if x1 <= x0 or y1 <= y0:
        return rgb
    heat = normalised(grid)
    level = Image.fromarray((heat * 255).astype(np.uint8)).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    level_arr = np.asarray(level)
    colour = LUT[level_arr].astype(np.float32)
    alpha = (ALPHA * level_arr.astype(np.float32) / 255)[..., None]
    out = np.asarray(rgb, np.float32).copy()
    out[y0:y1, x0:x1] = (1 - alpha) * out[y0:y1, x0:x1] + alpha * colour
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
