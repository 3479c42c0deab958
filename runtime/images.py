"""Untrusted image bytes → a checked image → preprocessed pixels: the one decode path of everything that classifies
images sent by someone else (the HTTP server, the Python API, batch).

Only raster formats whose PIL decoders are self-contained are accepted (no EPS: PIL would run Ghostscript). The pixel
count is checked from the header, before any pixel is decoded, so decompression bombs cost nothing; PIL's own limit
is set to the same value as a second line (`configure_pil`). Every mode PIL decodes (RGB, RGBA, L, LA, P, CMYK,
16-bit, 32-bit) is accepted and made RGB by fvgpt_runtime.preprocess, exactly as the parity and training pipelines
do. EXIF orientation is not applied, as in open_clip and in training.

Each image is first opened (`open_image`: header only) and, if it is a large JPEG, set to decode at a reduced DCT
scale (fvgpt_runtime.preprocess.draft); `Opened.pixels` and `Opened.nbytes` then say what decoding it will cost
before it is paid. `load` decodes, `to_pixels` preprocesses once per preprocessing asked for.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fvgpt.errors import FVGPTError
from fvgpt.preprocess import Preprocess

from .preprocess import draft, preprocess

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG", "image/png": "PNG",
               "image/webp": "WEBP", "image/gif": "GIF", "image/bmp": "BMP", "image/x-ms-bmp": "BMP",
               "image/tiff": "TIFF"}
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}  # PIL's storage; other modes: 4
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # made 8-bit grey through a float64 array
KEPT_MODES = ("RGB", "L")  # preprocessed as they are; other modes get an RGB copy first
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class InputError(FVGPTError):
    """An input that cannot be classified as sent; the message names it and the problem. `too_large`: it is over a
    size limit (a server answers 413), else it is malformed (400)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class PixelLimits:
    max_image_pixels: int = 50_000_000  # width × height before decoding: decompression bombs stop here
    max_aspect_ratio: int = 32  # long side / short side: the short-side resize of a 1×N image would be S×(S·N)


def configure_pil(max_image_pixels: int) -> None:
    """Process-wide PIL settings: bombs over twice the limit raise in Image.open; between one and two times the limit
    PIL only warns, and open_image rejects them itself (a warnings filter per call would not be thread-safe)."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_base64(text: str, name: str) -> bytes:
    """Plain base64 or a data URI (data:image/png;base64,...; the scheme, type and `base64` in any case, RFC 2397);
    whitespace and line breaks are ignored. A data URI must declare an image type this runtime decodes, and the bytes
    must be of that type. A URL is refused: nothing is ever fetched."""
    text = text.strip()
    declared = None
    if text[:5].lower() == "data:":
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InputError(f"{name} is a data URI without ';base64,': only base64 data URIs are accepted")
        declared = header[5:].split(";")[0].strip().lower() or None
        if declared is not None and declared not in MEDIA_TYPES:
            raise InputError(f"{name} is a data URI of type {declared}: {declared} is not an image type this server "
                             f"decodes ({', '.join(sorted(MEDIA_TYPES))})")
    elif _URL.match(text):
        raise InputError(f"{name} looks like a URL: URLs are not fetched, send the image bytes in base64")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{name} is not valid base64 ({exc})") from None
    if declared is not None:
        check_declared(data, declared, name)
    return data


def check_declared(data: bytes, declared: str, name: str) -> None:
    """The bytes are of the declared type (from their header; anything else wrong is decoding's to report)."""
    try:
        Image.open(io.BytesIO(data), formats=[MEDIA_TYPES[declared]]).close()
    except UnidentifiedImageError:
        try:
            actual = f"a {Image.open(io.BytesIO(data), formats=FORMATS).format}"
        except Exception:  # noqa: BLE001 - what it is instead only words the message
            actual = "not an image in a supported format"
        raise InputError(f"{name} is declared {declared} but is {actual}") from None
    except Exception:  # noqa: BLE001 - of the declared type but unreadable: decoding reports why
        pass


@dataclass
class Opened:
    """One image with its header read and its pixels not yet decoded; `image.size` is the size it decodes to."""

    name: str
    image: Image.Image

    @property
    def pixels(self) -> int:
        return self.image.size[0] * self.image.size[1]

    @property
    def nbytes(self) -> int:
        """What decoding and preprocessing it holds at most: the decoded pixels, plus an RGB copy (modes other than
        RGB and grey) or the float64 and 8-bit arrays 16/32-bit images are scaled through."""
        mode = self.image.mode
        extra = 9 if mode in WIDE_MODES else 0 if mode in KEPT_MODES else 4
        return self.pixels * (BYTES_PER_PIXEL.get(mode, 4) + extra)


def open_image(data: bytes, name: str, limits: PixelLimits, cfgs: list[Preprocess], jpeg_draft: bool = True
               ) -> Opened:
    """Header checks; an InputError for anything that is not a safe image in a supported format. A large JPEG is set
    to decode at the reduced scale `cfgs` need (jpeg_draft=False: at full size)."""
    if not data:
        raise InputError(f"{name} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name} has too many pixels ({exc}); the limit is {limits.max_image_pixels} "
                         f"(FVGPT_MAX_IMAGE_PIXELS)", too_large=True) from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is the sender's problem
        raise InputError(f"{name} could not be read ({exc})") from None
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise InputError(f"{name} is {w}×{h} = {w * h} pixels; the limit is {limits.max_image_pixels} "
                         f"(FVGPT_MAX_IMAGE_PIXELS)", too_large=True)
    if min(w, h) < 1:
        raise InputError(f"{name} is {w}×{h}: it has no pixels")
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise InputError(f"{name} is {w}×{h}: its aspect ratio is over the limit of {limits.max_aspect_ratio}:1 "
                         f"(FVGPT_MAX_ASPECT_RATIO)")
    return Opened(name, draft(image, cfgs) if jpeg_draft else image)


def load(opened: Opened) -> None:
    """Decode the pixels (at the draft scale, if set)."""
    try:
        opened.image.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        opened.image.close()
        raise InputError(f"{opened.name} is corrupt or truncated ({exc})") from None


def to_pixels(opened: Opened, cfgs: list[Preprocess]) -> list[np.ndarray]:
    """A loaded image preprocessed once per preprocessing in `cfgs`: (3, S, S) float32 each; the image is closed at
    the end."""
    image = opened.image
    try:
        return [preprocess(image, cfg) for cfg in cfgs]
    except (ValueError, OSError) as exc:  # e.g. a LAB TIFF: PIL has no conversion to RGB
        raise InputError(f"{opened.name} (mode {image.mode}) cannot be made RGB ({exc})") from None
    finally:
        image.close()
