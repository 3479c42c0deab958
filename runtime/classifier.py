"""The Python API: a bundle loaded as a classifier of images, torch-free (docs/python-api.md).

    import fvgpt_runtime as fr
    clf = fr.load("bundles/pets")                 # or "REPOSITORY/NAME" / "REPOSITORY/NAME@VERSION"
    for result in clf.classify(["cat.jpg", "dog.png"], labels=["cat", "dog", "rabbit"]):
        print(result.label, result.probability, result.head)

It runs the server's per-image code (fvgpt_runtime.images: checks, JPEG draft, decode, preprocess; bundle: tower and
heads with label routing; label_sets; ranking) on the tower variant a server on this host would run (the bundle's
tuning profile, fvgpt_runtime.tuning.choose), so one image gets the same probabilities here, from `fvgpt classify`
and from POST /classify. What only a server needs (admission, fair decoding, batching across requests) is not here.

The steps are public too, for code that runs them in stages (fvgpt_batch's Ray pipeline): `pixels` (one image → its
preprocessed pixels, or an InputError naming the problem), `features` (the tower, in batches), `rank` (heads →
ranked results).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .bundle import Bundle, TowerRunner
from .images import MAX_IMAGE_BYTES, InputError, PixelLimits, decode, preprocessed, read_file
from .label_sets import DEFAULT_TOP_K, requested
from .label_sets import top_k as k_of
from .ranking import Prediction, ranked
from .repository import Found, locate
from .tuning import Choice, check_request, choose

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]  # noqa: UP007 - a runtime alias, read by humans
BATCH_SIZE = 32  # images per tower run; results do not depend on it (fp32 towers; tests/test_python_api.py)


@dataclass(frozen=True)
class Result:
    """One image's answer: its ranked predictions (most probable first) and the head that scored them ("base",
    "new" or "zero-shot"; docs/method.md, "Inference")."""

    predictions: list[Prediction]
    head: str

    @property
    def label(self) -> str:
        return self.predictions[0].label

    @property
    def probability(self) -> float:
        return self.predictions[0].probability


@dataclass(frozen=True)
class Info:
    """What was loaded and what runs it: the classifier's name and version (a bundle loaded alone: its folder's name,
    version "1"), the bundle's kind and model id, and the tower variant chosen for this host, with the reason."""

    name: str
    version: str
    path: Path
    kind: str
    model_id: str
    classes: int
    tower_id: str
    runtime: str
    precision: str
    reason: str


