"""One classify request through the engine: bytes → pixels → features → heads → ranked answers.

    resolve    the classifiers named (a repository snapshot), each one's label set and top_k
    decode     every image opened and checked, then decoded once and preprocessed once per distinct preprocessing,
               one fair slice per image on the decode threads (engine/decode.py)
    features   one pass per image and tower, batched with concurrent requests (engine/towers.py); a tower that
               several classifiers share (CLIP's tower, MMRL's trunk) runs once for all of them
    heads      every classifier's heads on its tower's features: label routing, new labels through the text graph
               (fvgpt_runtime.bundle.Bundle.scores); in a worker thread when there are many
    rank       top-k per image and classifier (fvgpt_runtime.ranking), as the answer model

The per-image work is fvgpt_runtime's (images, preprocess, bundle, ranking), so the Python API runs the same code.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from fvgpt.preprocess import Preprocess
from fvgpt_runtime.bundle import Scores
from fvgpt_runtime.images import InputError
from fvgpt_runtime.label_sets import resolve, top_k
from fvgpt_runtime.ranking import ranked

from .admission import Reservation
from .decode import DecodeScheduler, decode_peak, decode_slice, open_images
from .errors import ApiError
from .metrics import Metrics
from .models import ClassifyRequest, ClassifyResponse, ImageResults, MultiClassifyResponse, Prediction, Result
from .repository import Classifier, Snapshot
from .settings import Settings
from .towers import TowerPool


INLINE_HEADS = 4  # classifiers whose heads run on the event loop (no new labels); more go to a worker thread
INLINE_OPEN_BYTES = 1 << 20  # images opened (headers read) on the event loop; larger requests in a worker thread


@dataclass(frozen=True)
class Plan:
    """One classifier's part of a request."""

    classifier: Classifier
    labels: list[str] | None
    top_k: int

    @property
    def new_labels(self) -> bool:
        """Labels outside the bundle's classes: their text rows may need the text graph (tens of ms)."""
        return self.labels is not None and any(self.classifier.bundle.classes.find(lab) is None for lab in self.labels)


class Pipeline:
    def __init__(self, settings: Settings, pool: TowerPool, decoder: DecodeScheduler, metrics: Metrics):
        self.settings, self.limits = settings, settings.limits
        self.pool, self.decoder, self.metrics = pool, decoder, metrics
        self.in_use: Counter[str] = Counter()  # tower id → requests using it (a tower in use is never closed)

    def plan(self, request: ClassifyRequest, snapshot: Snapshot) -> list[Plan]:
        plans = []
        for c in snapshot.resolve(request.model, request.models, self.limits.max_models):
            try:
                labels = resolve(request.labels, request.mode, c.bundle.classes)
                k = top_k(request.top_k, len(labels or c.bundle.classes.names), self.limits.default_top_k)
            except InputError as exc:  # with several classifiers, name the one whose classes the request misses
                raise ApiError.of_input(exc, f"{c.ref}: " if request.models is not None else "") from None
            plans.append(Plan(c, labels, k))
        return plans

    async def classify(self, request: ClassifyRequest, snapshot: Snapshot, reservation: Reservation
                       ) -> ClassifyResponse | MultiClassifyResponse:
        plans = self.plan(request, snapshot)
        scores = await self.scores(request.images, request.names, plans, reservation)
        per_classifier = [[Result.model_construct(model=p.classifier.name, version=p.classifier.version,
                                                  model_id=p.classifier.bundle.model_id, head=s.head,
                                                  predictions=[Prediction.model_construct(label=x.label,
                                                                                          probability=x.probability)
                                                               for x in image])
                           for image in ranked(s, p.top_k)] for p, s in zip(plans, scores)]
        if request.models is None:  # one classifier: one result per image, as a single-bundle server answers
            return ClassifyResponse.model_construct(results=per_classifier[0])
        return MultiClassifyResponse.model_construct(
            results=[ImageResults.model_construct(models=list(per_image)) for per_image in zip(*per_classifier)])

    @contextmanager
    def using(self, classifiers: list[Classifier]) -> Iterator[None]:
        """Mark the towers of a request's classifiers as in use until it ends, so a sync never closes them."""
        towers = {t.tower_id for c in classifiers for t in c.towers}
        self.in_use.update(towers)
        try:
            yield
        finally:
            self.in_use.subtract(towers)

    async def scores(self, images: list[bytes], names: list[str], plans: list[Plan], reservation: Reservation
                     ) -> list[Scores]:
        classifiers = [p.classifier for p in plans]
        with self.using(classifiers):
            read: dict[str, dict[str, None]] = {}  # tower taking pixels → the towers read from it (ordered, once)
            for c in classifiers:
                for source, keys in c.read.items():
                    read.setdefault(source, {}).update(dict.fromkeys(keys))
            pixels = await self.pixels(images, names, {t: c.bundle.preprocess for c in classifiers for t in c.read},
                                       reservation)
            outputs = await asyncio.gather(*(self.pool.outputs(t, pixels[t], list(keys)) for t, keys in read.items()))
            features = {key: value for out in outputs for key, value in out.items()}
            if len(plans) <= INLINE_HEADS and not any(p.new_labels for p in plans):
                return self.heads(plans, features)  # a few heads runs cost less than a hop to a thread and back
            return await asyncio.to_thread(self.heads, plans, features)

    async def pixels(self, images: list[bytes], names: list[str], towers: dict[str, Preprocess],
                     reservation: Reservation) -> dict[str, list[np.ndarray]]:
        """tower id → N (3, S, S) pixel arrays: each image opened and checked (the request's pixel budget too), what
        decoding will hold added to the request's reservation, then each image decoded once and preprocessed once
        per distinct preprocessing, one fair decode slice per image, in the decode threads."""
        cfgs = list(dict.fromkeys(towers.values()))
        args = (images, names, cfgs, self.limits, self.settings.jpeg_draft)
        opened = open_images(*args) if sum(map(len, images)) <= INLINE_OPEN_BYTES else \
            await asyncio.to_thread(open_images, *args)
        reservation.grow(reservation.size + decode_peak(opened, self.settings.decode_threads))
        slices = await self.decoder.run([lambda o=o: decode_slice(o, cfgs, self.metrics) for o in opened])
        by_cfg = {cfg: [s[k] for s in slices] for k, cfg in enumerate(cfgs)}  # stacked once, in the tower's batch
        return {tower_id: by_cfg[cfg] for tower_id, cfg in towers.items()}

    def heads(self, plans: list[Plan], features: dict[str, np.ndarray]) -> list[Scores]:
        """Every classifier's heads on its towers' features (tower id → features)."""
        with self.metrics.timed("heads"):
            return [p.classifier.bundle.scores(p.classifier.features(features), p.labels) for p in plans]
