"""TensorRT engines for the tower (GPU hosts only; `tensorrt` and `cuda-python` are imported lazily).

The engine is built as a *strongly typed* network from the bundle's own ONNX tower of the requested precision, so
the precision policy lives in one place: for fp16 that is precision.convert_fp16's graph, whose LayerNorm, Softmax
and normalisation are fp32 islands that TensorRT must keep (TensorRT 10 needs the STRONGLY_TYPED flag for this;
TensorRT 11 always builds that way). One optimisation profile spans batch 1..max_batch and the timing cache is kept
beside the engine so rebuilds on the same GPU are fast. runtime.tensorrt runs the engines.
"""
from __future__ import annotations

from pathlib import Path

from fvgpt_runtime.tensorrt import import_cudart, import_tensorrt

ENGINE_DIR = "engines"


def build_engine(onnx_path: Path, engine_path: Path, image_size: int, max_batch: int,
                 timing_cache: Path | None = None, workspace_gb: float = 4.0) -> dict:
    """Build and serialise an engine; returns build facts for the manifest."""
    trt = import_tensorrt()
    cudart = import_cudart()
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
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    err, props = cudart.cudaGetDeviceProperties(0)
    gpu = props.name.decode(errors="replace").rstrip("\x00") if int(err) == 0 else "unknown"
    return {"tensorrt": trt.__version__, "gpu": gpu, "compute_capability": f"{props.major}.{props.minor}",
            "max_batch": max_batch, "source": onnx_path.name}
