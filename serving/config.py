"""How a server process finds its classifiers and runtime: environment variables set by `fvgpt serve` (or by hand for
`bentoml serve` / a container). Either FVGPT_REPOSITORY (a folder of classifiers) or FVGPT_BUNDLE (one bundle, served
as a repository of one). The batching knobs are read at import time because BentoML's @api decorator takes them
then; everything else is read when a service starts.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .admission import PARSE_COPIES
from .limits import Limits, env_float, env_int

BUNDLE_ENV = "FVGPT_BUNDLE"
REPOSITORY_ENV = "FVGPT_REPOSITORY"
POLL_ENV = "FVGPT_POLL_S"
RUNTIME_ENV = "FVGPT_RUNTIME"
PRECISION_ENV = "FVGPT_PRECISION"
THREADS_ENV = "FVGPT_THREADS"
MAX_BATCH_ENV = "FVGPT_MAX_BATCH_SIZE"
MAX_LATENCY_ENV = "FVGPT_MAX_LATENCY_MS"
DECODE_THREADS_ENV = "FVGPT_DECODE_THREADS"
READY_TTL_ENV = "FVGPT_READY_TTL_S"
API_KEY_ENV = "FVGPT_API_KEY"
DRAIN_ENV = "FVGPT_DRAIN_TIMEOUT_S"
HEADER_TIMEOUT_ENV = "FVGPT_HEADER_TIMEOUT_S"
BODY_TIMEOUT_ENV = "FVGPT_BODY_TIMEOUT_S"
JPEG_DRAFT_ENV = "FVGPT_JPEG_DRAFT"

RUNTIMES = ("auto", "onnx", "openvino", "tensorrt")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_LATENCY_MS = 10_000
DEFAULT_POLL_S = 2.0
DEFAULT_DRAIN_S = 30.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0


def max_batch_size(environ: Mapping[str, str] | None = None) -> int:
    return env_int(MAX_BATCH_ENV, DEFAULT_MAX_BATCH, minimum=2, environ=environ)  # BentoML requires > 1


def max_latency_ms(environ: Mapping[str, str] | None = None) -> int:
    return env_int(MAX_LATENCY_ENV, DEFAULT_MAX_LATENCY_MS, environ=environ)


@dataclass(frozen=True)
class ServeConfig:
    source: Path  # the repository folder, or the one bundle
    single: bool = False  # source is one bundle (FVGPT_BUNDLE), not a folder of classifiers
    runtime: str = "auto"
    precision: str | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads of each tower (None: one per core)
    decode_threads: int = 2  # threads decoding and preprocessing images in the API process
    ready_ttl_s: int = 10  # a successful inference younger than this makes /readyz skip its canary
    api_key: str | None = None
    poll_s: float = DEFAULT_POLL_S  # seconds between scans of the repository for changes; 0: only POST /admin/reload
    drain_s: float = DEFAULT_DRAIN_S  # on SIGTERM: how long requests in flight may take before they are cancelled
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # a request's line and headers must arrive within this
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # ... and its body within this after its headers
    jpeg_draft: bool = True  # decode large JPEGs at a reduced scale (serving/decode.py, "JPEG draft")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeConfig:
        env = os.environ if environ is None else environ
        bundle = env.get(BUNDLE_ENV, "").strip()
        repository = env.get(REPOSITORY_ENV, "").strip()
        if bool(bundle) == bool(repository):
            raise ValueError(f"set exactly one of {REPOSITORY_ENV} (a folder of classifiers) and {BUNDLE_ENV} (one "
                             f"bundle); `fvgpt serve --repository DIR` or `fvgpt serve BUNDLE` sets it for you")
        runtime = env.get(RUNTIME_ENV, "auto").strip() or "auto"
        if runtime not in RUNTIMES:
            raise ValueError(f"{RUNTIME_ENV}={runtime!r} is not one of {', '.join(RUNTIMES)}")
        return cls(source=Path(bundle or repository), single=bool(bundle), runtime=runtime,
                   precision=env.get(PRECISION_ENV, "").strip() or None,
                   threads=env_int(THREADS_ENV, 0, minimum=0, environ=env) or None,
                   decode_threads=env_int(DECODE_THREADS_ENV, 2, environ=env),
                   ready_ttl_s=env_int(READY_TTL_ENV, 10, minimum=0, environ=env),
                   api_key=env.get(API_KEY_ENV, "").strip() or None,
                   poll_s=env_float(POLL_ENV, DEFAULT_POLL_S, 0, 86_400, "0 (no polling) and 86400 seconds", env),
                   drain_s=env_float(DRAIN_ENV, DEFAULT_DRAIN_S, 0, 3600, environ=env),
                   header_timeout_s=env_float(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S, 0.1, 3600, environ=env),
                   body_timeout_s=env_float(BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT_S, 0.1, 3600, environ=env),
                   jpeg_draft=bool(env_int(JPEG_DRAFT_ENV, 1, minimum=0, environ=env)))


def check_config(environ: Mapping[str, str] | None = None) -> tuple[ServeConfig, Limits]:
    """Every setting a server process reads from `environ`, parsed and checked together: a ValueError names the
    first bad one. `fvgpt serve` runs it before starting the server, and the server's deployment hook before any
    worker starts, so a bad setting stops the server with its message instead of making its workers crash-loop."""
    cfg, limits = ServeConfig.from_env(environ), Limits.from_env(environ)
    max_batch_size(environ), max_latency_ms(environ)
    if limits.max_inflight_bytes < PARSE_COPIES * limits.max_request_bytes:
        raise ValueError(f"FVGPT_MAX_INFLIGHT_BYTES={limits.max_inflight_bytes} must be at least "
                         f"{PARSE_COPIES} × FVGPT_MAX_REQUEST_BYTES ({PARSE_COPIES * limits.max_request_bytes}): a "
                         f"request of the largest size could never be admitted")
    return cfg, limits
