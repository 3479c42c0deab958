"""The BentoML services: `FVGPT`, the public API, and `Encoder`, the tower behind adaptive batching.

Two services, two worker processes (BentoML's composition pattern), because BentoML batches a `batchable` API only
when it is called through its HTTP route; a plain method call inside one service would not batch:

  client ─HTTP─► FVGPT (API process)                          Encoder (model process)
                 read body (size-capped), parse, decode and    @api(batchable=True): requests from concurrent
                 preprocess in a thread pool ─── pixels ────►  /classify calls are queued and run as one batch
                 heads, label routing, text graph ◄─ features  through the tower (ONNX Runtime or TensorRT)
                 (Bundle.scores)

So decoding and preprocessing never sit on the model's critical path: they run in another process while the Encoder
runs the previous batch. The two talk over a Unix socket that only this server can reach.

Configuration comes from the environment (serving/config.py, serving/limits.py); `fvgpt serve` sets it.
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
from http import HTTPStatus
from typing import Any

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from PIL import Image

from fvgpt_runtime.bundle import Bundle, Scores, TowerRunner
from fvgpt_runtime.manifest import BundleError
from fvgpt_runtime.tuning import choose_tower

from .app import http_app
from .config import ServeConfig, max_batch_size, max_latency_ms
from .decode import configure_pil, to_pixels
from .errors import ApiError
from .limits import Limits

logger = logging.getLogger("bentoml.fvgpt")

MAX_BATCH_SIZE = max_batch_size()
MAX_LATENCY_MS = max_latency_ms()
TIMEOUT_S = max(60, 3 * MAX_LATENCY_MS // 1000)


def open_tower(bundle: Bundle, cfg: ServeConfig) -> TowerRunner:
    """The tower fvgpt_runtime.tuning chooses: the tuning profile's fastest candidate for this host (narrowed by
    --runtime/--precision), else the safe default; the log says which and why."""
    tower, choice = choose_tower(bundle, cfg.runtime, cfg.precision, cfg.threads)
    logger.info("fvgpt encoder: tower %s-%s: %s", choice.runtime, choice.precision, choice.reason)
    return tower


def canary_png(size: int) -> bytes:
    """A generated photo-sized image (colour gradients), PNG-encoded, for the readiness check."""
    y, x = np.mgrid[0:2 * size, 0:3 * size].astype(np.float32)
    rgb = np.stack([x / x.max(), y / y.max(), 0.5 + 0.5 * np.sin((x + y) / 7.0)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# BentoML 1.4.40's dependency client replaces its aiohttp session every `max_requests` calls / `max_age` seconds by
# closing the old one, which aborts the calls still in flight on it ("Cannot write to closing transport": ~1 failed
# request per 100 at concurrency 8). One worker behind a Unix socket gains nothing from the refresh: make it never due.
NEVER = {"max_requests": 1 << 62, "max_age": float(1 << 40)}


@bentoml.service(name="fvgpt-encoder", workers=1, threads=1, traffic={"timeout": TIMEOUT_S}, runner_connection=NEVER)
class Encoder:
    """The tower. One worker, one batch at a time: the batch, not the worker count, uses the cores."""

    def __init__(self) -> None:
        self.config = ServeConfig.from_env()
        bundle = Bundle(self.config.bundle)
        if MAX_BATCH_SIZE > bundle.max_batch:
            raise BundleError(f"max batch size {MAX_BATCH_SIZE} is over the bundle's {bundle.max_batch} "
                              f"(its graphs and engines are built for that)")
        self.tower = open_tower(bundle, self.config)
        size, dim = bundle.preprocess.size, bundle.manifest.backbone.embed_dim
        out = self.tower(np.zeros((1, 3, size, size), np.float32))  # warm-up, and a shape check
        if out.shape != (1, dim):
            raise BundleError(f"the tower returns {out.shape}, not (1, {dim}) as the manifest says")
        logger.info("fvgpt encoder: tower %s (%s) on %s via %s, ORT threads %s, batch ≤ %d, max latency %d ms",
                    self.tower.tower_id, self.tower.precision, self.tower.provider, self.tower.runtime,
                    self.config.threads or "auto", MAX_BATCH_SIZE, MAX_LATENCY_MS)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 → (B, D) image features."""
        return self.tower(pixels)

    @bentoml.api
    def runtime_info(self) -> dict[str, Any]:
        return {"tower_id": self.tower.tower_id, "runtime": self.tower.runtime, "provider": self.tower.provider,
                "precision": self.tower.precision, "threads": self.config.threads}