class Classifier:
    """A loaded bundle and the tower this host runs for it. Thread-safe for classify (ONNX Runtime sessions are)."""

    def __init__(self, found: Found, runtime: str = "auto", precision: str | None = None, threads: int | None = None,
                 verify: bool = True, limits: PixelLimits | None = None, jpeg_draft: bool = True,
                 max_image_bytes: int = MAX_IMAGE_BYTES):
        self.name, self.version = found.name, found.version
        self.bundle = Bundle(found.path, verify=verify, threads=1)
        check_request(self.bundle.manifest, runtime, precision)
        self.choice: Choice = choose(found.path, self.bundle.manifest, runtime, precision)
        self.tower_id = self.bundle.manifest.image_tower(self.choice.runtime, self.choice.precision).id
        self.threads, self.limits, self.jpeg_draft = threads, limits or PixelLimits(), jpeg_draft
        self.max_image_bytes = max_image_bytes

    @property
    def labels(self) -> list[str]:
        """The bundled classes, in the bundle's order (any other label may be asked for too)."""
        return list(self.bundle.classes.names)

    @property
    def info(self) -> Info:
        b, c = self.bundle, self.choice
        return Info(self.name, self.version, b.path, b.kind, b.model_id, len(b.classes.names), self.tower_id,
                    c.runtime, c.precision, c.reason)

    @cached_property
    def tower(self) -> TowerRunner:
        """Opened at first use: a process that only routes labels never pays for it."""
        c = self.choice
        return TowerRunner(self.bundle.path, self.bundle.manifest, c.precision, c.runtime, c.device, self.threads,
                           self.bundle.pool)

    # ---- the steps --------------------------------------------------------------------------------------------
    def pixels(self, image: ImageInput, name: str | None = None) -> np.ndarray:
        """One image → (3, S, S) float32 pixels: a path or bytes goes through the server's checks and decoding (an
        InputError names what is wrong); a PIL image or an (H, W[, C]) uint8 array is preprocessed as it is."""
        cfg = [self.bundle.preprocess]
        if isinstance(image, (str, os.PathLike)):
            return decode(read_file(image, self.max_image_bytes), name or str(image), self.limits, cfg,
                          self.jpeg_draft)[0]
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode(bytes(image), name or "image", self.limits, cfg, self.jpeg_draft)[0]
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.shape[2:] not in ((), (1,), (3,), (4,)):
                raise InputError(f"{name or 'image'} is an array of {image.dtype} {image.shape}: arrays must be "
                                 f"uint8 (H, W) or (H, W, 1|3|4)")
            image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        if isinstance(image, Image.Image):
            return preprocessed(image, name or "image", cfg)[0]
        raise InputError(f"{name or 'image'} is a {type(image).__name__}: give a path, bytes, a PIL image or a uint8 "
                         f"array")

    def features(self, pixels: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """(N, 3, S, S) pixels → (N, D) image features, through the tower in batches of at most `batch_size`."""
        step = max(1, min(batch_size, self.bundle.max_batch))
        return np.concatenate([self.tower(pixels[i:i + step]) for i in range(0, len(pixels), step)])

    def label_set(self, labels: Sequence[str] | None, mode: str = "open") -> list[str] | None:
        """Labels as given → the set scored (label_sets: normalised, checked, bundled classes under their names)."""
        return requested(None if labels is None else list(labels), mode, self.bundle.classes)

    def rank(self, features: np.ndarray, labels: list[str] | None, k: int | None = None,
             all_probabilities: bool = False) -> tuple[list[Result], np.ndarray | None]:
        """Heads on image features for a resolved label set (`label_set`) → ranked results, and every label's
        probability (in the label set's order) when asked."""
        scores = self.bundle.scores(features, labels)
        results = [Result(p, scores.head) for p in ranked(scores, k_of(k, len(scores.labels), DEFAULT_TOP_K))]
        return results, scores.probabilities if all_probabilities else None

    # ---- in one call ------------------------------------------------------------------------------------------
    def classify(self, images: ImageInput | Iterable[ImageInput], labels: Sequence[str] | None = None,
                 top_k: int | None = None, mode: str = "open", batch_size: int = BATCH_SIZE) -> list[Result]:
        """Ranked results, one per image, in order. `labels`: any labels (None: the bundled classes; "subset" mode
        refuses labels that are not bundled classes); `top_k`: how many ranked labels (default 5, or all when fewer).
        A bad image or label raises an InputError that names it."""
        if isinstance(images, (str, os.PathLike, bytes, Image.Image, np.ndarray)):
            images = [images]
        chosen = self.label_set(labels, mode)
        if not (pixels := [self.pixels(image) for image in images]):
            return []
        return self.rank(self.features(np.stack(pixels), batch_size), chosen, top_k)[0]

    def __repr__(self) -> str:
        return f"Classifier({self.name}@{self.version}, {self.bundle.kind}, tower {self.choice.runtime}-" \
               f"{self.choice.precision})"


def load(ref: str | os.PathLike, runtime: str = "auto", precision: str | None = None, threads: int | None = None,
         verify: bool = True, **options) -> Classifier:
    """A bundle folder, or "REPOSITORY/NAME[@VERSION]" (NAME alone: its highest version), as a Classifier. The
    bundle is verified (every file's sha256) unless verify=False; the tower is the one a server here would run
    (`runtime`/`precision` narrow it as `fvgpt serve`'s options do). `options`: Classifier's limits."""
    return Classifier(locate(ref), runtime, precision, threads, verify, **options)
