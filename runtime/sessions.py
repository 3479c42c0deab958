"""Graph sessions, one per (graph file content, runtime, device or precision, threads) in a process.

Every bundle on a backbone ships byte-identical tower and text graphs; a server holding many bundles must load each
only once. Sessions are keyed by the file's sha256 (from the verified manifest), not by path. ONNX Runtime sessions
serve the text and heads graphs and the ONNX towers; OpenVINO compiled models serve the OpenVINO tower variants. The
pool holds them weakly: a session lives as long as a bundle or tower runner holding it, so a server that removes
bundles at run time frees their graphs.
"""
from __future__ import annotations

import threading
import weakref
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
    """Shared sessions: each getter returns the one live session for a graph's content, creating it when there is
    none. Callers keep what they get for as long as they use it; the pool does not keep it alive."""

    def __init__(self) -> None:
        self._sessions: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()
        self._providers: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def _shared(self, key: tuple, create: Callable[[], tuple[Any, str]]) -> tuple[Any, str]:
        with self._lock:  # creation is rare and slow; serialising it keeps one session per key
            session = self._sessions.get(key)
            if session is None:
                session, self._providers[key] = create()
                self._sessions[key] = session
                weakref.finalize(session, self._providers.pop, key, None)
            return session, self._providers[key]

    def get(self, path: Path, sha256: str, device: str = "cpu", threads: int | None = None) -> tuple[Any, str]:
        """An ONNX Runtime session and its provider."""
        return self._shared((sha256, "onnx", device, threads), lambda: ort_session(path, device, threads))

    def openvino(self, path: Path, sha256: str, precision: str, threads: int | None = None) -> Any:
        """An OpenVINORunner: the graph compiled for `precision` on the CPU."""
        from .openvino import OpenVINORunner

        key = (sha256, "openvino", precision, threads)
        return self._shared(key, lambda: (OpenVINORunner(path, precision, threads), "OpenVINO CPU"))[0]

    def __len__(self) -> int:
        return len(self._sessions)


SESSIONS = SessionPool()  # the process-wide pool bundles use unless given another
