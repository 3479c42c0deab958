"""Small helpers shared by the benchmark scripts: the record of the machine and libraries, percentiles, photos, CSV.

Kept free of torch and onnxruntime imports so that http_load stays light; anything heavy is imported where used.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

# The packages whose versions decide a figure; absent ones are recorded as null.
PACKAGES = ("fvgpt-serve", "torch", "open_clip_torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu13",
            "numpy", "pillow", "bentoml")
# CPU features that explain int8/bf16 speed (VNNI, AVX-512 BF16, AMX).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")


class BenchError(RuntimeError):
    """A problem the user can act on: the scripts print its message (no traceback) and exit 2."""


def command_line() -> str:
    """The exact command as typed (interpreter included), so a reader can rerun it."""
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def _cpuinfo() -> tuple[str, int | None, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), None, []
    model, cores, flags = "", set(), set()
    physical = "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and not model:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), len(cores) or None, [f for f in CPU_FLAGS if f in flags]


def gpu_info() -> list[dict] | None:
    """The NVIDIA GPUs nvidia-smi lists (no torch needed, so http_load stays light); None when there are none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        name, memory, driver = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "memory_mib": int(memory) if memory.isdigit() else memory, "driver": driver})
    return gpus or None


def machine_info() -> dict:
    model, physical, flags = _cpuinfo()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cpu": model, "cpu_cores_physical": physical, "cpu_cores_logical": os.cpu_count(),
            "cpu_cores_usable": usable_cores(), "cpu_flags": flags, "memory_gib": round(memory / 2**30, 1),
            "os": platform.platform(), "gpus": gpu_info()}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a figure taken while other work ran on the machine is worth less."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


LATENCY_KEYS = ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "latency_ms_mean")


def latency_summary(seconds: list[float]) -> dict:
    """p50/p95/p99/mean in milliseconds (linear interpolation: with fewer than 100 samples p99 is close to max);
    all None without samples."""
    if not seconds:
        return dict.fromkeys(LATENCY_KEYS)
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    figures = [*np.percentile(ms, [50, 95, 99]), ms.mean()]
    return {key: float(value) for key, value in zip(LATENCY_KEYS, figures, strict=True)}


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


def server_processes(server_pid: int) -> dict[str, list]:
    """The worker processes (psutil.Process) of a `bentoml serve` process, by role: "api" (the FVGPT service) and
    "encoder" (fvgpt-encoder), told apart by their command lines."""
    import psutil

    roles: dict[str, list] = {"api": [], "encoder": []}
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "_bentoml_impl.worker.service" in cmd:
            roles["encoder" if "fvgpt-encoder" in cmd else "api"].append(proc)
    return roles


def rss_mib(server_pid: int) -> dict[str, float]:
    """RSS of the API worker, the encoder worker and all the server's processes together."""
    import psutil

    out = {"api": 0.0, "encoder": 0.0, "total": 0.0}
    root = psutil.Process(server_pid)
    roles = server_processes(server_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            rss = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
        out["total"] += rss
        for role in ("api", "encoder"):
            if any(p.pid == proc.pid for p in roles[role]):
                out[role] += rss
    return out


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
    from fvgpt.errors import FVGPTError

    try:
        report = run(args)
    except (BenchError, FVGPTError) as exc:
        print(f"error: {exc}", file=sys.stderr)
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
