"""How a server process finds its classifiers and runtime: environment variables set by `fvgpt serve` (or by hand for
`bentoml serve` / a container). Either FVGPT_REPOSITORY (a folder of classifiers) or FVGPT_BUNDLE (one bundle, served
as a repository of one). The batching knobs are read at import time because BentoML's @api decorator takes them
then; everything else is read when a service starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .limits import env_int

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

RUNTIMES = ("auto", "onnx", "openvino", "tensorrt")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_LATENCY_MS = 10_000
DEFAULT_POLL_S = 2.0


def max_batch_size() -> int:
    return env_int(MAX_BATCH_ENV, DEFAULT_MAX_BATCH, minimum=2)  # BentoML requires > 1


def max_latency_ms() -> int:
    return env_int(MAX_LATENCY_ENV, DEFAULT_MAX_LATENCY_MS)


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

    @classmethod
    def from_env(cls) -> ServeConfig:
        bundle = os.environ.get(BUNDLE_ENV, "").strip()
        repository = os.environ.get(REPOSITORY_ENV, "").strip()
        if bool(bundle) == bool(repository):
            raise ValueError(f"set exactly one of {REPOSITORY_ENV} (a folder of classifiers) and {BUNDLE_ENV} (one "
                             f"bundle); `fvgpt serve --repository DIR` or `fvgpt serve BUNDLE` sets it for you")
        runtime = os.environ.get(RUNTIME_ENV, "auto").strip() or "auto"
        if runtime not in RUNTIMES:
            raise ValueError(f"{RUNTIME_ENV}={runtime!r} is not one of {', '.join(RUNTIMES)}")
        threads = env_int(THREADS_ENV, 0, minimum=0) or None
        return cls(source=Path(bundle or repository), single=bool(bundle), runtime=runtime,
                   precision=os.environ.get(PRECISION_ENV, "").strip() or None, threads=threads,
                   decode_threads=env_int(DECODE_THREADS_ENV, 2), ready_ttl_s=env_int(READY_TTL_ENV, 10, minimum=0),
                   api_key=os.environ.get(API_KEY_ENV, "").strip() or None, poll_s=poll_seconds())


def poll_seconds() -> float:
    raw = os.environ.get(POLL_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_POLL_S
    except ValueError:
        raise ValueError(f"{POLL_ENV}={raw!r} is not a number of seconds") from None
    if not 0 <= value <= 86_400:
        raise ValueError(f"{POLL_ENV}={value} must be between 0 (no polling) and 86400 seconds")
    return value
