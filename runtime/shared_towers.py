"""Tower graphs shared across bundles: each distinct graph runs once per image for every bundle that needs it.

Bundles on one backbone share graphs by id (docs/bundle-format.md, "Tower roles"): CLIP's tower serves every CoOp and
KgCoOp classifier and the Prior Calibration of every PromptSRC classifier; MMRL's trunk and CLIP branch serve every
MMRL classifier. `SharedTowers` keeps one runner per distinct graph — a graph that reads another role's output is the
same computation only on the same input, so it is keyed by its id and its input's key (Manifest.tower_keys) — and runs
them in an order where every input comes first. A benchmark of a repository computes the features of all its
classifiers this way (the server's tower pool keys its towers the same way); each bundle's heads then read them as
from its own towers.
"""
from __future__ import annotations

import numpy as np

from .bundle import Bundle, TowerRunner
from .manifest import BundleError


class SharedTowers:
    def __init__(self, bundles: list[Bundle], precision: str | None = None, runtime: str = "onnx",
                 device: str = "cpu", threads: int | None = None):
        """precision: every bundle's (None: each bundle's default precision)."""
        if len({b.preprocess for b in bundles}) > 1:
            raise BundleError("bundles with different preprocessing take different pixels: give SharedTowers one "
                              "backbone's bundles")
        self.nodes: dict[str, tuple[TowerRunner, str | None]] = {}  # key → (runner, the key of its input; None: pixels)
        self.keys: list[dict[str, str]] = []  # per bundle: role → node key
        for bundle in bundles:
            m = bundle.manifest
            chosen = precision or m.default_precision
            keys = m.tower_keys(runtime, chosen)
            for role, key in keys.items():  # roles in running order: every input before its readers
                if key not in self.nodes:
                    source = m.towers[role].input
                    self.nodes[key] = (TowerRunner(bundle.path, m, chosen, runtime, device, threads, bundle.pool,
                                                   role), keys[source] if source else None)
            self.keys.append(keys)

    def __call__(self, pixels: np.ndarray) -> list[dict[str, np.ndarray]]:
        """pixels → per bundle, {role: output}: what Bundle.scores takes."""
        out: dict[str, np.ndarray] = {}
        for key, (runner, source) in self.nodes.items():  # insertion order: every input before its readers
            out[key] = runner(pixels if source is None else out[source])
        return [{role: out[key] for role, key in keys.items()} for keys in self.keys]

    @property
    def graph_runs(self) -> int:
        """Graph runs per image: the distinct graphs of the bundles."""
        return len(self.nodes)
