"""The BentoML services: `FVGPT`, the public API over a repository of classifiers, and `Encoder`, the towers behind
adaptive batching.

Two services, two worker processes (BentoML's composition pattern), because BentoML batches a `batchable` API only
when it is called through its HTTP route; a plain method call inside one service would not batch:

  client ─HTTP─► FVGPT (API process)                            Encoder (model process)
                 read body (size-capped), parse, resolve the     @api(batchable=True) encode: (tower_id, pixels)
                 classifiers, decode and preprocess once per     items from concurrent /classify calls are queued
                 tower ─── one item per image and tower ──────►  and run as one batch, split per tower: one pass
                 heads of every classifier named, label routing  per image and tower, whatever the number of
                 and the text graph (Bundle.scores) ◄─ features  classifiers asking (ONNX Runtime or TensorRT)

Classifiers whose bundles share a `tower_id` share one tower: the encoder keeps one TowerRunner per tower id, opened
when the first classifier on it is loaded (open_tower) and closed when the last one is gone and no request uses it.
BentoML's batchable API takes exactly one argument, so the items carry their tower id and one batch may mix towers;
the dispatcher's `max_batch_size` counts images over all towers.

The API process owns the repository (serving/repository.py): `sync` scans the folder (every FVGPT_POLL_S seconds,
and on POST /admin/reload), loads what is new or changed, drops what is gone, and opens/closes towers in the encoder.

Faults: every call into the encoder goes through the EncoderLink (serving/encoder_link.py): an overloaded, dead or
restarting encoder gives a 503 with Retry-After, never a 500, and readiness is false at once while it is down; a new
encoder gets the towers opened again (and an encoder that lost its towers answers empty features for them, which
`features` opens again and retries once). A request holds its bytes in the admission budget (serving/admission.py)
and decodes through the fair DecodeScheduler (serving/decode.py). SIGTERM drains (serving/lifecycle.py).
`__is_ready__` is the one readiness decision.
"""
from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
from PIL import Image

from fvgpt.preprocess import Preprocess
from fvgpt_runtime.bundle import Scores, TowerRunner
from fvgpt_runtime.manifest import open_manifest

from .admission import InflightBudget, Reservation, tune_malloc
from .app import http_app
from .batching import run_batches_when_free
from .config import ServeConfig, check_config, max_batch_size, max_latency_ms
from .decode import DecodeScheduler, configure_pil, decode_peak, decode_slice, open_images
from .encoder_link import EncoderLink, encoder_status
from .errors import ApiError, JSONErrors
from .lifecycle import Drain, drain_api_first, outlive_api
from .repository import Classifier, Repository
from .towers import load_tower

logger = logging.getLogger("bentoml.fvgpt")

