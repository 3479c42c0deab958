"""Request limits of the HTTP service, each overridable by an environment variable (documented in serving/README.md).

Read once per server process. They bound what one request can cost: bytes read, pixels decoded, images in a batch,
labels pushed through the text graph, classifiers whose heads run; and what all requests in flight hold together
(serving/admission.py).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import ClassVar


def env_int(name: str, default: int, minimum: int = 1, environ: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(name: str, default: float, minimum: float, maximum: float, between: str | None = None,
              environ: Mapping[str, str] | None = None) -> float:
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not minimum <= value <= maximum:
        raise ValueError(f"{name}={value:g} must be between {between or f'{minimum:g} and {maximum:g} seconds'}")
    return value


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 32 << 20  # whole body, multipart or JSON (base64 adds a third)
    max_image_pixels: int = 50_000_000  # width × height before decoding: decompression bombs stop here
    max_request_pixels: int = 100_000_000  # pixels a request's images decode to, together (after JPEG draft)
    max_inflight_bytes: int = 256 << 20  # bodies and images being decoded, all requests together: over it, 503
    max_aspect_ratio: int = 32  # long side / short side: the short-side resize of a 1×N image would be S×(S·N)
    max_images: int = 16
    max_labels: int = 64
    max_label_chars: int = 100  # CLIP's context is 77 tokens; longer labels would be silently truncated
    max_models: int = 1024  # classifiers one request may name (also what "models": "*" may expand to)
    default_top_k: int = 5

    ENV: ClassVar[dict[str, str]] = {
        "max_request_bytes": "FVGPT_MAX_REQUEST_BYTES",
        "max_image_pixels": "FVGPT_MAX_IMAGE_PIXELS",
        "max_request_pixels": "FVGPT_MAX_REQUEST_PIXELS",
        "max_inflight_bytes": "FVGPT_MAX_INFLIGHT_BYTES",
        "max_aspect_ratio": "FVGPT_MAX_ASPECT_RATIO",
        "max_images": "FVGPT_MAX_IMAGES",
        "max_labels": "FVGPT_MAX_LABELS",
        "max_label_chars": "FVGPT_MAX_LABEL_CHARS",
        "max_models": "FVGPT_MAX_MODELS",
        "default_top_k": "FVGPT_DEFAULT_TOP_K",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        defaults = cls()
        return cls(**{field: env_int(var, getattr(defaults, field), environ=environ) for field, var in cls.ENV.items()})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
