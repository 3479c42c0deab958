"""How to make int8 batch-independent without losing its speed: the candidate methods side by side on one bundle.

    python -m benchmarks.int8_methods --bundle BUNDLE [--batch 8] [--threads 2] [--rounds 8] [--out DIR]

Methods, all from the bundle's fp32 tower: `ort-dynamic` (ONNX Runtime's dynamic quantisation: one activation scale
per batch, what the project shipped before), `ort-per-token` (export.precision.quantize_int8, the bundle's onnx-int8),
`ort-static-qdq` (ONNX Runtime static QDQ, MatMul inputs only, so LayerNorm/GELU/Attention stay fp32, calibrated on
images drawn like the parity set), `openvino-nncf` (the bundle's openvino-int8, static scales by NNCF) and the fp32
references on both runtimes. Per method: images/s at --batch (median, round robin: fvgpt_runtime.host.round_robin),
features cosine to fp32 on the parity set, and batch independence (the same image
alone and inside the batch: max |Δ features|, max |Δ probability| through the bundle's heads). Writes int8_methods.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import (BenchError, command_line, library_versions, load_average, machine_info,
                               run_and_write, usable_cores, utc_now)
from fvgpt_runtime.host import round_robin


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["features"], {"pixels": x})[0]


def build_methods(bundle_dir: Path, work: Path, threads: int, calibration: np.ndarray) -> dict:
    """name → callable pixels → features; methods whose runtime is missing are left out with a note."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from fvgpt_runtime.bundle import Bundle

    bundle = Bundle(bundle_dir)
    tower = bundle.manifest.towers["image"]
    fp32 = bundle_dir / tower.find("onnx", "fp32").file
    quantize_dynamic(str(fp32), str(work / "dynamic.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(work / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    methods = {"ort-fp32": _ort(fp32, threads), "ort-dynamic": _ort(work / "dynamic.onnx", threads),
               "ort-static-qdq": _ort(work / "qdq.onnx", threads)}
    if tower.find("onnx", "int8"):
        methods["ort-per-token"] = bundle.tower("int8", "onnx", "cpu", threads)
    else:
        from fvgpt_export.precision import quantize_int8

        quantize_int8(fp32, work / "per-token.onnx")
        methods["ort-per-token"] = _ort(work / "per-token.onnx", threads)
    for precision, name in (("fp32", "openvino-fp32"), ("int8", "openvino-nncf")):
        if tower.find("openvino", precision):
            methods[name] = bundle.tower(precision, "openvino", "cpu", threads)
    return methods


def run(args) -> dict:
    from fvgpt_export.parity import calibration_pixels, parity_pixels
    from fvgpt_runtime.bundle import Bundle
    from fvgpt_runtime.manifest import Manifest

    path = Path(args.bundle)
    if not path.exists():
        raise BenchError(f"bundle {path} does not exist")
    manifest = Manifest.read(path)
    load_start = load_average()
    pixels = parity_pixels(manifest.preprocess, max(args.batch * 2, 16))
    with tempfile.TemporaryDirectory() as tmp:
        methods = build_methods(path, Path(tmp), args.threads, calibration_pixels(manifest.preprocess, 32))
        x = pixels[:args.batch]
        times = round_robin(methods, x, 1, args.rounds)
        bundle = Bundle(path, verify=False)
        features = {name: np.concatenate([fn(pixels[i:i + args.batch]) for i in range(0, len(pixels), args.batch)])
                    for name, fn in methods.items()}
        alone = {name: np.concatenate([fn(x[i:i + 1]) for i in range(len(x))]) for name, fn in methods.items()}
    ref = features["ort-fp32"]
    rows = []
    for name in methods:
        f = features[name]
        cos = (f * ref).sum(-1) / np.linalg.norm(f, axis=-1) / np.linalg.norm(ref, axis=-1)
        p_batch, p_alone = bundle.scores(f[:args.batch]).probabilities, bundle.scores(alone[name]).probabilities
        rows.append({"method": name, "batch_size": args.batch,
                     "images_per_s": args.batch / float(np.median(times[name])),
                     "min_cosine_to_fp32": float(cos.min()),
                     "batch_max_feature_diff": float(np.abs(f[:args.batch] - alone[name]).max()),
                     "batch_max_probability_diff": float(np.abs(p_batch - p_alone).max()),
                     "batch_independent": bool(np.abs(p_batch - p_alone).max() <= 1e-5)})
    base = {r["method"]: r["images_per_s"] for r in rows}
    for r in rows:
        r["ratio_to_ort_dynamic"] = r["images_per_s"] / base["ort-dynamic"]
    return {"benchmark": "int8_methods", "created": utc_now(), "command": command_line(), "machine": machine_info(),
            "load_average": {"start": load_start, "end": load_average()}, "versions": library_versions(),
            "settings": {"batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                         "timing": "median of round-robin timed calls, each after an untimed one"},
            "bundle": {"path": str(path.resolve()), "model": manifest.backbone.name}, "results": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_methods", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle dir (export with --precision int8 --openvino for all rows)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--threads", type=int, default=usable_cores(), help="threads per method (default: usable cores)")
    p.add_argument("--rounds", type=int, default=8, help="timed round-robin rounds (default 8)")
    p.add_argument("--out", default="runs/benchmarks", help="folder for int8_methods.json/.csv")
    args = p.parse_args(argv)
    if (written := run_and_write(run, args, "int8_methods", "results")) is None:
        return 2
    report, json_path, csv_path = written
    print(f"{report['machine']['cpu']} (family {report['machine']['cpu_family']}), load {report['load_average']}")
    print("| method | images/s | x ort-dynamic | min cosine to fp32 | batch max |Δ features| | batch max |Δp| |")
    print("|---|---|---|---|---|---|")
    for r in report["results"]:
        print(f"| {r['method']} | {r['images_per_s']:.1f} | {r['ratio_to_ort_dynamic']:.2f} | "
              f"{r['min_cosine_to_fp32']:.6f} | {r['batch_max_feature_diff']:.1e} | "
              f"{r['batch_max_probability_diff']:.1e} |")
    print(f"wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
