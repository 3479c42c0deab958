"""What this host is (CPU model, family and the instruction sets that decide int8/bf16 speed, cores, GPUs, runtime
library versions), round-robin timing and latency percentiles: shared by `fvgpt tune`, its tuning profiles and the
benchmarks.

Which runtime × precision is fastest depends on exactly these facts (AMD Zen 4 and Zen 5 differ two-fold against
torch eager), so a tuning profile records them and is used only on a host that has the same.
"""
from __future__ import annotations

import copy
import functools
import os
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

# CPU features that explain int8/bf16 speed (VNNI, AVX-512 BF16, AMX).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")
# The libraries whose versions decide which tower is fastest.
RUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "tensorrt-cu13")


def cpu_info() -> dict[str, Any]:
    """model name, family and model number (AMD: family 25 = Zen 4, 26 = Zen 5), physical cores, speed flags."""
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpu_family": None,
                            "cpu_model": None, "cpu_cores_physical": None, "cpu_flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields: dict[str, str] = {}
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
        elif key and key not in fields:
            fields[key] = value
    flags = set(fields.get("flags", "").split())
    return info | {"cpu": fields.get("model name") or info["cpu"],
                   "cpu_family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
                   "cpu_model": int(fields["model"]) if fields.get("model", "").isdigit() else None,
                   "cpu_cores_physical": len(cores) or None, "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpu_info() -> list[dict] | None:
    """The NVIDIA GPUs nvidia-smi lists (no torch needed); None when there are none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        name, memory, driver = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "memory_mib": int(memory) if memory.isdigit() else memory, "driver": driver})
    return gpus or None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def host_facts() -> dict[str, Any]:
    """What a tuning profile must match: the CPU and its speed flags, the cores this process may use, the GPUs, and
    the runtime libraries' versions. A copy of facts read once per process: a server checks them for every bundle it
    loads (nvidia-smi included), and they do not change under it."""
    return copy.deepcopy(_host_facts())


@functools.cache
def _host_facts() -> dict[str, Any]:
    cpu = cpu_info()
    return {"cpu": cpu["cpu"], "cpu_family": cpu["cpu_family"], "cpu_model": cpu["cpu_model"],
            "cpu_flags": cpu["cpu_flags"], "cores_usable": usable_cores(),
            "gpus": [g["name"] for g in gpu_info() or []],
            "versions": {name: package_version(name) for name in RUNTIME_PACKAGES}}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a figure taken while other work ran on the machine is worth less."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


LATENCY_KEYS = ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "latency_ms_mean")


def latency_summary(seconds: list[float]) -> dict:
    """p50/p95/p99/mean in milliseconds (linear interpolation: with fewer than 100 samples p99 is close to max);
    all None without samples."""
    if not seconds:
        return dict.fromkeys(LATENCY_KEYS)
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    figures = [*np.percentile(ms, [50, 95, 99]), ms.mean()]
    return {key: float(value) for key, value in zip(LATENCY_KEYS, figures, strict=True)}


def round_robin(calls: dict[Any, Callable[[Any], Any]], arg: Any, warmup: int, iters: int,
                tick: Callable[[], None] = lambda: None) -> dict[Any, list[float]]:
    """Seconds of `iters` timed calls of each callable, taken in turns — one of each per round — so load from other
    processes hits all alike. Each timed call follows an untimed one of the same callable: the thread pools of the
    previous runtime (ONNX Runtime and OpenVINO both spin a while after a call) have gone quiet by then."""
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for i in range(warmup + iters):
        for key, fn in calls.items():
            fn(arg)
            if i >= warmup:
                t0 = time.perf_counter()
                fn(arg)
                times[key].append(time.perf_counter() - t0)
            tick()
    return times
