"""The one readiness decision: ready when the first scan is loaded, at least one classifier is ready, the tower
worker is up, the server is not draining, and an inference through the whole path (decode → preprocess → tower →
heads) succeeded in the last FVGPT_READY_TTL_S seconds: a client request, or, when idle, a canary image run now
through every tower, each with one of its classifiers. False at once, without touching the towers, while the worker
is down or the server drains.
"""
from __future__ import annotations

import io
import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .models import ClassifyRequest

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger("fvgpt.engine")


def canary_png(size: int) -> bytes:
    """A generated photo-sized image (colour gradients), PNG-encoded."""
    y, x = np.mgrid[0:2 * size, 0:3 * size].astype(np.float32)
    rgb = np.stack([x / x.max(), y / y.max(), 0.5 + 0.5 * np.sin((x + y) / 7.0)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Readiness:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self.last_ok = -math.inf
        self._canaries: dict[int, bytes] = {}  # input size → canary PNG, made once

    def succeeded(self) -> None:
        self.last_ok = time.monotonic()

    async def check(self, engine: Engine) -> bool:
        snap = engine.repo.snapshot
        if engine.draining or not engine.pool.up or not snap.scanned or not snap.ready:
            return False
        if time.monotonic() - self.last_ok < self.ttl_s:
            return True
        try:
            for c in dict.fromkeys(snap.towers().values()):  # each classifier once, however many towers it has
                size = c.bundle.preprocess.size
                if (canary := self._canaries.get(size)) is None:
                    canary = self._canaries[size] = canary_png(size)
                request = ClassifyRequest([canary], ["canary"], None, "open", None, f"{c.name}@{c.version}")
                with engine.budget.hold(len(canary)) as reservation:  # counted, never refused
                    scores = await engine.pipeline.scores(request.images, request.names,
                                                          engine.pipeline.plan(request, snap), reservation)
                probs = scores[0].probabilities
                if not (np.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-3):
                    return False
            self.succeeded()
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means not ready (e.g. the worker just died)
            logger.warning("readiness canary inference failed: %s: %s", type(exc).__name__, exc)
            return False
