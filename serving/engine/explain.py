"""POST /explain: the classify pipeline's resolve and decode, then the classifier's explain graph instead of its tower,
its heads on the features that graph gives, and per image a heatmap for the top label (or each label in `targets`).

Off the hot path on purpose: /classify never runs an explain graph, and explain requests do not join the tower
pool's batches. They run one at a time in a worker thread of this process, on the classifier's explain graph at the
precision its tower runs (fp32 when the bundle has no explain graph at that precision), opened at the first request
and kept (fvgpt_runtime.explain). A classifier whose bundle was exported without `--explain` answers 404 saying so.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from fvgpt.preprocess import Preprocess
from fvgpt_runtime.explain import Display, ExplainRunner, label_grid
from fvgpt_runtime.images import InputError, Opened, load, to_pixels
from fvgpt_runtime.manifest import BundleError
from fvgpt_runtime.ranking import ranked

from .admission import Reservation
from .decode import decode_peak, open_images
from .errors import ApiError
from .metrics import Metrics
from .models import ClassifyRequest, ExplainResponse, ExplainResult, Heatmap, Prediction
from .pipeline import Pipeline
from .repository import Classifier, Snapshot


def explain_slice(opened: Opened, cfg: Preprocess, metrics: Metrics) -> tuple[np.ndarray, Display]:
    """One image decoded, preprocessed, and kept as a thumbnail to draw its map on."""
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        load(opened)
        display = Display.of(opened.image, cfg)
        pixels = to_pixels(opened, [cfg])[0]
    except InputError as exc:
        raise ApiError.of_input(exc) from None
    metrics.add("decode", time.perf_counter() - t0, time.thread_time() - c0)
    return pixels, display


class Explainer:
    def __init__(self, pipeline: Pipeline, threads: int | None):
        self.pipeline, self.threads = pipeline, threads
        self.runners: dict[str, ExplainRunner] = {}  # explain graph id → its session (few: one per backbone)
        self._lock = asyncio.Lock()

    async def runner(self, c: Classifier) -> ExplainRunner:
        try:
            graph = c.bundle.manifest.explain_graph(c.tower.precision)
        except BundleError as exc:
            raise ApiError(404, f"{c.ref} cannot explain: {exc}") from None
        if graph.id not in self.runners:  # opening a session takes a while: not on the event loop
            self.runners[graph.id] = await asyncio.to_thread(c.bundle.explainer, c.tower.precision, self.threads)
        return self.runners[graph.id]

    async def explain(self, request: ClassifyRequest, snapshot: Snapshot, reservation: Reservation
                      ) -> ExplainResponse:
        if request.models is not None:
            raise ApiError(400, "POST /explain answers for one classifier: send 'model' (or nothing when the server "
                                "has one classifier), not 'models'")
        p = self.pipeline
        plan = p.plan(request, snapshot)[0]
        c = plan.classifier
        scored = plan.labels or list(c.bundle.classes.names)
        if request.targets and (missing := [t for t in request.targets if t not in scored]):
            raise ApiError(400, f"targets {missing} are not among the labels scored; a target must be one of "
                                f"'labels' (or, without labels, a class of {c.ref}: GET /labels lists them)")
        runner = await self.runner(c)
        cfg = c.bundle.preprocess
        with p.using([c]):
            args = (request.images, request.names, [cfg], p.limits, p.settings.jpeg_draft)
            opened = await asyncio.to_thread(open_images, *args)
            reservation.grow(reservation.size + decode_peak(opened, p.settings.decode_threads))
            slices = await p.decoder.run([lambda o=o: explain_slice(o, cfg, p.metrics) for o in opened])
            pixels = np.stack([s[0] for s in slices])

            def run() -> tuple[np.ndarray, np.ndarray]:
                with p.metrics.timed("explain"):
                    return runner(pixels)

            async with self._lock:  # one explain at a time: it is not batched and must not starve /classify
                features, contrib = await asyncio.to_thread(run)
        scores = c.bundle.scores(features, plan.labels)
        results = []
        for i, image in enumerate(ranked(scores, plan.top_k)):
            targets = request.targets or [image[0].label]
            rows = c.bundle.directions(targets, scores.head)
            display = slices[i][1]
            maps = []
            for label, row in zip(targets, rows):
                grid = label_grid(contrib[i], row)
                maps.append(Heatmap.model_construct(label=label, grid=grid.round(6).tolist(),
                                                    png=display.png_base64(grid)))
            results.append(ExplainResult.model_construct(
                model=c.name, version=c.version, model_id=c.bundle.model_id, head=scores.head,
                predictions=[Prediction.model_construct(label=x.label, probability=x.probability) for x in image],
                crop=list(display.box), heatmaps=maps))
        return ExplainResponse.model_construct(results=results, explain_graph=runner.id, precision=runner.precision)
