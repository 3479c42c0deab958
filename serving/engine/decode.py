"""A request's images → pixels, at a bounded and fair cost (the per-image work is fvgpt_runtime.images).

Every image is opened (header only) before any is decoded: format, per-image pixels and aspect ratio, and the pixels
it will decode to (a large JPEG at its draft scale). Their sum over the request must fit FVGPT_MAX_REQUEST_PIXELS
(413 otherwise): 16 grey 7000² PNGs are 745 KB on the wire but 784 M pixels to inflate. What decoding will hold at
most (`decode_peak`) is then added to the request's admission reservation (engine/admission.py). Decoding runs one
slice per image on FVGPT_DECODE_THREADS threads (DecodeScheduler), fairly across requests: a free thread takes the
next image of the request that has started the fewest, so a light request waits at most for the slices already
running, never for a heavy request's queue.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fvgpt.preprocess import Preprocess
from fvgpt_runtime.images import InputError, Opened, load, open_image, to_pixels

from .errors import ApiError
from .metrics import Metrics
from .settings import Limits


def open_images(images: list[bytes], names: list[str], cfgs: list[Preprocess], limits: Limits,
                jpeg_draft: bool) -> list[Opened]:
    """Every image opened, and the request's pixel budget checked, before any pixel is decoded."""
    try:
        opened = [open_image(data, name, limits.pixels, cfgs, jpeg_draft) for data, name in zip(images, names)]
    except InputError as exc:
        raise ApiError.of_input(exc) from None
    total = sum(o.pixels for o in opened)
    if total > limits.max_request_pixels:
        raise ApiError(413, f"the request's images decode to {total} pixels together; the limit is "
                            f"{limits.max_request_pixels} per request (FVGPT_MAX_REQUEST_PIXELS): send fewer or "
                            f"smaller images per request")
    return opened


def decode_peak(opened: list[Opened], threads: int) -> int:
    """The most a request's decoding holds at once: its `threads` largest images decoding side by side."""
    return sum(sorted((o.nbytes for o in opened), reverse=True)[:threads])


def decode_slice(opened: Opened, cfgs: list[Preprocess], metrics: Metrics) -> list[np.ndarray]:
    """One image decoded, then preprocessed once per preprocessing in `cfgs` (a slice of the scheduler), timed."""
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        load(opened)
        t1, c1 = time.perf_counter(), time.thread_time()
        pixels = to_pixels(opened, cfgs)
    except InputError as exc:
        raise ApiError.of_input(exc) from None
    t2, c2 = time.perf_counter(), time.thread_time()
    metrics.add("decode", t1 - t0, c1 - c0)
    metrics.add("preprocess", t2 - t1, c2 - c1)
    return pixels


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
