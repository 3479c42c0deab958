"""What the fused heads cost inside a bundle's image graph: the full graph against the same graph cut at `features`
(the bare image encoder: same weights, same kernels, no adapters, heads or gate), timed interleaved in one run.

    python -m benchmarks.graph_overhead --bundle BUNDLE [--batch 8] [--threads 2] [--iters 20]
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


def encoder_only(graph: Path, out: Path) -> Path:
    import onnx.utils

    onnx.utils.extract_model(str(graph), str(out), ["pixels"], ["features"])
    return out


def overhead(bundle_dir: Path, precision: str, batch: int, threads: int, iters: int) -> dict:
    from export.bundle import ort_session, read_manifest

    manifest = read_manifest(bundle_dir)
    graph = bundle_dir / manifest["graphs"]["image"][precision]["file"]
    size = manifest["preprocess"]["size"]
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"full": ort_session(graph, "cpu", threads)[0],
                    "encoder": ort_session(encoder_only(graph, Path(tmp) / "encoder.onnx"), "cpu", threads)[0]}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(2):  # warm-up
            for s in sessions.values():
                s.run(None, {"pixels": pixels})
        for _ in range(iters):  # interleaved, so drift in machine load hits both alike
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"pixels": pixels})
                times[name].append(time.perf_counter() - t0)
    full, enc = (float(np.median(times[k])) for k in ("full", "encoder"))
    return {"precision": precision, "batch": batch, "threads": threads, "iters": iters,
            "full_graph_ms": round(full * 1e3, 2), "encoder_only_ms": round(enc * 1e3, 2),
            "heads_overhead_pct": round((full / enc - 1) * 100, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path, help="bundle dir")
    p.add_argument("--precision", help="image graph to measure (default: every one in the bundle)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--iters", type=int, default=20, help="timed runs of each graph (median reported)")
    args = p.parse_args(argv)
    from export.bundle import BundleError, read_manifest

    try:
        precisions = [args.precision] if args.precision else list(read_manifest(args.bundle)["graphs"]["image"])
        for precision in precisions:
            print(json.dumps(overhead(args.bundle, precision, args.batch, args.threads, args.iters)))
    except (BundleError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
