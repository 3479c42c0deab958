"""End-to-end HTTP load on a running FVG-PT service, on this machine only (loopback), bounded in requests and time.

    python -m benchmarks.http_load --url http://127.0.0.1:3000 --concurrency 1,8,16 --bundle BUNDLE

Each of C client threads keeps one HTTP/1.1 connection (http.client, standard library only) and sends real JPEG
photos to `POST {url}/classify` as multipart/form-data (field `images`), until --requests have been sent or
--duration has passed for that concurrency level. Reported per level: QPS in images/s (2xx answers only), latency
p50/p95/p99 of the 2xx answers, and the error count (non-2xx answers and transport errors). Given --bundle, the
model-only throughput of the same bundle (tower + heads at --model-batch, the service's batch size) is measured
before and after the load, and each level's images/s is reported as a ratio to it: how much of the model's speed the
service delivers end to end. With FVGPT_API_KEY set, it is sent as `Authorization: Bearer` (and never recorded).
Writes http_load.json and http_load.csv.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import itertools
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if not __package__:  # `python benchmarks/http_load.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BenchError, command_line, decode_batch, int_list, latency_summary, library_versions,
                               load_average, machine_info, photo_bytes, run_and_write, utc_now)

if TYPE_CHECKING:
    import numpy as np

    from fvgpt_runtime.bundle import Bundle, TowerRunner

API_KEY_ENV = "FVGPT_API_KEY"  # the service's (serving/config.py); not imported, to keep this script light
MAX_CONCURRENCY = 256
MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    path: str  # the /classify path, with any prefix of --url
    api_key: str | None = None  # from FVGPT_API_KEY; sent, never recorded

    @property
    def endpoint(self) -> str:
        return f"{self.url}/classify"


@dataclass
class Tally:
    """One client thread's results (merged after the threads join, so no locking on the hot path)."""

    latencies: list[float] = field(default_factory=list)  # seconds, 2xx answers
    errors: Counter = field(default_factory=Counter)
    last_done: float = 0.0


