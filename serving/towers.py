"""Opening a bundle's image tower for serving: the runtime choice and the checks made before it serves.

Used by the encoder process (serving/service.py) and by `fvgpt serve BUNDLE`'s check before it starts a server.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fvgpt_runtime.bundle import TowerRunner
from fvgpt_runtime.manifest import BundleError, Manifest, open_manifest
from fvgpt_runtime.tensorrt import TensorRTUnavailable

from .config import ServeConfig

logger = logging.getLogger("bentoml.fvgpt")


def open_tower(path: Path, manifest: Manifest, precision: str, cfg: ServeConfig) -> TowerRunner:
    """The bundle's tower on the requested runtime; "auto" takes the bundle's TensorRT engine when there is one and
    TensorRT can run it here, else ONNX Runtime (the CUDA provider where a GPU is visible, else CPU)."""
    engines = (manifest.tensorrt or {}).get("image", {})
    if cfg.runtime in ("auto", "tensorrt") and precision in engines:
        try:
            return TowerRunner(path, manifest, precision, "tensorrt")
        except TensorRTUnavailable as exc:
            if cfg.runtime == "tensorrt":
                raise
            logger.warning("not using the bundle's TensorRT engine: %s; falling back to ONNX Runtime", exc)
    return TowerRunner(path, manifest, precision, "onnx", device="auto", threads=cfg.threads)


def load_tower(path: Path, precision: str, cfg: ServeConfig) -> TowerRunner:
    """A (verified) bundle's tower, its graph (and engine) checked against their hashes, run once on a blank image
    (a warm-up, and a shape check): what the encoder opens, and what `fvgpt serve BUNDLE` checks before starting."""
    manifest = open_manifest(path, verify=False)
    graph = manifest.towers["image"].precisions.get(precision)
    if graph is None:
        raise BundleError(f"{path}: no {precision} tower graph")
    engine = (manifest.tensorrt or {}).get("image", {}).get(precision)
    needed = [graph.file] + ([engine["file"]] if engine and cfg.runtime != "onnx" else [])
    if problems := manifest.verify_files(path, needed):
        raise BundleError(f"{path}: " + "; ".join(problems))
    tower = open_tower(path, manifest, precision, cfg)
    size, dim = manifest.preprocess.size, manifest.backbone.embed_dim
    out = tower(np.zeros((1, 3, size, size), np.float32))
    if out.shape != (1, dim):
        raise BundleError(f"the tower returns {out.shape}, not (1, {dim}) as the manifest says")
    return tower
