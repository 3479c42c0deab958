"""Untrusted bytes → preprocessed pixels, with the safety checks a public endpoint needs, at a bounded and fair cost.

Only raster formats whose PIL decoders are self-contained are accepted (no EPS: PIL would run Ghostscript). The pixel
count is checked from the header, before any pixel is decoded, so decompression bombs cost nothing; PIL's own limit
is set to the same value as a second line. Every mode PIL decodes (RGB, RGBA, L, LA, P, CMYK, 16-bit, 32-bit) is
accepted and made RGB by fvgpt_runtime.preprocess, exactly as the parity and training pipelines do. EXIF orientation
is not applied, as in open_clip and in training.

Cost. Each image is first opened (header only) and, if it is a large JPEG, set to decode at a reduced DCT scale
(fvgpt_runtime.preprocess.draft; FVGPT_JPEG_DRAFT=0 turns that off). The pixels a request's images decode to,
together, must fit FVGPT_MAX_REQUEST_PIXELS (413 otherwise): 16 grey 7000² PNGs are 745 KB on the wire but 784 M
pixels to inflate. What decoding will hold at most (`decode_peak`) is then reserved in the admission budget
(serving/admission.py), or the request gets a 503. Decoding runs one slice per image on FVGPT_DECODE_THREADS threads
(DecodeScheduler), fairly across requests: a free thread takes the next image of the request that has started the
fewest, so a light request waits at most for the slices already running, never for a heavy request's queue.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import itertools
import re
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fvgpt.preprocess import Preprocess
from fvgpt_runtime.preprocess import draft, preprocess

from .errors import ApiError
from .limits import Limits

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG", "image/png": "PNG",
               "image/webp": "WEBP", "image/gif": "GIF", "image/bmp": "BMP", "image/x-ms-bmp": "BMP",
               "image/tiff": "TIFF"}
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}  # PIL's storage; other modes: 4
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # made 8-bit grey through a float64 array
KEPT_MODES = ("RGB", "L")  # preprocessed as they are; other modes get an RGB copy first
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def configure_pil(limits: Limits) -> None:
    """Process-wide PIL settings: bombs over twice the limit raise in Image.open; between one and two times the limit
    PIL only warns, and open_image rejects them itself (a warnings filter per call would not be thread-safe)."""
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_base64(text: str, name: str) -> bytes:
    """Plain base64 or a data URI (data:image/png;base64,...); whitespace and line breaks are ignored. A data URI
    must declare an image type this server decodes, and the bytes must be of that type."""
    text = text.strip()
    declared = None
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{name} is a data URI without ';base64,': only base64 data URIs are accepted")
        declared = header[5:].split(";")[0].strip().lower() or None
        if declared is not None and declared not in MEDIA_TYPES:
            raise ApiError(400, f"{name} is a data URI of type {declared}: {declared} is not an image type this "
                                f"server decodes ({', '.join(sorted(MEDIA_TYPES))})")
    elif _URL.match(text):
        raise ApiError(400, f"{name} looks like a URL: URLs are not fetched, send the image bytes in base64")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{name} is not valid base64 ({exc})") from None
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
        raise ApiError(400, f"{name} is declared {declared} but is {actual}") from None
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


def open_image(data: bytes, limits: Limits, name: str, cfgs: list[Preprocess], jpeg_draft: bool) -> Opened:
    """Header checks; ApiError (4xx) for anything that is not a safe image in a supported format."""
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
    return Opened(name, draft(image, cfgs) if jpeg_draft else image)


def open_images(images: list[bytes], names: list[str], cfgs: list[Preprocess], limits: Limits,
                jpeg_draft: bool) -> list[Opened]:
    """Every image opened, and the request's pixel budget checked, before any pixel is decoded."""
    opened = [open_image(data, limits, name, cfgs, jpeg_draft) for data, name in zip(images, names)]
    total = sum(o.pixels for o in opened)
    if total > limits.max_request_pixels:
        raise ApiError(413, f"the request's images decode to {total} pixels together; the limit is "
                            f"{limits.max_request_pixels} per request (FVGPT_MAX_REQUEST_PIXELS): send fewer or "
                            f"smaller images per request")
    return opened


def decode_peak(opened: list[Opened], threads: int) -> int:
    """The most a request's decoding holds at once: its `threads` largest images decoding side by side."""
    return sum(sorted((o.nbytes for o in opened), reverse=True)[:threads])


def decode_slice(opened: Opened, cfgs: list[Preprocess]) -> list[np.ndarray]:
    """One image decoded and preprocessed once per preprocessing in `cfgs`: (3, S, S) float32 each; the full-size
    image is dropped at the end."""
    image = opened.image
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        raise ApiError(400, f"{opened.name} is corrupt or truncated ({exc})") from None
    try:
        return [preprocess(image, cfg) for cfg in cfgs]
    except (ValueError, OSError) as exc:  # e.g. a LAB TIFF: PIL has no conversion to RGB
        raise ApiError(400, f"{opened.name} (mode {image.mode}) cannot be made RGB ({exc})") from None
    finally:
        image.close()


@dataclass(eq=False)
class _Request:
    seq: int
    jobs: list[Callable[[], Any]]
    futures: list[asyncio.Future]
    started: int = 0


class DecodeScheduler:
    """Decode slices of every request in flight on `threads` threads. Least started first: a free thread takes the
    next slice of the waiting request that has started the fewest (the oldest among equals), so a request arriving
    behind heavy ones starts at the next free thread. Runs on the event loop; only the slices run in threads."""

    def __init__(self, threads: int):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fvgpt-decode")
        self._waiting: list[_Request] = []
        self._running = 0
        self._seq = itertools.count()

    async def run(self, jobs: list[Callable[[], Any]]) -> list[Any]:
        """The jobs' results in order; the first failure is raised and the request's unstarted slices dropped."""
        loop = asyncio.get_running_loop()
        req = _Request(next(self._seq), jobs, [loop.create_future() for _ in jobs])
        self._waiting.append(req)
        self._dispatch(loop)
        try:
            return list(await asyncio.gather(*req.futures))
        finally:
            if req in self._waiting:
                self._waiting.remove(req)
            for fut in req.futures:
                fut.cancel()  # no-op on finished ones; unstarted slices never run

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running < self.threads and self._waiting:
            req = min(self._waiting, key=lambda r: (r.started, r.seq))
            i = req.started
            req.started += 1
            if req.started == len(req.jobs):
                self._waiting.remove(req)
            self._running += 1
            task = self._pool.submit(req.jobs[i])
            task.add_done_callback(lambda t, req=req, i=i: loop.call_soon_threadsafe(self._finished, loop, req, i, t))

    def _finished(self, loop: asyncio.AbstractEventLoop, req: _Request, i: int, task: Future) -> None:
        self._running -= 1
        fut = req.futures[i]
        if not fut.done():
            if (exc := task.exception()) is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(task.result())
        self._dispatch(loop)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
