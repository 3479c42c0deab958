"""Running a TensorRT engine (GPU hosts only; `tensorrt` and `cuda-python` are imported lazily, from the `trt` extra).

Device memory and the stream come from cuda-python's runtime bindings, so running an engine needs no torch. The
engine's input is `pixels` (B, 3, S, S) float32; its outputs are float32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .manifest import BundleError


class TensorRTUnavailable(BundleError):
    pass


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable("TensorRT is not installed: install the `trt` extra on a GPU host "
                                  "(pip install '.[gpu,trt]'); it cannot be installed on CPU-only machines") from exc
    return trt


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise TensorRTUnavailable("cuda-python is not installed: install the `trt` extra on a GPU host") from exc
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU, and the CUDA runtime sees none")
    return cudart


def tensorrt_unusable() -> str | None:
    """Why TensorRT cannot run engines here (None: it can)."""
    try:
        import_tensorrt()
        import_cudart()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


def _check(result: tuple, what: str) -> Any:
    err, *rest = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTRunner:
    """Runs a serialised engine; `run` takes and returns NumPy like the ONNX Runtime path."""

    def __init__(self, engine_path: Path):
        trt = import_tensorrt()
        self.cudart = import_cudart()
        if not engine_path.is_file():
            raise TensorRTUnavailable(f"engine {engine_path} is missing")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise TensorRTUnavailable(f"{engine_path} does not load here (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = _check(self.cudart.cudaStreamCreate(), "stream creation")

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self.cudart
        pixels = np.ascontiguousarray(pixels, np.float32)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        buffers = [_check(cudart.cudaMalloc(pixels.nbytes), "malloc")]
        try:
            _check(cudart.cudaMemcpyAsync(buffers[0], pixels.ctypes.data, pixels.nbytes, h2d, self.stream), "copy")
            self.context.set_input_shape("pixels", pixels.shape)
            self.context.set_tensor_address("pixels", buffers[0])
            outs = {}
            for name in self.outputs:
                outs[name] = np.empty(tuple(self.context.get_tensor_shape(name)), np.float32)
                buffers.append(_check(cudart.cudaMalloc(outs[name].nbytes), "malloc"))
                self.context.set_tensor_address(name, buffers[-1])
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            for name, ptr in zip(self.outputs, buffers[1:]):
                _check(cudart.cudaMemcpyAsync(outs[name].ctypes.data, ptr, outs[name].nbytes, d2h, self.stream),
                       "copy")
            _check(cudart.cudaStreamSynchronize(self.stream), "synchronize")
            return outs
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)
