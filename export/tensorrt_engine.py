"""TensorRT engines for the image graph (GPU hosts only; `tensorrt` is imported lazily).

The engine is built as a *strongly typed* network from the bundle's own ONNX graph of the requested precision, so
the precision policy lives in one place: for fp16 that is precision.convert_fp16's graph, whose LayerNorm, Softmax,
normalisation and heads (the BRG gate included) are fp32 islands that TensorRT must keep (TensorRT 10 needs the
STRONGLY_TYPED flag for this; TensorRT 11 always builds that way). One optimisation profile spans batch 1..max_batch
and the timing cache is kept beside the engine so rebuilds on the same GPU are fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fvgpt.errors import FVGPTError

ENGINE_DIR = "engines"


class TensorRTUnavailable(FVGPTError):
    pass


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable("TensorRT is not installed: install the `trt` extra on a GPU host "
                                  "(pip install '.[gpu,trt]'); it cannot be installed on CPU-only machines") from exc
    return trt


def _cuda_torch():
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU, and torch sees none")
    return torch


def engine_for(manifest: dict, precision: str) -> str:
    engines = (manifest.get("tensorrt") or {}).get("engines", {})
    if precision not in engines:
        has = ", ".join(engines) or "none"
        raise TensorRTUnavailable(f"the bundle has no {precision} TensorRT engine (has: {has});"
                                  f" export with --tensorrt on a GPU host")
    return engines[precision]["file"]


def build_engine(onnx_path: Path, engine_path: Path, image_size: int, max_batch: int,
                 timing_cache: Path | None = None, workspace_gb: float = 4.0) -> dict:
    """Build and serialise an engine; returns build info for the manifest."""
    trt = _trt()
    torch = _cuda_torch()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape("pixels", (1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    props = torch.cuda.get_device_properties(0)
    return {"tensorrt": trt.__version__, "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "max_batch": max_batch, "source": onnx_path.name}


class TensorRTRunner:
    """Runs a serialised engine on torch CUDA buffers; `run` takes and returns NumPy like the ORT path."""

    def __init__(self, engine_path: Path):
        trt = _trt()
        self.torch = _cuda_torch()
        if not engine_path.is_file():
            raise TensorRTUnavailable(f"engine {engine_path} is missing")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise TensorRTUnavailable(f"{engine_path} does not load here (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = self.torch.cuda.Stream()

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).cuda(non_blocking=True)
            self.context.set_input_shape("pixels", tuple(x.shape))
            self.context.set_tensor_address("pixels", x.data_ptr())
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}
