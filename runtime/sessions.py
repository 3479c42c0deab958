"""Graph sessions, one per (graph file content, runtime, device or precision, threads) in a process.

Every bundle on a backbone ships byte-identical tower and text graphs; a server holding many bundles must load each
only once. Sessions are keyed by the file's sha256 (from the verified manifest), not by path. ONNX Runtime sessions
serve the text and heads graphs and the ONNX towers; OpenVINO compiled models serve the OpenVINO tower variants.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .manifest import BundleError

DEVICES = ("cpu", "cuda", "auto")


def ort_session(path: Path, device: str = "cpu", threads: int | None = None) -> tuple[Any, str]:
    """An InferenceSession and the provider it really uses (onnxruntime-gpu lists CUDA even with no GPU)."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise BundleError(f"unknown device {device!r} ({', '.join(DEVICES)})")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    wanted = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), opts, providers=wanted)
    used = session.get_providers()[0]
    if device == "cuda" and used != "CUDAExecutionProvider":
        raise BundleError(f"CUDA was requested but ONNX Runtime runs {path.name} on {used} "
                          f"(onnxruntime-gpu installed? a GPU visible?)")
    return session, used


class SessionPool:
    """Shared sessions: each getter returns the one session for a graph's content, creating it on first use."""

    def __init__(self) -> None:
        self._sessions: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def _shared(self, key: tuple, create: Callable[[], Any]) -> Any:
        with self._lock:  # creation is rare and slow; serialising it keeps one session per key
            if key not in self._sessions:
                self._sessions[key] = create()
            return self._sessions[key]

    def get(self, path: Path, sha256: str, device: str = "cpu", threads: int | None = None) -> tuple[Any, str]:
        """An ONNX Runtime session and its provider."""
        return self._shared((sha256, "onnx", device, threads), lambda: ort_session(path, device, threads))

    def openvino(self, path: Path, sha256: str, precision: str, threads: int | None = None) -> Any:
        """An OpenVINORunner: the graph compiled for `precision` on the CPU."""
        from .openvino import OpenVINORunner

        return self._shared((sha256, "openvino", precision, threads), lambda: OpenVINORunner(path, precision, threads))

    def __len__(self) -> int:
        return len(self._sessions)


SESSIONS = SessionPool()  # the process-wide pool bundles use unless given another
