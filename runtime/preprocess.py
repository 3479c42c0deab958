"""A bundle's preprocessing in PIL + NumPy (no torch), identical to open_clip's evaluation transform.

open_clip (resize_mode "shortest"): Resize(short side → size, bicubic) → CenterCrop(size) → RGB → ToTensor →
Normalize. Here the image is made RGB first (decoders hand us many modes); for RGB input the result is the
same tensor (tests/test_preprocess.py checks max |Δ| ≤ 1e-6 against open_clip on real photos). Grayscale images are
resized before they are made RGB: PIL resizes each band alike, so the result is identical and a 7000² grey PNG
costs a third of the memory and time.

`draft` is the one step serving adds before this (serving/README.md, "Decoding"): a large JPEG is decoded at 1/2,
1/4 or 1/8 scale by libjpeg's DCT scaling, keeping its short side at least DRAFT_FACTOR times the model's input, so
decoding costs in proportion to what the model sees rather than to the upload.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from fvgpt.preprocess import Preprocess

DRAFT_FACTOR = 4  # measured (serving/README.md): mean |Δ| ≤ 0.003, max ≤ 0.06 of the normalised pixels vs full decode

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any decoded image. 16-bit and 32-bit integer modes are scaled to 8 bits rather than clipped
    (PIL's plain convert would turn most 16-bit images white); alpha is dropped, as open_clip does."""
    image = _rgb_or_gray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _rgb_or_gray(image: Image.Image) -> Image.Image:
    """RGB, or 8-bit grayscale (L) for every single-band mode: what `to_rgb` makes RGB last."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def draft(image: Image.Image, cfgs: Iterable[Preprocess]) -> Image.Image:
    """A JPEG whose pixels are not loaded yet, set to decode at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps
    it at least DRAFT_FACTOR times every preprocessing's input (short side, or both sides for "squash"); any other
    image unchanged. `image.size` is then the size it will decode to."""
    if image.format != "JPEG":
        return image
    w, h = image.size
    short = min(w, h)
    need_w = need_h = 1
    for cfg in cfgs:
        side = DRAFT_FACTOR * cfg.size
        if cfg.resize_mode == "squash":
            need_w, need_h = max(need_w, side), max(need_h, side)
        else:
            need_w, need_h = max(need_w, -(-side * w // short)), max(need_h, -(-side * h // short))
    if need_w < w and need_h < h:
        image.draft(None, (need_w, need_h))
    return image


def _resize_shortest(image: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)  # torchvision's rounding (truncation)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), resample)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, cfg: Preprocess) -> np.ndarray:
    """One image → float32 (3, size, size), normalised."""
    image = _rgb_or_gray(image)
    resample = _INTERPOLATION[cfg.interpolation]
    if cfg.resize_mode == "squash":
        image = image.resize((cfg.size, cfg.size), resample)
    else:
        image = _center_crop(_resize_shortest(image, cfg.size, resample), cfg.size)
    arr = np.asarray(image.convert("RGB") if image.mode == "L" else image, dtype=np.float32)  # a new array
    arr /= np.float32(255.0)  # in place: the same operations in the same order, without three temporary copies
    arr -= np.asarray(cfg.mean, np.float32)
    arr /= np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
