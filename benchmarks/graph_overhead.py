"""What splitting the image side into a shared tower and per-bundle heads costs, against one fused graph.

The split path is what serving runs: the tower graph, then the heads graph through the runtime's label routing
(Bundle.scores: table lookup + one ONNX Runtime call). The fused path is one graph, built here by joining the same
two graphs at `features` (onnx.compose), fed the same tables. Both are timed interleaved in one run.

    python -m benchmarks.graph_overhead --bundle BUNDLE [--precision int8] [--batch 8] [--threads 2] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def fused_graph(tower: Path, heads: Path, out: Path) -> Path:
    """tower ∘ heads as one ONNX graph: the tower's `features` output feeds the heads' `features` input."""
    import onnx
    from onnx import compose

    t, h = onnx.load(str(tower)), onnx.load(str(heads))
    h = compose.add_prefix(h, "heads/", rename_inputs=False, rename_outputs=False)
    merged = compose.merge_models(t, h, io_map=[("features", "features")])
    onnx.save(merged, str(out))
    return out


def overhead(bundle_dir: Path, precision: str, batch: int, threads: int, iters: int) -> dict:
    from fvgpt_runtime.bundle import Bundle
    from fvgpt_runtime.sessions import ort_session

    bundle = Bundle(bundle_dir, threads=threads)
    m = bundle.manifest
    tower = bundle.tower(precision, threads=threads)
    size = m.preprocess.size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    names = list(bundle.classes.names)
    learned, clip = bundle.label_features(names)
    tables = {"clip": clip} if bundle.kind != "fvgpt" else {"learned": learned, "clip": clip,
                                                           "adapted": bundle.tables["adapted"]}
    output = "logits" if bundle.kind != "fvgpt" else bundle.scores(tower(pixels[:1])).head + "_logits"
    with tempfile.TemporaryDirectory() as tmp:
        graph = fused_graph(bundle_dir / m.image_tower("onnx", precision).file, bundle_dir / m.heads.file,
                            Path(tmp) / "fused.onnx")
        fused, _ = ort_session(graph, "cpu", threads)
        paths = {"split": lambda: bundle.scores(tower(pixels)).logits,
                 "fused": lambda: fused.run([output], {"pixels": pixels} | tables)[0]}
        np.testing.assert_allclose(paths["split"](), paths["fused"](), atol=1e-4)  # the same function, two layouts
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(2):  # warm-up
            for run in paths.values():
                run()
        for _ in range(iters):  # interleaved, so drift in machine load hits both alike
            for name, run in paths.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    split, fused_s = (float(np.median(times[k])) for k in ("split", "fused"))
    return {"bundle": m.model_id, "precision": precision, "batch": batch, "threads": threads, "iters": iters,
            "classes": len(names), "split_ms": round(split * 1e3, 3), "fused_ms": round(fused_s * 1e3, 3),
            "split_overhead_pct": round((split / fused_s - 1) * 100, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path, help="bundle dir")
    p.add_argument("--precision", help="ONNX Runtime tower precision to measure (default: every one in the bundle)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--iters", type=int, default=20, help="timed runs of each path (median reported)")
    args = p.parse_args(argv)
    from fvgpt_runtime.manifest import BundleError, Manifest

    try:
        precisions = [args.precision] if args.precision else Manifest.read(args.bundle).towers["image"].precisions("onnx")
        for precision in precisions:
            print(json.dumps(overhead(args.bundle, precision, args.batch, args.threads, args.iters)), flush=True)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