MAX_BATCH_SIZE = max_batch_size()
MAX_LATENCY_MS = max_latency_ms()
TIMEOUT_S = max(60, 3 * MAX_LATENCY_MS // 1000)
NOT_OPEN = np.zeros(0, np.float32)  # encode's answer for an item whose tower is not open in the encoder


API_SERVICE = "fvgpt"


def canary_png(size: int) -> bytes:
    """A generated photo-sized image (colour gradients), PNG-encoded, for the readiness check."""
    y, x = np.mgrid[0:2 * size, 0:3 * size].astype(np.float32)
    rgb = np.stack([x / x.max(), y / y.max(), 0.5 + 0.5 * np.sin((x + y) / 7.0)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class TowerInput(bentoml.IODescriptor):
    """One image for one tower: the unit the adaptive batcher counts."""

    tower_id: str
    pixels: np.ndarray  # (3, S, S) float32, preprocessed as the tower's bundles say


# BentoML 1.4.40's dependency client replaces its aiohttp session every `max_requests` calls / `max_age` seconds by
# closing the old one, which aborts the calls still in flight on it ("Cannot write to closing transport": ~1 failed
# request per 100 at concurrency 8). One worker behind a Unix socket gains nothing from the refresh: make it never due.
NEVER = {"max_requests": 1 << 62, "max_age": float(1 << 40)}


@bentoml.service(name="fvgpt-encoder", workers=1, threads=1, traffic={"timeout": TIMEOUT_S}, runner_connection=NEVER)
class Encoder:
    """The towers, one per tower id. One worker, one batch at a time: the batch, not the worker count, uses the
    cores. Towers are opened in a side thread, so a new backbone being loaded never holds up the batches."""

    def __init__(self) -> None:
        self.config = ServeConfig.from_env()
        self.towers: dict[str, TowerRunner] = {}  # replaced, never mutated: encode reads it without a lock
        self.passes: Counter[str] = Counter()  # tower id → images run through it (what /info reports as images)
        self._lock = threading.Lock()
        run_batches_when_free()
        logger.info("fvgpt encoder: runtime %s, ORT threads %s, batch ≤ %d images, max latency %d ms",
                    self.config.runtime, self.config.threads or "auto", MAX_BATCH_SIZE, MAX_LATENCY_MS)

    @bentoml.on_startup
    async def _outlive_api(self) -> None:
        outlive_api(API_SERVICE, self.config.drain_s)

    def _open(self, bundle: str, runtime: str, precision: str, device: str) -> dict[str, Any]:
        path = Path(bundle)
        graph = open_manifest(path, verify=False).image_tower(runtime, precision)
        with self._lock:  # one opening at a time: two classifiers on a new tower open it once
            if graph.id in self.towers:
                return self._info(self.towers[graph.id])
            tower = load_tower(path, runtime, precision, device, self.config.threads)
            self.towers = self.towers | {graph.id: tower}
        logger.info("fvgpt encoder: opened tower %s (%s-%s) from %s on %s", graph.id, runtime, precision, path,
                    tower.provider)
        return self._info(tower)

    def _info(self, tower: TowerRunner) -> dict[str, Any]:
        return {"tower_id": tower.tower_id, "runtime": tower.runtime, "provider": tower.provider,
                "precision": tower.precision, "threads": self.config.threads, "images": self.passes[tower.tower_id]}

    @bentoml.api
    async def open_tower(self, bundle: str, runtime: str, precision: str, device: str) -> dict[str, Any]:
        """Open a (verified) bundle's tower variant unless its tower id is open: its runtime info, or {"error": why}
        (the API process refuses the classifiers on it with that reason)."""
        try:
            return await anyio.to_thread.run_sync(self._open, bundle, runtime, precision, device)
        except Exception as exc:  # noqa: BLE001 - any failure refuses the classifier; the encoder keeps serving
            logger.warning("fvgpt encoder: cannot open the %s-%s tower of %s: %s: %s", runtime, precision, bundle,
                           type(exc).__name__, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}

    @bentoml.api
    def close_tower(self, tower_id: str) -> bool:
        """Drop a tower no classifier uses any more (a batch running on it finishes first)."""
        with self._lock:
            found = tower_id in self.towers
            self.towers = {k: v for k, v in self.towers.items() if k != tower_id}
        if found:
            logger.info("fvgpt encoder: closed tower %s", tower_id)
        return found

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def encode(self, items: list[TowerInput]) -> list[np.ndarray]:
        """(tower id, (3, S, S) pixels) items → (D,) features each; one tower call per tower in the batch. An item
        whose tower is not open gets an empty array (the caller opens it and retries)."""
        towers, out = self.towers, [NOT_OPEN] * len(items)
        rows: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            rows[item.tower_id].append(i)
        for tower_id, idx in rows.items():
            if (tower := towers.get(tower_id)) is not None:
                for i, f in zip(idx, tower(np.stack([items[i].pixels for i in idx]))):
                    out[i] = f
                self.passes[tower_id] += len(idx)
        return out

    @bentoml.api
    def runtime_info(self) -> dict[str, Any]:
        """tower id → runtime, provider, precision, threads and images encoded so far, of every open tower."""
        return {tower_id: self._info(t) for tower_id, t in self.towers.items()}

    @bentoml.api
    async def status(self) -> dict[str, Any]:
        """This process (pid, start time: the API process watches it) and the towers it has open."""
        return encoder_status(os.getpid()) | {"towers": sorted(self.towers)}


@bentoml.asgi_app(http_app, path="/")
@bentoml.service(name=API_SERVICE, workers=1, traffic={"timeout": TIMEOUT_S})
class FVGPT:
    """POST /classify, GET /models, /labels, /info, POST /admin/reload and the merged /docs.json (serving/app.py), on
    top of BentoML's /livez, /readyz and /metrics. Holds the repository: every classifier's heads and text graph
    (label routing, new labels) on the CPU, one thread."""

    encoder = bentoml.depends(Encoder)

    @bentoml.on_deployment
    def _check_before_workers_start() -> None:
        """Runs in the `bentoml serve` process before any worker starts: a bad setting or a bad single bundle stops
        the server with its message, instead of workers that crash and restart for ever; and the stop order that
        drains the API worker before the encoder (serving/lifecycle.py)."""
        cfg, _ = check_config()
        if cfg.single:
            open_manifest(cfg.source)
        drain_api_first(cfg.drain_s)

    def __init__(self) -> None:
        self.config, self.limits = check_config()
        configure_pil(self.limits)
        tune_malloc()  # before the decode threads exist: memory returns to the OS after bursts
        self.repo = Repository(self.config.source, self.config.single, self.config.runtime, self.config.precision,
                               MAX_BATCH_SIZE)
        self.open_towers: dict[str, dict[str, Any]] = {}  # tower id → runtime info, as the encoder reported it
        self.in_flight: Counter[str] = Counter()  # tower id → requests using it (a tower in use is never closed)
        self.budget = InflightBudget(self.limits.max_inflight_bytes)
        self.decoder = DecodeScheduler(self.config.decode_threads)
        self.link = EncoderLink(self.encoder, self._reopen_all)
        self.drain = Drain()
        self._sync_lock: asyncio.Lock | None = None
        self._last_ok = -math.inf
        self._canaries: dict[int, bytes] = {}
        self.batching = {"max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS}
        logger.info("fvgpt API: %s %s, limits %s, API key %s, poll every %s s",
                    "bundle" if self.config.single else "repository", self.config.source, self.limits.as_dict(),
                    "required" if self.config.api_key else "not set", self.config.poll_s or "never")

    @bentoml.on_startup
    async def _start(self) -> None:
        self.drain.serve_api(self.config.drain_s, self.config.header_timeout_s, self.config.body_timeout_s)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    @bentoml.on_shutdown
    def _stop_decoding(self) -> None:
        self.decoder.shutdown()

    # ---- the repository ---------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        """The first sync at start, then one every FVGPT_POLL_S seconds (never with 0; POST /admin/reload syncs at
        once through sync())."""
        await self._find_encoder()
        while True:
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - a failed scan must not end the watcher; the next one retries
                logger.exception("fvgpt repository: sync failed")
            if not self.config.poll_s:
                return
            await asyncio.sleep(self.config.poll_s)

    async def sync(self, retry_failed: bool = False) -> dict[str, list[str]]:
        """Bring the repository in line with its folder: load new and changed versions (one at a time, in a worker
        thread), drop removed ones, open and close towers. Returns what changed, by classifier ref."""
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            to_load, removed = await anyio.to_thread.run_sync(self.repo.plan, retry_failed)
            changes: dict[str, list[str]] = {"loaded": [], "failed": [], "removed": [f"{n}@{v}" for n, v in removed]}
            self.repo.apply(removed=removed)
            for found in to_load:
                classifier = await anyio.to_thread.run_sync(self.repo.load, found)
                if classifier.ready and classifier.tower_id not in self.open_towers:
                    if error := await self._open_tower(classifier):
                        classifier = classifier.failed(f"its tower cannot be opened: {error}")
                self.repo.apply([classifier])
                changes["loaded" if classifier.ready else "failed"].append(classifier.ref)
            if not self.repo.snapshot.scanned:
                self.repo.apply(scanned=True)
                logger.info("fvgpt repository: %d classifier versions ready, %d refused, %d towers",
                            len(self.repo.snapshot.ready), len(changes["failed"]), len(self.open_towers))
            await self._close_unused_towers()
            return changes

    async def _find_encoder(self, attempts: int = 60) -> None:
        """Learn which process the encoder is (so the link can watch it), waiting up to `attempts` seconds for it to
        come up; without it, only transport errors tell that the encoder is gone."""
        for _ in range(attempts):
            try:
                self.link.watch(await self.link.call("status", probe=True))
                return
            except Exception:  # noqa: BLE001 - the encoder may still be starting: retry
                await asyncio.sleep(1.0)
        logger.warning("fvgpt: the encoder did not answer its status for %d s", attempts)

    async def _open_tower(self, c: Classifier, attempts: int = 60) -> str | None:
        """Open c's tower in the encoder (at start, waiting up to `attempts` seconds for the encoder to come up);
        the error, or None."""
        for attempt in range(attempts):
            try:
                info = await self.link.call("open_tower", probe=True, bundle=str(c.path), runtime=c.runtime,
                                            precision=c.precision, device=c.device)
                break
            except Exception as exc:  # noqa: BLE001 - the encoder may still be starting: retry
                if attempt == attempts - 1:
                    return f"the encoder does not answer ({type(exc).__name__}: {exc})"
                await asyncio.sleep(1.0)
        if "error" in info:
            return info["error"]
        self.open_towers[info["tower_id"]] = info
        return None

    async def _close_unused_towers(self) -> None:
        used = self.repo.snapshot.towers()
        for tower_id in [t for t in self.open_towers if t not in used and not self.in_flight[t]]:
            del self.open_towers[tower_id]
            await self.link.call("close_tower", tower_id=tower_id)

    @contextmanager
    def using(self, classifiers: list[Classifier]) -> Iterator[None]:
        """Mark the towers of a request's classifiers as in use until it ends, so a sync never closes them."""
        towers = {c.tower_id for c in classifiers}
        self.in_flight.update(towers)
        try:
            yield
        finally:
            self.in_flight.subtract(towers)

    # ---- inference ----------------------------------------------------------------------------------------------
    async def pixels(self, images: list[bytes], names: list[str], towers: dict[str, Preprocess],
                     reservation: Reservation) -> dict[str, np.ndarray]:
        """tower id → (N, 3, S, S) pixels: each image opened and checked (the request's pixel budget too), what
        decoding will hold added to the request's reservation (a 503 if a client request's does not fit), then each
        image decoded once and preprocessed once per distinct preprocessing, one fair decode slice per image, in
        worker threads, never on the event loop."""
        cfgs = list(dict.fromkeys(towers.values()))
        opened = await anyio.to_thread.run_sync(open_images, images, names, cfgs, self.limits, self.config.jpeg_draft)
        reservation.grow(reservation.size + decode_peak(opened, self.config.decode_threads))
        slices = await self.decoder.run([lambda o=o: decode_slice(o, cfgs) for o in opened])
        by_cfg = {cfg: np.stack([s[k] for s in slices]) for k, cfg in enumerate(cfgs)}
        return {tower_id: by_cfg[cfg] for tower_id, cfg in towers.items()}

    async def features(self, pixels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """tower id → (N, D) image features: one encoder call whose items (one per image and tower) join the
        batches of concurrent requests. Towers the encoder lost (a restart) are opened again and retried once."""
        items = [TowerInput(tower_id=t, pixels=p) for t, batch in pixels.items() for p in batch]
        out = await self.link.call("encode", items=items)
        if lost := sorted({it.tower_id for it, f in zip(items, out) if f.size == 0}):
            await self._reopen(lost)
            retry = [i for i, f in enumerate(out) if f.size == 0]
            for i, f in zip(retry, await self.link.call("encode", items=[items[i] for i in retry])):
                out[i] = f
        features, start = {}, 0
        for tower_id, batch in pixels.items():
            features[tower_id] = np.stack(out[start:start + len(batch)]).astype(np.float32, copy=False)
            start += len(batch)
        return features

    async def _reopen_all(self) -> None:
        """A new encoder (after a crash) has no towers: open every tower a ready classifier uses."""
        self.open_towers.clear()
        await self._reopen(sorted(self.repo.snapshot.towers()))

    async def _reopen(self, lost: list[str]) -> None:
        logger.warning("fvgpt: the encoder has no tower %s (restarted?): opening it again", ", ".join(lost))
        sources = self.repo.snapshot.towers()
        for tower_id in lost:
            self.open_towers.pop(tower_id, None)
            error = await self._open_tower(sources[tower_id], attempts=1) if tower_id in sources else \
                "no classifier uses it any more"
            if error:
                raise ApiError(503, f"tower {tower_id} is not available: {error}", {"Retry-After": "1"})

    def scores(self, plans: list[tuple[Classifier, list[str] | None]],
               features: dict[str, np.ndarray]) -> list[Scores]:
        """Every classifier's heads on its tower's features (run in one worker thread per request)."""
        return [c.bundle.scores(features[c.tower_id], labels) for c, labels in plans]

    async def classify(self, images: list[bytes], names: list[str], plans: list[tuple[Classifier, list[str] | None]],
                       reservation: Reservation) -> list[Scores]:
        classifiers = [c for c, _ in plans]
        with self.using(classifiers):
            pixels = await self.pixels(images, names, {c.tower_id: c.bundle.preprocess for c in classifiers},
                                       reservation)
            features = await self.features(pixels)
            scores = await anyio.to_thread.run_sync(self.scores, plans, features)
        self._last_ok = time.monotonic()
        return scores

    async def runtime_info(self) -> dict[str, Any]:
        return await self.link.call("runtime_info")

    async def __is_ready__(self) -> bool:
        """Ready when the first scan is loaded, at least one classifier is ready, and an inference through the
        whole path (decode → preprocess → tower → heads) succeeded in the last FVGPT_READY_TTL_S seconds — a client
        request or, when idle, a canary image run now through every tower, each with one of its classifiers. False at
        once while the server drains or the encoder is down."""
        snap = self.repo.snapshot
        if self.drain.draining or not self.link.up or not snap.scanned or not snap.ready:
            return False
        if time.monotonic() - self._last_ok < self.config.ready_ttl_s:
            return True
        try:
            for c in snap.towers().values():
                size = c.bundle.preprocess.size
                if (canary := self._canaries.get(size)) is None:  # made once per input size
                    canary = self._canaries[size] = canary_png(size)
                with self.budget.hold(len(canary)) as reservation:  # counted, never refused
                    probs = (await self.classify([canary], ["canary"], [(c, None)], reservation))[0].probabilities
                if not (np.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-3):
                    return False
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means not ready (e.g. the encoder is still starting)
            logger.warning("readiness canary inference failed: %s: %s", type(exc).__name__, exc)
            return False


FVGPT.add_asgi_middleware(JSONErrors)
