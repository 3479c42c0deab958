"""Batch classification three ways on the same images, bundle and tower variant, in one run: `fvgpt classify` (Ray
Data, local), a plain single-process loop over the Python API, and HTTP (`fvgpt serve` loaded by http_load's
clients). Each reports its fixed start-up cost apart from its steady images/s, and the peak RSS of its processes.

    python -m benchmarks.batch --bundle B --runtime openvino --precision int8 --images 2000 --out DIR
    python -m benchmarks.batch --bundle MICRO --soak 100000 --soak-size 64 --out DIR     # memory over a long job

Images: the package's photos (real JPEGs), copied round-robin to --images files: every method decodes the same bytes.
Start-up: loop — loading the classifier and its first batch; Ray — from the command's start until its first rows
came back (Ray, the actors loading the bundle, the first batch: `fvgpt classify`'s summary); HTTP — the server's start
until ready. Steady images/s: after the start-up. The soak generates small PNGs and samples the RSS of `fvgpt
classify` and all its children (Ray's daemons and workers) every --rss-every seconds.
Writes batch.json / batch.csv (and soak.json with the RSS series).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if not __package__:  # `python benchmarks/batch.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fvgpt_runtime.host import load_average

from benchmarks.common import (
    BenchError,
    command_line,
    library_versions,
    machine_info,
    photo_bytes,
    run_reporting_errors,
    utc_now,
    write_outputs,
)


class RssSampler:
    """Peak and series of the summed RSS of a process and all its descendants (Ray's daemons and workers), and of
    their summed USS (private memory): a sum of RSS counts the object store's shared pages once per process that maps
    them, so growth in RSS alone may be sharing, not a leak; USS is what each process holds alone."""

    def __init__(self, pid: int, every_s: float, uss: bool = False):
        import psutil

        self.root, self.every_s, self.uss, self.series, self.peak = psutil.Process(pid), every_s, uss, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = uss = 0
            for p in procs:
                try:
                    if self.uss:  # reads /proc/PID/smaps: tens of ms per large process, so only when asked
                        info = p.memory_full_info()
                        uss += info.uss
                    else:
                        info = p.memory_info()
                    rss += info.rss
                except psutil.Error:
                    pass
            sample = (round(time.perf_counter() - self.t0, 1), round(rss / 2**20, 1))
            self.series.append(sample + (round(uss / 2**20, 1), len(procs)) if self.uss else sample)
            self.peak = max(self.peak, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def write_images(folder: Path, n: int) -> None:
    photos = photo_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name, data = photos[i % len(photos)]
        (folder / f"{i:07d}-{name}").write_bytes(data)


def write_small_pngs(folder: Path, n: int, size: int) -> None:
    """Generated images (a colour gradient per image; a few hundred bytes each as PNG)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for i in range(n):
        sub = folder / f"{i // 10_000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        rgb = np.array([(i * 37) % 256, (i * 91) % 256, (i * 53) % 256], np.float32)
        img = (ramp[:, None, None] * rgb + (1 - ramp[None, :, None]) * (255 - rgb)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(sub / f"{i:07d}.png")


def run_loop(args, images: list[str]) -> dict:
    """A plain single-process loop over the Python API, batches of --batch-size."""
    import fvgpt_runtime as fr

    t0 = time.perf_counter()
    clf = fr.load(args.bundle, args.runtime, args.precision)
    clf.classify(images[:args.batch_size], batch_size=args.batch_size)  # the first batch: sessions warm up
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(0, len(images), args.batch_size):
        clf.classify(images[i:i + args.batch_size], batch_size=args.batch_size)
    steady = time.perf_counter() - t1
    return {"method": "loop (Python API)", "images": len(images), "startup_s": startup,
            "images_per_s": len(images) / steady, "wall_s": startup + steady, "tower": f"{clf.choice.runtime}-"
            f"{clf.choice.precision}", "peak_rss_mib": _self_rss_mib(), "errors": 0}


def _self_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_ray(args, folder: Path, out: Path, every_s: float, uss: bool = False) -> tuple[dict, list]:
    cmd = [sys.executable, "-m", "fvgpt", "classify", args.bundle, "--input", str(folder), "--out", str(out),
           "--runtime", args.runtime, "--batch-size", str(args.batch_size), "--quiet"]
    if args.precision:
        cmd += ["--precision", args.precision]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = RssSampler(proc.pid, every_s, uss)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    rss.stop()
    if proc.returncode != 0:
        raise BenchError(f"fvgpt classify failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    # the command's own start-up (interpreter, imports, the driver verifying the bundle) is before its clock starts
    startup = wall - (summary["wall_s"] - summary["startup_s"])
    return {"method": "fvgpt classify (Ray Data, local)", "images": summary["images"], "startup_s": startup,
            "images_per_s": summary["images_per_s_steady"], "wall_s": wall, "tower": "",
            "peak_rss_mib": round(rss.peak / 2**20, 1), "errors": sum(summary["errors"].values())}, rss.series


def run_http(args, n: int) -> dict:
    from fvgpt_serving.process import free_port, stop, wait_ready

    from benchmarks.http_load import multipart, parse_target, run_level

    port = free_port()
    cmd = [sys.executable, "-m", "fvgpt", "serve", args.bundle, "--port", str(port), "--runtime", args.runtime]
    if args.precision:
        cmd += ["--precision", args.precision]
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rss = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, 300)
        startup = time.perf_counter() - t0
        rss = RssSampler(proc.pid, 1.0)
        photos = photo_bytes()
        bodies = [multipart(photos, i, 1) for i in range(len(photos))]
        level = argparse.Namespace(duration=3600.0, requests=n, timeout=120.0, images_per_request=1)
        row = run_level(parse_target(url), bodies, args.http_concurrency, level)
    finally:
        if rss is not None:
            rss.stop()
        stop(proc)
    if row["errors"]:
        raise BenchError(f"HTTP: {row['errors']} errors ({row['error_kinds']})")
    return {"method": f"HTTP POST /classify (concurrency {args.http_concurrency}, 1 image/request)",
            "images": row["ok"], "startup_s": startup, "images_per_s": row["images_per_s"],
            "wall_s": startup + row["duration_s"], "tower": "", "peak_rss_mib": round(rss.peak / 2**20, 1),
            "errors": 0}


def run(args) -> dict:
    if not Path(args.bundle, "manifest.json").is_file():
        raise BenchError(f"{args.bundle} is not a bundle folder")
    work = Path(tempfile.mkdtemp(prefix="fvgpt-batch-bench-"))
    load = {"start": load_average()}
    report = {"benchmark": "batch", "created": utc_now(), "command": command_line(), "machine": machine_info(),
              "versions": library_versions(), "settings": vars(args), "load_average": load}
    try:
        if args.soak:
            write_small_pngs(work / "soak", args.soak, args.soak_size)
            print(f"soak: {args.soak} images written", file=sys.stderr)
            row, series = run_ray(args, work / "soak", work / "soak-out", args.rss_every, uss=True)
            quarter = max(1, len(series) // 4)
            first, last = series[:quarter], series[-quarter:]

            def mean(rows: list, k: int) -> float:
                return round(sum(r[k] for r in rows) / len(rows), 1)

            report |= {"soak": row, "series_columns": ["s", "rss_mib", "uss_mib", "processes"],
                       "rss_series_mib": series,
                       "rss_first_quarter_mean_mib": mean(first, 1), "rss_last_quarter_mean_mib": mean(last, 1),
                       "uss_first_quarter_mean_mib": mean(first, 2), "uss_last_quarter_mean_mib": mean(last, 2),
                       "rss_peak_mib": row["peak_rss_mib"]}
            rows = [row]
        else:
            write_images(work / "images", args.images)
            paths = sorted(str(p) for p in (work / "images").iterdir())
            rows = []
            for method in args.methods:
                print(f"{method} ...", file=sys.stderr)
                if method == "loop":
                    rows.append(run_loop(args, paths))
                elif method == "ray":
                    rows.append(run_ray(args, work / "images", work / "out", 1.0)[0])
                else:
                    rows.append(run_http(args, args.images))
                print(f"  {rows[-1]}", file=sys.stderr)
            base = {r["method"].split()[0]: r["images_per_s"] for r in rows}
            for r in rows:
                r["ratio_to_loop"] = r["images_per_s"] / base["loop"] if "loop" in base else None
            report["ratios"] = {"ray_vs_loop": _ratio(base, "fvgpt", "loop"), "ray_vs_http": _ratio(base, "fvgpt",
                                                                                                       "HTTP")}
        report["results"] = rows
    finally:
        load["end"] = load_average()
        shutil.rmtree(work, ignore_errors=True)
    return report


def _ratio(base: dict, a: str, b: str) -> float | None:
    return base[a] / base[b] if a in base and b in base else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle dir")
    p.add_argument("--runtime", default="auto", help="tower runtime for all three (default auto: the tuning "
                                                     "profile's choice on this host)")
    p.add_argument("--precision", help="tower precision for all three (default: the profile's / the bundle's)")
    p.add_argument("--images", type=int, default=2000, help="images per method (default 2000)")
    p.add_argument("--batch-size", type=int, default=32, help="tower batch of the loop and of fvgpt classify "
                                                              "(default 32)")
    p.add_argument("--methods", default="loop,ray,http", type=lambda s: [m.strip() for m in s.split(",")],
                   help="which to run, in order (default loop,ray,http)")
    p.add_argument("--http-concurrency", type=int, default=8, help="HTTP clients (default 8)")
    p.add_argument("--soak", type=int, default=0, help="instead: N generated images through fvgpt classify, RSS "
                                                       "sampled (e.g. 100000)")
    p.add_argument("--soak-size", type=int, default=64, help="soak images' side in pixels (default 64)")
    p.add_argument("--rss-every", type=float, default=5.0, help="soak: seconds between RSS samples (default 5)")
    p.add_argument("--out", default="runs/benchmarks", help="folder for batch.json / .csv (soak.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [m for m in args.methods if m not in ("loop", "ray", "http")]
    if bad or args.images < args.batch_size:
        print(f"error: {'unknown methods ' + ', '.join(bad) if bad else '--images must be at least --batch-size'}",
              file=sys.stderr)
        return 2
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    if (report := run_reporting_errors(run, args)) is None:
        return 2
    stem = "soak" if args.soak else "batch"
    write_outputs(Path(args.out), stem, report, report["results"])
    print(json.dumps({k: report[k] for k in report if k not in ("rss_series_mib", "versions", "settings")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
