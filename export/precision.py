"""Reduced-precision tower graphs: int8 for CPUs (ONNX Runtime and OpenVINO), fp16 for GPUs.

Only the tower is reduced; the heads (adapters, the BRG's softmax statistics and blend) and the text graph stay fp32,
as the method asks for fp32 gates. Inside the tower, LayerNorm, Softmax, GELU and the attention core stay fp32 too:
only the projections (MatMul with a constant weight) are quantised.

A served answer must never depend on the other images in its batch, so no activation scale is computed over the
batch: ONNX Runtime's int8 quantises each token with its own scale (`quantize_int8`), OpenVINO's int8 uses static
scales calibrated once on images drawn like the parity set (`quantize_openvino_int8`). Measured (ViT-B/16, batch 8,
2 threads, Zen 5, loaded machine; docs/bundle-format.md, "Why per-token int8"): ONNX Runtime's dynamic quantisation
(one scale per batch) moved a batch-mate's probabilities by up to 7.6e-4; per-token scales give identical answers alone
and in a batch at 0.85-1.00x its speed; static QDQ in ONNX Runtime is no faster and less accurate; OpenVINO's int8 is
1.42x the dynamic int8.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["convert_fp16", "quantize_int8", "quantize_openvino_int8"]

INT8_MAX = 127.0
U8_ZERO = 128  # symmetric int8 stored as uint8 + 128: MLAS's fast u8 x s8 kernels take one scalar zero point


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a name (the quantisers address nodes by name), deterministically."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def quantize_int8(src: Path, dst: Path) -> None:
    """int8 projections with one activation scale per token, so each image is quantised on its own.

    Every MatMul x @ W with a constant 2-D weight becomes
        s_x = max|x| / 127 over the last axis (per token)    s_w = max|W| / 127 per output channel
        q_x = QuantizeLinear(x, s_x, 128)   (uint8, blocked: one block = one token's row)
        y   = MatMulIntegerToFloat(q_x, q_w, 1, s_w, 128) * s_x
    MatMulIntegerToFloat (ONNX Runtime's contrib op) runs the integer GEMM with the per-channel scale in its output
    stage; the per-token scale is one broadcast Mul. Integer accumulation is exact, so a row's result depends only on
    that row: the same features alone as in any batch.
    """
    model = _named(onnx.load(str(src)))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    shared = {"axes": np.array([-1], np.int64), "eps": np.array(1e-12, np.float32),
              "qmax": np.array(INT8_MAX, np.float32), "zp": np.array(U8_ZERO, np.uint8),
              "one": np.array(1.0, np.float32)}
    added = [numpy_helper.from_array(v, f"int8_{k}") for k, v in shared.items()]
    axes, eps, qmax, zp, one = (t.name for t in added)
    nodes = []
    for node in graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        W = numpy_helper.to_array(w).astype(np.float32)
        s_w = (np.maximum(np.abs(W).max(axis=0), 1e-12) / INT8_MAX).astype(np.float32)
        q_w = np.clip(np.round(W / s_w), -INT8_MAX, INT8_MAX).astype(np.int8)
        p, x = node.name, node.input[0]
        added += [numpy_helper.from_array(q_w, f"{p}_qw"), numpy_helper.from_array(s_w, f"{p}_sw")]

        def op(kind: str, inputs: list[str], output: str, **attrs) -> str:
            nodes.append(helper.make_node(kind, inputs, [output], name=f"{output}/{kind}", **attrs))
            return output

        hi = op("ReduceMax", [x, axes], f"{p}_max", keepdims=1)
        lo = op("Neg", [op("ReduceMin", [x, axes], f"{p}_min", keepdims=1)], f"{p}_negmin")
        s_x = op("Div", [op("Max", [hi, lo, eps], f"{p}_absmax"), qmax], f"{p}_sx")
        zps = op("Expand", [zp, op("Shape", [s_x], f"{p}_sxshape")], f"{p}_zps")  # blocked zero points: x's rank
        q_x = op("QuantizeLinear", [x, s_x, zps], f"{p}_qx", axis=-1, block_size=W.shape[0])
        nodes.append(helper.make_node("MatMulIntegerToFloat", [q_x, f"{p}_qw", one, f"{p}_sw", zp], [f"{p}_yw"],
                                      name=f"{p}/int8", domain="com.microsoft"))
        op("Mul", [f"{p}_yw", s_x], node.output[0])
    used = {name for n in nodes for name in n.input}
    kept = [t for t in [*graph.initializer, *added] if t.name in used]  # drops the fp32 weights that were replaced
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))


def quantize_openvino_int8(src: Path, dst: Path, calibration: np.ndarray) -> None:
    """NNCF post-training quantisation of the ONNX fp32 tower into an OpenVINO IR (`dst` .xml + .bin): int8 weights
    and static activation scales from `calibration` (pixels drawn like the parity set, never the parity set itself),
    transformer preset (SmoothQuant, fp32 LayerNorm/GELU/Softmax)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    data = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    quantized = nncf.quantize(core.read_model(str(src)), data, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration))
    ov.save_model(quantized, str(dst), compress_to_fp16=False)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations with fp32 inputs/outputs; norms and softmax stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "ReduceL2"]
    onnx.save(convert_float_to_float16(_named(onnx.load(str(src))), keep_io_types=True, op_block_list=blocked),
              str(dst))