@bentoml.asgi_app(http_app, path="/")
@bentoml.service(name="fvgpt", workers=1, traffic={"timeout": TIMEOUT_S})
class FVGPT:
    """POST /classify, GET /labels, GET /info (serving/app.py), on top of BentoML's /livez, /readyz, /metrics and
    /docs.json. Holds the bundle's heads and text graph (label routing, new labels) on the CPU, one thread."""

    encoder = bentoml.depends(Encoder)

    def __init__(self) -> None:
        self.config = ServeConfig.from_env()
        self.limits = Limits.from_env()
        configure_pil(self.limits)
        self.bundle = Bundle(self.config.bundle, threads=1)
        self._decode_limiter: anyio.CapacityLimiter | None = None
        self._last_ok = -math.inf
        self._runtime_info: dict[str, Any] | None = None
        self._canary = canary_png(self.bundle.preprocess.size)
        self.batching = {"max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS}
        threading.Thread(target=self._warm_text_graph, name="fvgpt-text-warm-up", daemon=True).start()
        logger.info("fvgpt API: bundle %s (%s, %d classes), limits %s, API key %s", self.bundle.model_id,
                    self.bundle.kind, len(self.bundle.classes.names), self.limits.as_dict(),
                    "required" if self.config.api_key else "not set")

    def _warm_text_graph(self) -> None:
        """Load the tokenizer and text graph now (seconds), not in the first request with new labels."""
        try:
            self.bundle.encode_text(["warm-up"])
        except Exception:  # a broken text graph shows up again, as a 500, on the request that needs it
            logger.exception("text graph warm-up failed")

    async def pixels(self, images: list[bytes], names: list[str]) -> np.ndarray:
        """Decode and preprocess in worker threads, never on the event loop."""
        if self._decode_limiter is None:
            self._decode_limiter = anyio.CapacityLimiter(self.config.decode_threads)
        return await anyio.to_thread.run_sync(to_pixels, images, self.bundle.preprocess, self.limits, names,
                                              limiter=self._decode_limiter)

    async def classify(self, pixels: np.ndarray, labels: list[str] | None) -> Scores:
        try:
            features = await self.encoder.to_async.encode(pixels)
        except BentoMLException as exc:
            if exc.error_code == HTTPStatus.SERVICE_UNAVAILABLE:
                raise ApiError(503, "the model is overloaded (queue wait over FVGPT_MAX_LATENCY_MS); retry later",
                               {"Retry-After": "1"}) from None
            raise
        scores = await anyio.to_thread.run_sync(self.bundle.scores, features, labels)
        self._last_ok = time.monotonic()
        return scores

    async def runtime_info(self) -> dict[str, Any]:
        if self._runtime_info is None:
            self._runtime_info = await self.encoder.to_async.runtime_info()
        return self._runtime_info

    async def __is_ready__(self) -> bool:
        """Ready when an inference through the whole path (decode → preprocess → tower → heads) succeeded in
        the last FVGPT_READY_TTL_S seconds — a client request or, when idle, a canary image run now."""
        if time.monotonic() - self._last_ok < self.config.ready_ttl_s:
            return True
        try:
            pixels = await self.pixels([self._canary], ["canary"])
            probs = (await self.classify(pixels, None)).probabilities
            return bool(np.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-3)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready (e.g. the encoder is still starting)
            logger.warning("readiness canary inference failed: %s: %s", type(exc).__name__, exc)
            return False
