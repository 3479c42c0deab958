"""Every setting of a server, typed, from the FVGPT_* environment variables (documented in serving/README.md):
where its classifiers are, how the towers run and batch, how long things may take, and the limits that bound what one
request (and all requests in flight together) can cost.

`fvgpt serve` sets the variables from its options; `bentoml serve` started by hand (or in a container) reads what
the environment holds. `check` parses them all at once, so a bad one is refused with its name before a server starts.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from fvgpt_runtime.images import PixelLimits

BUNDLE_ENV = "FVGPT_BUNDLE"
REPOSITORY_ENV = "FVGPT_REPOSITORY"
API_KEY_ENV = "FVGPT_API_KEY"
RUNTIMES = ("auto", "onnx", "openvino", "tensorrt")
TOWER_WORKERS = ("process", "thread")
PARSE_COPIES = 2  # a body is held twice while it is parsed (multipart file parts; base64 text and its bytes)


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float, maximum: float,
              between: str | None = None) -> float:
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not minimum <= value <= maximum:
        raise ValueError(f"{name}={value:g} must be between {between or f'{minimum:g} and {maximum:g} seconds'}")
    return value


@dataclass(frozen=True)
class Limits:
    """What one request may cost, and what all requests in flight may hold together (engine/admission.py)."""

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
        env = os.environ if environ is None else environ
        defaults = cls()
        limits = cls(**{name: env_int(env, var, getattr(defaults, name)) for name, var in cls.ENV.items()})
        if limits.max_inflight_bytes < PARSE_COPIES * limits.max_request_bytes:
            raise ValueError(f"FVGPT_MAX_INFLIGHT_BYTES={limits.max_inflight_bytes} must be at least {PARSE_COPIES} × "
                             f"FVGPT_MAX_REQUEST_BYTES ({PARSE_COPIES * limits.max_request_bytes}): a request of the "
                             f"largest size could never be admitted")
        return limits

    @property
    def pixels(self) -> PixelLimits:
        return PixelLimits(self.max_image_pixels, self.max_aspect_ratio)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    source: Path  # the repository folder, or the one bundle
    single: bool = False  # source is one bundle (FVGPT_BUNDLE), not a folder of classifiers
    runtime: str = "auto"
    precision: str | None = None
    threads: int | None = None  # intra-op threads of each tower (None: one per core)
    max_batch_size: int = 8  # images per tower batch, across requests
    max_latency_ms: int = 10_000  # queue wait + inference: a request estimated to take longer gets a 503
    tower_worker: str = "process"  # the towers run in a child process (crash isolation) or a thread of this one
    decode_threads: int = 2  # threads decoding and preprocessing images
    ready_ttl_s: int = 10  # a successful inference younger than this makes readiness skip its canary
    api_key: str | None = field(default=None, repr=False)
    poll_s: float = 2.0  # seconds between scans of the repository for changes; 0: only on reload
    drain_s: float = 30.0  # on SIGTERM: how long requests in flight may take before they are cancelled
    header_timeout_s: float = 10.0  # a request's line and headers must arrive within this
    body_timeout_s: float = 30.0  # ... and its body within this after its headers
    jpeg_draft: bool = True  # decode large JPEGs at a reduced scale (fvgpt_runtime.preprocess.draft)
    limits: Limits = field(default_factory=Limits)

    ENV: ClassVar[dict[str, str]] = {
        "poll_s": "FVGPT_POLL_S", "runtime": "FVGPT_RUNTIME", "precision": "FVGPT_PRECISION",
        "threads": "FVGPT_THREADS", "max_batch_size": "FVGPT_MAX_BATCH_SIZE", "max_latency_ms": "FVGPT_MAX_LATENCY_MS",
        "tower_worker": "FVGPT_TOWER_WORKER", "decode_threads": "FVGPT_DECODE_THREADS",
        "ready_ttl_s": "FVGPT_READY_TTL_S", "drain_s": "FVGPT_DRAIN_TIMEOUT_S",
        "header_timeout_s": "FVGPT_HEADER_TIMEOUT_S", "body_timeout_s": "FVGPT_BODY_TIMEOUT_S",
        "jpeg_draft": "FVGPT_JPEG_DRAFT",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Every FVGPT_* setting parsed and checked; a ValueError names the first bad one."""
        env = os.environ if environ is None else environ
        v = cls.ENV
        bundle, repository = env.get(BUNDLE_ENV, "").strip(), env.get(REPOSITORY_ENV, "").strip()
        if bool(bundle) == bool(repository):
            raise ValueError(f"set exactly one of {REPOSITORY_ENV} (a folder of classifiers) and {BUNDLE_ENV} (one "
                             f"bundle); `fvgpt serve --repository DIR` or `fvgpt serve BUNDLE` sets it for you")
        runtime = env.get(v["runtime"], "").strip() or "auto"
        if runtime not in RUNTIMES:
            raise ValueError(f"{v['runtime']}={runtime!r} is not one of {', '.join(RUNTIMES)}")
        worker = env.get(v["tower_worker"], "").strip() or "process"
        if worker not in TOWER_WORKERS:
            raise ValueError(f"{v['tower_worker']}={worker!r} is not one of {', '.join(TOWER_WORKERS)}")
        d = cls(Path())
        return cls(source=Path(bundle or repository), single=bool(bundle), runtime=runtime,
                   precision=env.get(v["precision"], "").strip() or None,
                   threads=env_int(env, v["threads"], 0, minimum=0) or None,
                   max_batch_size=env_int(env, v["max_batch_size"], d.max_batch_size, minimum=1),
                   max_latency_ms=env_int(env, v["max_latency_ms"], d.max_latency_ms),
                   tower_worker=worker,
                   decode_threads=env_int(env, v["decode_threads"], d.decode_threads),
                   ready_ttl_s=env_int(env, v["ready_ttl_s"], d.ready_ttl_s, minimum=0),
                   api_key=env.get(API_KEY_ENV, "").strip() or None,
                   poll_s=env_float(env, v["poll_s"], d.poll_s, 0, 86_400, "0 (no polling) and 86400 seconds"),
                   drain_s=env_float(env, v["drain_s"], d.drain_s, 0, 3600),
                   header_timeout_s=env_float(env, v["header_timeout_s"], d.header_timeout_s, 0.1, 3600),
                   body_timeout_s=env_float(env, v["body_timeout_s"], d.body_timeout_s, 0.1, 3600),
                   jpeg_draft=bool(env_int(env, v["jpeg_draft"], 1, minimum=0)),
                   limits=Limits.from_env(env))