def parse_target(url: str) -> Target:
    """Loopback only: this tool is for measuring a service on this machine, never a load generator against others."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme != "http":
        raise BenchError(f"--url {url}: only http:// is supported (the service listens on plain HTTP on loopback)")
    host = (parts.hostname or "").lower()
    if not _is_loopback(host):
        raise BenchError(f"refusing to load {url}: http_load sends traffic only to loopback addresses "
                         f"(127.0.0.0/8, ::1 or localhost), and {host or 'no host'} is not one")
    try:
        port = parts.port or 80
    except ValueError:
        raise BenchError(f"--url {url}: the port is not a number in 1..65535") from None
    return Target(url.rstrip("/"), host, port, parts.path.rstrip("/") + "/classify",
                  os.environ.get(API_KEY_ENV, "").strip() or None)


def _is_loopback(host: str) -> bool:
    if host == "localhost":  # /etc/hosts may say anything: every address it maps to must be loopback
        try:
            infos = socket.getaddrinfo(host, None)
        except socket.gaierror:
            return False
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other name: not resolved, refused
        return False


def check_reachable(target: Target, timeout: float) -> None:
    try:
        socket.create_connection((target.host, target.port), timeout=timeout).close()
    except OSError as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or type(exc).__name__
        raise BenchError(f"cannot reach {target.url}: {why}. Is the service running? Start it with "
                         f"`fvgpt serve BUNDLE --host 127.0.0.1 --port {target.port}`") from None


def multipart(photos: list[tuple[str, bytes]], start: int, count: int,
              fields: list[tuple[str, str]] = ()) -> tuple[bytes, str]:
    """One request body with `count` photos in the `images` field (and text `fields`), and its content type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields]
    for i in range(count):
        name, data = photos[(start + i) % len(photos)]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(conn: http.client.HTTPConnection, target: Target, body: tuple[bytes, str]) -> tuple[int, bytes]:
    headers = {"Content-Type": body[1], "Accept": "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    conn.request("POST", target.path, body[0], headers)
    response = conn.getresponse()
    return response.status, response.read()


def check_service(target: Target, body: tuple[bytes, str], timeout: float) -> None:
    """One request before the load: a wrong path or a broken service is reported at once, not as N errors."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        status, data = post(conn, target, body)
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"POST {target.endpoint} failed: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
    if not 200 <= status < 300:
        excerpt = data[:300].decode("utf-8", "replace").strip()
        raise BenchError(f"POST {target.endpoint} answered {status}: {excerpt}")


def client(target: Target, bodies: list[tuple[bytes, str]], next_index, limit: int, deadline: float,
           timeout: float, tally: Tally) -> None:
    conn = None
    while (i := next(next_index)) < limit and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            conn = conn or http.client.HTTPConnection(target.host, target.port, timeout=timeout)
            status, _ = post(conn, target, bodies[i % len(bodies)])
        except (OSError, http.client.HTTPException) as exc:
            tally.errors[type(exc).__name__] += 1
            if conn is not None:
                conn.close()
            conn = None  # a fresh connection for the next request
            continue
        finally:
            tally.last_done = time.perf_counter()
        if 200 <= status < 300:
            tally.latencies.append(tally.last_done - t0)
        else:
            tally.errors[f"http {status}"] += 1
    if conn is not None:
        conn.close()


def run_level(target: Target, bodies: list[tuple[bytes, str]], concurrency: int, args) -> dict:
    counter = itertools.count()  # next() on a count is atomic under the GIL: requests are handed out exactly once
    tallies = [Tally() for _ in range(concurrency)]
    start = time.perf_counter()
    deadline = start + args.duration
    threads = [threading.Thread(target=client, args=(target, bodies, counter, args.requests, deadline, args.timeout,
                                                     tally), daemon=True) for tally in tallies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = max([t.last_done for t in tallies] + [start]) - start
    latencies = [x for t in tallies for x in t.latencies]
    errors = sum((t.errors for t in tallies), Counter())
    ok = len(latencies)
    row = {"concurrency": concurrency, "requests": ok + sum(errors.values()), "ok": ok,
           "errors": sum(errors.values()), "error_kinds": "; ".join(f"{k} x{v}" for k, v in errors.most_common()),
           "images_per_request": args.images_per_request, "duration_s": elapsed,
           "requests_per_s": ok / elapsed if elapsed else 0.0,
           "images_per_s": ok * args.images_per_request / elapsed if elapsed else 0.0}
    return row | latency_summary(latencies) | {"ratio_to_model_only": None}


def model_only(bundle: Bundle, tower: TowerRunner, pixels: np.ndarray, iters: int) -> float:
    """images/s of tower + heads (what /classify runs after decoding) on one preprocessed batch, after two untimed
    calls."""
    for _ in range(2):
        bundle.scores(tower(pixels))
    t0 = time.perf_counter()
    for _ in range(iters):
        bundle.scores(tower(pixels))
    return len(pixels) * iters / (time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_load", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL of the running service, loopback only "
                                                "(e.g. http://127.0.0.1:3000); requests go to {url}/classify")
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 16],
                   help=f"comma-separated numbers of concurrent clients, one level each (default 1,8,16; "
                        f"at most {MAX_CONCURRENCY})")
    p.add_argument("--requests", type=int, default=200, help=f"requests per level at most (default 200; "
                                                             f"at most {MAX_REQUESTS})")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level at most; requests in flight "
                                                                "then finish (default 30)")
    p.add_argument("--images-per-request", type=int, default=1, help="photos per request (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take before it counts as a "
                                                               "transport error (default 30)")
    p.add_argument("--warmup", type=int, default=4, help="sequential requests before the first level, not counted; "
                                                         "the first also checks the service answers 2xx (default 4)")
    g = p.add_argument_group("model-only reference (needs the bundle the service runs)")
    g.add_argument("--bundle", help="bundle dir: measure tower + heads before and after the load and report "
                                    "each level as a ratio to it")
    g.add_argument("--runtime", default="auto", help="tower runtime the service runs, as `fvgpt serve --runtime` "
                                                     "(default auto: the tuning profile's choice, else ONNX Runtime)")
    g.add_argument("--precision", help="tower precision the service runs, as `fvgpt serve --precision` (default: "
                                      "the tuning profile's choice, else the bundle's default)")
    g.add_argument("--model-batch", type=int, default=8, help="batch size of the model-only measurement: the "
                                                              "service's batch size (default 8)")
    g.add_argument("--model-iters", type=int, default=10, help="timed tower + heads calls each time (default 10)")
    p.add_argument("--out", default="runs/benchmarks", help="folder for http_load.json and .csv "
                                                            "(default runs/benchmarks)")
    return p


def validate(args) -> None:
    if max(args.concurrency) > MAX_CONCURRENCY:
        raise BenchError(f"--concurrency is capped at {MAX_CONCURRENCY}")
    if not 1 <= args.requests <= MAX_REQUESTS:
        raise BenchError(f"--requests must be in 1..{MAX_REQUESTS}")
    if not 0 < args.duration <= MAX_DURATION_S:
        raise BenchError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
    if args.timeout <= 0 or args.images_per_request < 1 or args.warmup < 1:
        raise BenchError("--timeout must be positive; --images-per-request and --warmup at least 1")
    if args.model_batch < 1 or args.model_iters < 1:
        raise BenchError("--model-batch and --model-iters must be at least 1")


def run(args) -> dict:
    validate(args)
    load_start = load_average()
    target = parse_target(args.url)
    check_reachable(target, min(args.timeout, 5.0))
    bundle = tower = pixels = None
    if args.bundle:  # loaded before any request, so a bad bundle path fails before the load
        from fvgpt_runtime.bundle import Bundle

        if not Path(args.bundle).exists():
            raise BenchError(f"bundle {args.bundle} does not exist")
        from fvgpt_runtime.tuning import choose_tower

        bundle = Bundle(args.bundle)
        # the tower `fvgpt serve` runs for these flags: the tuning profile's choice where it applies here
        tower, choice = choose_tower(bundle.path, bundle.manifest, args.runtime, args.precision)
        print(f"model-only reference: {choice.runtime}-{choice.precision} ({choice.reason})")
    photos = photo_bytes()
    bodies = [multipart(photos, i, args.images_per_request) for i in range(len(photos))]
    check_service(target, bodies[0], args.timeout)
    for i in range(1, args.warmup):
        check_service(target, bodies[i % len(bodies)], args.timeout)

    reference = None
    if bundle is not None:
        pixels = decode_batch(photos, args.model_batch, bundle.preprocess)
        reference = {"batch": args.model_batch, "runtime": tower.runtime, "precision": tower.precision,
                     "provider": tower.provider,
                     "iters": args.model_iters,
                     "before_images_per_s": model_only(bundle, tower, pixels, args.model_iters)}
    rows = []
    for c in args.concurrency:
        rows.append(run_level(target, bodies, c, args))
        r = rows[-1]
        print(f"concurrency {c}: {r['images_per_s']:.1f} images/s, p50 {r['latency_ms_p50'] or 0:.1f} ms, "
              f"{r['errors']} errors", file=sys.stderr)
    if bundle is not None:
        reference["after_images_per_s"] = model_only(bundle, tower, pixels, args.model_iters)
        before, after = reference["before_images_per_s"], reference["after_images_per_s"]
        reference["images_per_s"] = (before + after) / 2
        reference["spread"] = abs(before - after) / reference["images_per_s"]  # noise bracket of the ratio
        for r in rows:
            r["ratio_to_model_only"] = r["images_per_s"] / reference["images_per_s"]
    return {
        "benchmark": "http_load", "created": utc_now(), "command": command_line(), "cwd": str(Path.cwd()),
        "machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
        "versions": library_versions(),
        "settings": {"url": target.url, "endpoint": f"POST {target.endpoint}", "concurrency": args.concurrency,
                     "requests": args.requests, "duration_s": args.duration, "timeout_s": args.timeout,
                     "images_per_request": args.images_per_request, "warmup": args.warmup,
                     "photos": [name for name, _ in photos], "client": "threads + http.client, keep-alive"},
        "bundle": None if bundle is None else {"path": str(Path(args.bundle).resolve()),
                                               "model_id": bundle.model_id, "kind": bundle.kind},
        "model_only": reference,
        "results": rows,
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| concurrency | requests | errors | images/s | p50 ms | p95 ms | p99 ms | x model-only |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = [f"{r[k]:.1f}" if r[k] is not None else "—" for k in ("latency_ms_p50", "latency_ms_p95",
                                                                     "latency_ms_p99")]
        ratio = "—" if r["ratio_to_model_only"] is None else f"{r['ratio_to_model_only']:.2f}"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['images_per_s']:.1f} | "
                     f"{' | '.join(ms)} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if (written := run_and_write(run, build_parser().parse_args(argv), "http_load", "results")) is None:
        return 2
    report, json_path, csv_path = written
    print(markdown_table(report["results"]))
    if (ref := report["model_only"]) is not None:
        print(f"model-only ({ref['provider']}, {ref['precision']}, batch {ref['batch']}): "
              f"{ref['before_images_per_s']:.1f} images/s before, {ref['after_images_per_s']:.1f} after")
    if errors := sum(r["errors"] for r in report["results"]):
        print(f"{errors} requests failed (see error_kinds)")
    print(f"wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
