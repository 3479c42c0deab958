"""Small helpers shared by the benchmark scripts: the record of the machine and libraries, percentiles, photos, CSV.

Kept free of torch and onnxruntime imports so that http_load stays light; anything heavy is imported where used. The
host facts and latency percentiles come from fvgpt_runtime.host, which `fvgpt tune` uses too.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from fvgpt_runtime.host import cpu_info, gpu_info, latency_summary, load_average, package_version, usable_cores

__all__ = ["BenchError", "command_line", "decode_batch", "int_list", "latency_summary", "library_versions",
           "load_average", "machine_info", "photo_bytes", "run_reporting_errors", "usable_cores", "utc_now",
           "write_outputs"]

# The packages whose versions decide a figure; absent ones are recorded as null.
PACKAGES = ("fvgpt-serve", "torch", "open_clip_torch", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt",
            "tensorrt-cu13", "numpy", "pillow", "bentoml")


class BenchError(RuntimeError):
    """A problem the user can act on: the scripts print its message (no traceback) and exit 2."""


def run_reporting_errors(run, args) -> dict | None:
    """run(args); a problem the user can act on (BenchError, FVGPTError) is printed without a traceback → None."""
    from fvgpt.errors import FVGPTError

    try:
        return run(args)
    except (BenchError, FVGPTError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def command_line() -> str:
    """The exact command as typed (interpreter included), so a reader can rerun it."""
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def machine_info() -> dict:
    """The CPU (model, family: AMD 25 = Zen 4, 26 = Zen 5; speed flags), cores, memory, OS and GPUs."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return cpu_info() | {"cpu_cores_logical": os.cpu_count(), "cpu_cores_usable": usable_cores(),
                         "memory_gib": round(memory / 2**30, 1), "os": platform.platform(), "gpus": gpu_info()}


def library_versions() -> dict:
    return {"python": platform.python_version()} | {name: package_version(name) for name in PACKAGES}


def photo_bytes() -> list[tuple[str, bytes]]:
    """The package's real JPEG photos as (name, bytes): what a client would upload."""
    from fvgpt.photos import photo_paths

    return [(p.name, p.read_bytes()) for p in photo_paths()]


def decode_batch(photos: list[tuple[str, bytes]], batch: int, cfg) -> np.ndarray:
    """Decode + preprocess `batch` JPEGs (cycling through the photos) exactly as the service does."""
    import io

    from PIL import Image

    from fvgpt_runtime.preprocess import preprocess

    arrays = []
    for i in range(batch):
        with Image.open(io.BytesIO(photos[i % len(photos)][1])) as image:
            image.load()
            arrays.append(preprocess(image, cfg))
    return np.stack(arrays)


def write_outputs(out: Path, stem: str, report: dict, rows: list[dict]) -> tuple[Path, Path]:
    """`stem`.json (the whole report) and `stem`.csv (one row per measurement, the columns of the first row)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["runtime"])
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def run_and_write(run, args, stem: str, rows_key: str) -> tuple[dict, Path, Path] | None:
    """`run(args)` → its report, written to args.out as `stem`.json and `stem`.csv (the rows under `rows_key`); None
    after printing the message of a BenchError or FVGPTError (the caller exits 2)."""
    if (report := run_reporting_errors(run, args)) is None:
        return None
    return report, *write_outputs(Path(args.out), stem, report, report[rows_key])


def int_list(text: str) -> list[int]:
    """argparse type for "1,8,32": positive integers, duplicates dropped, order kept."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
