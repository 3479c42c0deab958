"""Heavy requests against `fvgpt serve`, this checkout against an older one, measured in one run on loopback.

    git worktree add /tmp/fvgpt-base bd051a9        # the code before the fault work (or any other checkout)
    python -m benchmarks.heavy_requests --baseline /tmp/fvgpt-base [--bundle BUNDLE] [--out runs/benchmarks]

Servers, each on the same bundle (default: a tiny zero-shot bundle exported first), one after the other:
  baseline        the --baseline checkout's code, its defaults
  current         this checkout, its defaults
  current-admit   this checkout with FVGPT_MAX_REQUEST_PIXELS raised to admit the heavy request below, so its decode
                  cost and the fairness of decoding can be measured

and on each:
  heavy           one request of sixteen grey 7000² PNGs (62 KB each on the wire, 784 M pixels to inflate): status,
                  seconds, the API process's RSS growth at its peak
  light-under-heavy  one-photo requests, one after another, while four heavy requests run: their latency (p50/max),
                  against the same request on the idle server
  burst           sixteen concurrent requests of a 26 MiB PNG, three times: statuses, peak RSS of the API process,
                  and its RSS 1.5 s after each burst, against its RSS before the first
  idle latency    one-photo requests one after another (median of 15) on the fresh server, 2 s after 1,500
                  one-photo requests at concurrency 16, and 10 s after
Writes heavy_requests.json and heavy_requests.csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if not __package__:  # `python benchmarks/heavy_requests.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BenchError, command_line, library_versions, load_average, machine_info, photo_bytes,
                               run_and_write, utc_now)
from benchmarks.soak import Server, heavy_pngs, tiny_bundle

MODULES = {"fvgpt": "fvgpt", "fvgpt_runtime": "runtime", "fvgpt_export": "export", "fvgpt_serving": "serving"}
ADMIT_PIXELS = 1_000_000_000


def checkout_env(checkout: Path, work: Path) -> dict[str, str]:
    """Environment that makes `python -m fvgpt.cli` import the packages of another checkout (links named as the
    installed modules, first on PYTHONPATH, ahead of this checkout's editable install)."""
    if not (checkout / "serving" / "cli.py").is_file():
        raise BenchError(f"--baseline {checkout}: not a checkout of this repository (no serving/cli.py)")
    links = work / "baseline-path"
    links.mkdir()
    for module, folder in MODULES.items():
        (links / module).symlink_to(checkout.resolve() / folder)
    return {"PYTHONPATH": str(links)}


class RssPeak:
    """The API process's RSS, sampled every 50 ms while in use."""

    def __init__(self, server: Server):
        from fvgpt_serving.process import server_processes

        self.proc = server_processes(server.proc.pid)["api"][0]
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)

    def __enter__(self) -> RssPeak:
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def post(url: str, files: list) -> tuple[int, float]:
    import httpx

    t0 = time.perf_counter()
    status = httpx.post(f"{url}/classify", files=files, timeout=600).status_code
    return status, time.perf_counter() - t0


def idle_ms(url: str, light: list) -> float:
    return round(statistics.median(post(url, light)[1] for _ in range(15)) * 1e3, 1)


def measure(server: Server, heavy: list, body: bytes, photo: bytes) -> dict:
    url = server.url
    light = [("images", ("p.jpg", photo, "image/jpeg"))]
    post(url, light)
    fresh = idle_ms(url, light)
    with ThreadPoolExecutor(16) as pool:
        burst_codes = list(pool.map(lambda _: post(url, light)[0], range(1500)))
    time.sleep(2)
    after = idle_ms(url, light)
    time.sleep(8)
    latency = {"idle_fresh_ms": fresh, "idle_after_burst_ms": after, "idle_10s_after_ms": idle_ms(url, light),
               "burst_of_1500_ok": burst_codes.count(200)}
    rss = RssPeak(server)
    before = rss.now()
    with rss:
        status, seconds = post(url, heavy)
    row = latency | {"heavy_status": status, "heavy_s": round(seconds, 2),
                     "heavy_rss_growth_mib": round(rss.peak - before)}
    idle = statistics.median(post(url, light)[1] for _ in range(5))
    row |= {"light_idle_ms": round(idle * 1e3, 1), "light_under_heavy_p50_ms": None, "light_under_heavy_max_ms": None,
            "light_requests_under_heavy": 0, "four_heavy_s": None}
    if status == 200:  # refused heavy requests leave nothing to contend with
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, url, heavy) for _ in range(4)]
            time.sleep(0.5)
            under = []
            while not all(f.done() for f in futures):
                under.append(post(url, light)[1])
            heavy_times = [f.result()[1] for f in futures]
        if under:
            row |= {"light_under_heavy_p50_ms": round(statistics.median(under) * 1e3),
                    "light_under_heavy_max_ms": round(max(under) * 1e3), "light_requests_under_heavy": len(under)}
        row["four_heavy_s"] = round(max(heavy_times), 1)
    burst_files = [("images", ("noise.png", body, "image/png"))]
    start = rss.now()
    after, statuses = [], []
    with rss:
        for _ in range(3):
            with ThreadPoolExecutor(16) as pool:
                statuses += [s for s, _ in pool.map(lambda _: post(url, burst_files), range(16))]
            time.sleep(1.5)
            after.append(round(rss.now()))
    row |= {"burst_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "burst_rss_before_mib": round(start), "burst_rss_peak_mib": round(rss.peak),
            "burst_rss_after_each_mib": after}
    return row


def run(args) -> dict:
    load_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="fvgpt-heavy-"))
    bundle = Path(args.bundle) if args.bundle else tiny_bundle(work)
    grey, body = heavy_pngs()
    heavy = [("images", (f"g{i}.png", grey, "image/png")) for i in range(16)]
    photo = photo_bytes()[1][1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_") and k != "PYTHONPATH"}
    variants = [("current", clean), ("current-admit", clean | {"FVGPT_MAX_REQUEST_PIXELS": str(ADMIT_PIXELS)})]
    if args.baseline:
        variants.insert(0, ("baseline", clean | checkout_env(Path(args.baseline), work)))
    rows = []
    for name, env in variants:
        server = Server(bundle, Path(args.out) / f"heavy-{name}.log", env)
        try:
            server.wait()
            rows.append({"server": name} | measure(server, heavy, body, photo))
        finally:
            server.close()
        print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"benchmark": "heavy_requests", "created": utc_now(), "command": command_line(), "machine": machine_info(),
            "load_average": {"start": load_start, "end": load_average()}, "versions": library_versions(),
            "settings": {"bundle": str(bundle), "baseline": args.baseline, "grey_png_bytes": len(grey),
                         "burst_png_bytes": len(body), "admit_pixels": ADMIT_PIXELS},
            "results": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heavy_requests", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="another checkout of this repository to measure first (e.g. a git worktree)")
    p.add_argument("--bundle", help="bundle to serve (default: a tiny zero-shot bundle exported first)")
    p.add_argument("--out", default="runs/benchmarks", help="folder for heavy_requests.json/.csv and server logs")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if (written := run_and_write(run, args, "heavy_requests", "results")) is None:
        return 2
    report, json_path, csv_path = written
    for row in report["results"]:
        print(row)
    print(f"wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
