"""Untrusted bytes → preprocessed pixels, with the safety checks a public endpoint needs.

Only raster formats whose PIL decoders are self-contained are accepted (no EPS: PIL would run Ghostscript). The pixel
count is checked from the header, before any pixel is decoded, so decompression bombs cost nothing; PIL's own limit
is set to the same value as a second line. Every mode PIL decodes (RGB, RGBA, L, LA, P, CMYK, 16-bit, 32-bit) is
accepted and made RGB by fvgpt_runtime.preprocess.to_rgb, exactly as the parity and training pipelines do. EXIF orientation
is not applied, as in open_clip and in training.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from fvgpt.preprocess import Preprocess
from fvgpt_runtime.preprocess import preprocess

from .errors import ApiError
from .limits import Limits

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def configure_pil(limits: Limits) -> None:
    """Process-wide PIL settings: bombs over twice the limit raise in Image.open; between one and two times the limit
    PIL only warns, and decode_image rejects them itself (a warnings filter per call would not be thread-safe)."""
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_base64(text: str, name: str) -> bytes:
    """Plain base64 or a data URI (data:image/png;base64,...); whitespace and line breaks are ignored."""
    text = text.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{name} is a data URI without ';base64,': only base64 data URIs are accepted")
    elif _URL.match(text):
        raise ApiError(400, f"{name} looks like a URL: URLs are not fetched, send the image bytes in base64")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{name} is not valid base64 ({exc})") from None


def decode_image(data: bytes, limits: Limits, name: str) -> Image.Image:
    """Decoded image, any mode; ApiError (4xx) for anything that is not a safe, complete image."""
    if not data:
        raise ApiError(400, f"{name} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{name} has too many pixels ({exc}); the limit is {limits.max_image_pixels} "
                            f"(FVGPT_MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"{name} is not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is the client's problem
        raise ApiError(400, f"{name} could not be read ({exc})") from None
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise ApiError(413, f"{name} is {w}×{h} = {w * h} pixels; the limit is {limits.max_image_pixels} "
                            f"(FVGPT_MAX_IMAGE_PIXELS)")
    if min(w, h) < 1:
        raise ApiError(400, f"{name} is {w}×{h}: it has no pixels")
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise ApiError(400, f"{name} is {w}×{h}: its aspect ratio is over the limit of "
                            f"{limits.max_aspect_ratio}:1 (FVGPT_MAX_ASPECT_RATIO)")
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        raise ApiError(400, f"{name} is corrupt or truncated ({exc})") from None
    return image


def to_pixels(images: list[bytes], cfgs: list[Preprocess], limits: Limits, names: list[str]) -> list[np.ndarray]:
    """One (N, 3, S, S) float32 batch per preprocessing in `cfgs` (one per tower a request uses), exactly as the
    bundles' manifests say. Each image is decoded once and dropped as soon as it is preprocessed, so at most one
    full-size image per calling thread is alive."""
    out = [np.empty((len(images), 3, cfg.size, cfg.size), np.float32) for cfg in cfgs]
    for i, (data, name) in enumerate(zip(images, names)):
        image = decode_image(data, limits, name)
        for batch, cfg in zip(out, cfgs):
            try:
                batch[i] = preprocess(image, cfg)
            except (ValueError, OSError) as exc:  # e.g. a LAB TIFF: PIL has no conversion to RGB
                raise ApiError(400, f"{name} (mode {image.mode}) cannot be made RGB ({exc})") from None
    return out
