"""The K-shot draw of CoOp and every method built on it (Dassl's DatasetBase.generate_fewshot_dataset), reproduced
so that a seed draws the same images here as in their published runs. Torch-free. docs/datasets.md, "Few-shot draws".

CoOp's train.py calls Dassl's set_random_seed(seed) (random.seed among others) before anything else uses Python's
`random`, then its dataset reader calls generate_fewshot_dataset(train, num_shots=K) first. That function groups the
training list by label, in order of each label's first appearance and keeping the list's order within a label, then
for each label takes random.sample(items, K), or every item, drawing nothing, when the label has fewer than K. A
`random.Random(seed)` produces the same stream as the module-level generator after random.seed(seed), so the draw
is reproduced without touching global state. Class subsampling (base/new) happens after the draw, on all classes.
"""
from __future__ import annotations

import random
from collections.abc import Sequence


def dassl_fewshot(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """Positions in the training list of the items CoOp draws for `shots` per class with `seed`, in CoOp's order."""
    by_label: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(label, []).append(position)
    rng = random.Random(seed)
    drawn: list[int] = []
    for positions in by_label.values():
        drawn += rng.sample(positions, shots) if len(positions) >= shots else positions
    return drawn
