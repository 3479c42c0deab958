"""Opening a bundle's image tower for serving, with the checks made before it serves.

Which variant (runtime × precision) a classifier runs is decided once, when the repository loads it
(fvgpt_runtime.tuning.choose); this opens that variant. Used by the encoder process (serving/service.py) and by
`fvgpt serve BUNDLE`'s check before it starts a server.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fvgpt_runtime.bundle import TowerRunner
from fvgpt_runtime.manifest import BundleError, open_manifest


def load_tower(path: Path, runtime: str, precision: str, device: str, threads: int | None) -> TowerRunner:
    """A (verified) bundle's tower variant, its graph files (and TensorRT engine) checked against their hashes, run
    once on a blank image (a warm-up, and a shape check)."""
    manifest = open_manifest(path, verify=False)
    needed = manifest.image_tower(runtime, precision).files
    if runtime == "tensorrt":
        needed += [(manifest.tensorrt or {})["image"][precision]["file"]]
    if problems := manifest.verify_files(path, needed):
        raise BundleError(f"{path}: " + "; ".join(problems))
    tower = TowerRunner(path, manifest, precision, runtime, device, threads)
    size, dim = manifest.preprocess.size, manifest.backbone.embed_dim
    out = tower(np.zeros((1, 3, size, size), np.float32))
    if out.shape != (1, dim):
        raise BundleError(f"the tower returns {out.shape}, not (1, {dim}) as the manifest says")
    return tower
