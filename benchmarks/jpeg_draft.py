"""What JPEG draft decoding (fvgpt_runtime.preprocess.draft) changes, against open_clip's full-resolution transform.

    python -m benchmarks.jpeg_draft [--sizes 224,64] [--factors 2,3,4] [--out runs/benchmarks]

Large JPEGs are built from scikit-image's sample photos at their native resolution (mosaics, so the content is real
photographs, not upscaled), encoded at quality 90 (4:2:0). For each model input size S and draft factor k (the short
side is kept ≥ k·S; the service uses k = DRAFT_FACTOR), it reports the decoded size, the decode + preprocess time
with and without draft, and the mean and max absolute difference of the normalised pixel tensors (the model's input;
one grey level is about 0.015). Writes jpeg_draft.json and jpeg_draft.csv.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/jpeg_draft.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import (command_line, int_list, library_versions, load_average, machine_info, utc_now,
                               write_outputs)

TILES = ("astronaut.png", "coffee.png", "motorcycle_left.png", "grass.png", "gravel.png", "brick.png",
         "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "chelsea.png", "rocket.jpg", "camera.png")
SIZES = ((4000, 3000), (1600, 1200))
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # open_clip's CLIP values


def mosaic(width: int, height: int, seed: int):
    import skimage
    from PIL import Image

    folder = Path(os.path.dirname(skimage.__file__)) / "data"
    tiles = [Image.open(folder / name).convert("RGB") for name in TILES]
    rng = np.random.default_rng(seed)
    canvas, y = Image.new("RGB", (width, height)), 0
    while y < height:
        x = row = 0
        while x < width:
            tile = tiles[rng.integers(len(tiles))]
            canvas.paste(tile, (x, y))
            x, row = x + tile.size[0], max(row, tile.size[1])
        y += row
    return canvas


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    import fvgpt_runtime.preprocess as pp
    from fvgpt.preprocess import Preprocess

    p = argparse.ArgumentParser(prog="python -m benchmarks.jpeg_draft", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int_list, default=[224, 64], help="model input sizes S (default 224,64)")
    p.add_argument("--factors", type=int_list, default=[2, 3, 4], help="draft factors k (default 2,3,4)")
    p.add_argument("--seeds", type=int, default=2, help="mosaics per image size (default 2)")
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    load_start, rows = load_average(), []
    default_factor = pp.DRAFT_FACTOR
    try:
        for width, height in SIZES:
            for seed in range(args.seeds):
                buf = io.BytesIO()
                mosaic(width, height, seed).save(buf, "JPEG", quality=90)
                data = buf.getvalue()
                for size in args.sizes:
                    cfg = Preprocess(size, MEAN, STD)
                    t0 = time.perf_counter()
                    full = pp.preprocess(Image.open(io.BytesIO(data)), cfg)
                    full_ms = (time.perf_counter() - t0) * 1e3
                    for k in args.factors:
                        pp.DRAFT_FACTOR = k
                        t0 = time.perf_counter()
                        image = pp.draft(Image.open(io.BytesIO(data)), [cfg])
                        x = pp.preprocess(image, cfg)
                        ms = (time.perf_counter() - t0) * 1e3
                        d = np.abs(x - full)
                        rows.append({"image": f"{width}x{height}", "seed": seed, "S": size, "k": k,
                                     "decoded": f"{image.size[0]}x{image.size[1]}", "full_ms": round(full_ms, 1),
                                     "draft_ms": round(ms, 1), "mean_abs_diff": round(float(d.mean()), 5),
                                     "max_abs_diff": round(float(d.max()), 4)})
                        print(rows[-1], flush=True)
    finally:
        pp.DRAFT_FACTOR = default_factor
    report = {"benchmark": "jpeg_draft", "created": utc_now(), "command": command_line(), "machine": machine_info(),
              "load_average": {"start": load_start, "end": load_average()}, "versions": library_versions(),
              "service_factor": default_factor, "results": rows}
    json_path, csv_path = write_outputs(Path(args.out), "jpeg_draft", report, rows)
    print(f"wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
