"""Running a tower graph on OpenVINO's CPU plugin (`openvino` is imported lazily, from the `openvino` extra).

OpenVINO reads the bundle's ONNX fp32 tower directly; its precision is a compile setting (INFERENCE_PRECISION_HINT):
f32 for fp32, bf16 for bf16 (only where the CPU has bf16 instructions: elsewhere OpenVINO would silently run f32), and
the int8 IR written by NNCF keeps its non-quantised ops in f32. OpenVINO's own default on bf16-capable CPUs is bf16,
so fp32 is always asked for explicitly.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import BundleError

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVINOUnavailable(BundleError):
    pass


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise OpenVINOUnavailable("OpenVINO is not installed: pip install '.[openvino]'") from exc
    return openvino


def unsupported(precision: str) -> str | None:
    """Why this CPU cannot run `precision` on OpenVINO as asked (None: it can)."""
    ov = import_openvino()
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" and "BF16" not in capabilities:
        return "this CPU has no bf16 instructions (OpenVINO reports no BF16 capability; needs AVX-512 BF16 or AMX)"
    if precision not in HINTS:
        return f"OpenVINO runs {', '.join(HINTS)}, not {precision}"
    return None


class OpenVINORunner:
    """A compiled tower: `run` maps (B, 3, S, S) float32 pixels to (B, D) features. One infer request, so calls are
    serialised (a compiled model's request is not thread-safe); the tower uses every core it is given anyway."""

    def __init__(self, path: Path, precision: str, threads: int | None):
        ov = import_openvino()
        if reason := unsupported(precision):
            raise OpenVINOUnavailable(reason)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                  "INFERENCE_PRECISION_HINT": HINTS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._request.infer({0: pixels})[0].copy()
