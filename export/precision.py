"""Reduced-precision image graphs: int8 for CPUs (static QDQ, calibrated), fp16 for GPUs.

Only the image encoder's MatMul/Gemm/Conv are reduced. Everything downstream of the image features (the adapters,
the two heads, the BRG's softmax statistics and blend) stays fp32, as do LayerNorm, Softmax and GELU: method.md asks
for fp32 gates, and those are the ops known to lose accuracy (anchors.md §C pitfalls 3–4).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

PRECISIONS = ("fp32", "fp16", "int8")


def downstream_nodes(model: onnx.ModelProto, tensor: str) -> list[str]:
    """Names of every node that (transitively) consumes `tensor`: the heads, when tensor = "features"."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen: dict[str, None] = {}
    frontier = [tensor]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in seen:
                seen[node.name] = None
                frontier.extend(node.output)
    return list(seen)


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, batch: int = 8) -> None:
    """Static int8 (QDQ): per-channel symmetric int8 weights, uint8 activations calibrated on `calibration`.

    The patch-embedding Conv stays fp32 (raw pixels are its input; it is <1 % of the FLOPs).
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = _named(onnx.load(str(src)))
    keep_fp32 = downstream_nodes(model, "features") + [n.name for n in model.graph.node if n.op_type == "Conv"]
    named = dst.with_suffix(".named.onnx")
    prepared = dst.with_suffix(".prep.onnx")
    onnx.save(model, str(named))
    try:
        quant_pre_process(str(named), str(prepared), skip_symbolic_shape=True)

        class Reader(CalibrationDataReader):
            def __init__(self, data: np.ndarray):
                self._it: Iterable = iter([{"pixels": data[i:i + batch]} for i in range(0, len(data), batch)])

            def get_next(self):
                return next(self._it, None)

        quantize_static(str(prepared), str(dst), Reader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep_fp32,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    finally:
        named.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations for the encoder, fp32 inputs/outputs, norms, softmax and heads."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _named(onnx.load(str(src)))
    blocked = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf"]
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked,
                                    node_block_list=downstream_nodes(model, "features"))
    onnx.save(fp16, str(dst))
