"""How a server process finds its bundle and runtime: environment variables set by `fvgpt serve` (or by hand for
`bentoml serve` / a container). The batching knobs are read at import time because BentoML's @api decorator takes
them then; everything else is read when a service starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .limits import env_int

BUNDLE_ENV = "FVGPT_BUNDLE"
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


def max_batch_size() -> int:
    return env_int(MAX_BATCH_ENV, DEFAULT_MAX_BATCH, minimum=2)  # BentoML requires > 1


def max_latency_ms() -> int:
    return env_int(MAX_LATENCY_ENV, DEFAULT_MAX_LATENCY_MS)


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    runtime: str = "auto"
    precision: str | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads of the tower (None: one per core)
    decode_threads: int = 2  # threads decoding and preprocessing images in the API process
    ready_ttl_s: int = 10  # a successful inference younger than this makes /readyz skip its canary
    api_key: str | None = None

    @classmethod
    def from_env(cls) -> ServeConfig:
        bundle = os.environ.get(BUNDLE_ENV, "").strip()
        if not bundle:
            raise ValueError(f"set {BUNDLE_ENV} to the bundle dir to serve (fvgpt serve BUNDLE sets it for you)")
        runtime = os.environ.get(RUNTIME_ENV, "auto").strip() or "auto"
        if runtime not in RUNTIMES:
            raise ValueError(f"{RUNTIME_ENV}={runtime!r} is not one of {', '.join(RUNTIMES)}")
        threads = env_int(THREADS_ENV, 0, minimum=0) or None
        return cls(bundle=Path(bundle), runtime=runtime, precision=os.environ.get(PRECISION_ENV, "").strip() or None,
                   threads=threads, decode_threads=env_int(DECODE_THREADS_ENV, 2),
                   ready_ttl_s=env_int(READY_TTL_ENV, 10, minimum=0),
                   api_key=os.environ.get(API_KEY_ENV, "").strip() or None)
