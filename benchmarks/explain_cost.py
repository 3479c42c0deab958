"""What the explain graph costs against the plain tower graph it sits beside, per precision, timed interleaved in one
run on the same pixels (ONNX Runtime, one session per graph, the same threads).

    python -m benchmarks.explain_cost --bundle BUNDLE [--batch 8] [--threads 2] [--iters 10] [--out FILE.json]

BUNDLE must be exported with `fvgpt export --explain` (and --precision int8 for the int8 pair).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def cost(bundle_dir: Path, batch: int, threads: int, iters: int) -> dict:
    from fvgpt_runtime.bundle import Bundle

    bundle = Bundle(bundle_dir, threads=threads)
    size = bundle.preprocess.size
    pixels = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    out: dict = {"bundle": str(bundle_dir), "model": bundle.manifest.backbone.name, "batch": batch,
                 "threads": threads, "iters": iters, "cpu": platform.processor() or platform.machine(),
                 "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "ms_per_image": {}}
    for explain in bundle.manifest.towers["image"].explain.values():
        p = explain.precision
        runs = {"plain": bundle.tower(p, threads=threads), "explain": bundle.explainer(p, threads=threads)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn(pixels)
        for _ in range(iters):  # interleaved: drift on a shared machine hits both alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn(pixels)
                times[name].append(time.perf_counter() - t0)
        med = {k: 1000 * float(np.median(v)) / batch for k, v in times.items()}
        out["ms_per_image"][p] = med | {"ratio": med["explain"] / med["plain"]}
    out["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = cost(args.bundle, args.batch, args.threads, args.iters)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
