"""Where a request's time goes, always on: wall and CPU seconds per stage, summed since the engine started, and the
batches the towers ran. Cheap (a lock and a few additions per stage), shown in GET /info and GET /metrics.

Stages: read (the body arriving), parse (multipart or JSON into a typed request), decode (header checks and pixel
decoding), preprocess (resize, crop, normalise), queue (waiting for a tower batch), transport (pixels into the
tower's shared memory and the round trip to its worker, minus the tower's own time), tower (the tower graph, in the
worker: its process CPU counts every runtime thread), heads (every classifier's heads and label routing), serialise
(the answer to JSON). CPU seconds are the thread's CPU time over the stage; the tower's are the worker process's (all
its runtime threads), or with FVGPT_TOWER_WORKER=thread the batcher thread's alone (the runtime's own threads are not
counted). queue, transport and tower count per image (a batch's time shared by its images).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("read", "parse", "decode", "preprocess", "queue", "transport", "tower", "heads", "serialise", "explain")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.wall: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()  # images per tower batch → batches
        self.tower_images: Counter[str] = Counter()  # tower id → images run

    def add(self, stage: str, wall_s: float, cpu_s: float, calls: int = 1) -> None:
        with self._lock:
            self.calls[stage] += calls
            self.wall[stage] += wall_s
            self.cpu[stage] += cpu_s

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Time a synchronous stage in the calling thread (no awaits inside: the thread's CPU time is the stage's)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0, time.thread_time() - c0)

    def batch(self, images: int, towers: dict[str, int]) -> None:
        """One batch of `images` ran: tower id → images through that tower (a tower reading another's output runs
        on some or all of them)."""
        with self._lock:
            self.batch_sizes[images] += 1
            self.tower_images.update(towers)

    def snapshot(self) -> dict:
        with self._lock:
            stages = {s: {"calls": self.calls[s], "wall_s": round(self.wall[s], 6), "cpu_s": round(self.cpu[s], 6)}
                      for s in STAGES}
            return {"stages": stages, "batches": sum(self.batch_sizes.values()),
                    "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    def prometheus(self) -> str:
        """The same figures in Prometheus' text format (appended to the server's /metrics)."""
        snap = self.snapshot()
        lines = ["# HELP fvgpt_stage_seconds_total Seconds spent per request stage (wall clock, or CPU).",
                 "# TYPE fvgpt_stage_seconds_total counter"]
        for stage, s in snap["stages"].items():
            lines += [f'fvgpt_stage_seconds_total{{stage="{stage}",clock="wall"}} {s["wall_s"]}',
                      f'fvgpt_stage_seconds_total{{stage="{stage}",clock="cpu"}} {s["cpu_s"]}']
        lines += ["# HELP fvgpt_stage_calls_total Times each request stage ran.",
                  "# TYPE fvgpt_stage_calls_total counter"]
        lines += [f'fvgpt_stage_calls_total{{stage="{stage}"}} {s["calls"]}' for stage, s in snap["stages"].items()]
        lines += ["# HELP fvgpt_tower_batches_total Tower batches run, by images in the batch.",
                  "# TYPE fvgpt_tower_batches_total counter"]
        lines += [f'fvgpt_tower_batches_total{{size="{k}"}} {v}' for k, v in snap["batch_sizes"].items()]
        with self._lock:
            images = dict(self.tower_images)
        lines += ["# HELP fvgpt_tower_images_total Images run through each tower.",
                  "# TYPE fvgpt_tower_images_total counter"]
        lines += [f'fvgpt_tower_images_total{{tower_id="{t}"}} {n}' for t, n in sorted(images.items())]
        return "\n".join(lines) + "\n"
