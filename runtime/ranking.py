"""Heads' scores → ranked answers: per image, the top-k labels by probability (softmax over the labels scored)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import Scores


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float


def ranked(scores: Scores, k: int) -> list[list[Prediction]]:
    """One list per image of its `k` most probable labels, most probable first (ties in label order)."""
    probabilities = scores.probabilities
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[Prediction(scores.labels[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order)]
