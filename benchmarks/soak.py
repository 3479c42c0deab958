"""Soak and fault test of `fvgpt serve`, on this machine only (loopback), bounded in time.

    python -m benchmarks.soak --minutes 5 [--bundle BUNDLE] [--concurrency 8] [--out runs/benchmarks]

Starts the server on a free loopback port (on BUNDLE, or on a tiny zero-shot bundle exported first) and runs
--concurrency client threads of mixed traffic for --minutes: valid requests (one to four of the package's photos,
multipart or JSON, every class or a few new labels) and, one request in four, hostile ones (malformed JSON and
multipart, bad base64 and data URIs, broken and oversized images, hostile labels and numbers, unknown paths, wrong
methods, protocol garbage, a lying Content-Length); beside them one slowloris thread keeps a connection with
half-sent headers or a half-sent body open at all times. Faults are injected at fixed fractions of the run:

  25%  the tower worker is killed (SIGKILL); the engine starts a new one and opens its towers again
  50%  big inputs: four requests of sixteen grey 7000² PNGs, and sixteen 26 MiB bodies at once
  75%  SIGTERM to the server while eight requests of eight grey 3000² PNGs each (seconds of decoding) are in
       flight, besides the clients' traffic: they must all be answered, the server must exit 0; a new server is
       started on another port and the clients move to it

Reported: requests by kind and outcome; 5xx answers outside the faults' own windows (a fault's window runs from its
injection until /readyz is 200 again; target 0) and 500s anywhere (target 0); p50/p99 latency of valid requests; the
RSS of the API worker and the tower worker every second; batch-independence violations: every valid answer is
compared with the bundle's answer for the same image computed alone in this process (same ranking, probabilities
within 1e-5; target 0). Writes soak.json and soak.csv (the RSS series).
"""
from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # `python benchmarks/soak.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BenchError, command_line, latency_summary, library_versions, load_average,
                               machine_info, photo_bytes, run_and_write, utc_now)

MAX_MINUTES = 60.0
LABEL_SETS = (None, ["a cat", "a rocket", "a cup of coffee"], ["an astronaut", "a dog"])
TOLERANCE = 1e-5


@dataclass
class Record:
    kind: str  # valid | hostile | big
    outcome: str  # "200", "4xx:413", "503", "500", or a transport error's name
    start: float
    end: float
    latency: float | None = None


@dataclass
class Soak:
    """Shared state of one run: the server in use, the records, the fault windows and the RSS series."""

    url: str
    records: list[Record] = field(default_factory=list)
    windows: list[tuple[str, float, float]] = field(default_factory=list)  # (fault, start, end)
    rss: list[dict] = field(default_factory=list)
    violations: list[dict] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)


# ---- the server -------------------------------------------------------------------------------------------------

class Server:
    """`fvgpt serve BUNDLE` on a free loopback port, in its own process group."""

    def __init__(self, bundle: Path, log: Path, env: dict[str, str]):
        from fvgpt_serving.process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "a")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen([sys.executable, "-m", "fvgpt.cli", "serve", str(bundle), "--port",
                                      str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout_s: float = 300) -> None:
        from fvgpt_serving.process import wait_ready

        wait_ready(self.proc, self.url, timeout_s)

    def close(self) -> None:
        from fvgpt_serving.process import stop

        stop(self.proc)
        self.log.close()


def tiny_bundle(work: Path) -> Path:
    """A zero-shot bundle of the randomly initialised fvgpt-tiny (exported and parity-gated here, in seconds)."""
    from fvgpt_export.build import ExportOptions, export_zero_shot

    return export_zero_shot("fvgpt-tiny", "none", ["cat", "dog", "rocket"], work / "bundle",
                            ExportOptions(progress=False, parity_images=16))


# ---- traffic ----------------------------------------------------------------------------------------------------

def encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def heavy_pngs() -> tuple[bytes, bytes]:
    """The heavy inputs of the soak and of heavy_requests: a 7000² grey gradient (47 KB on the wire, 49 M pixels to
    decode) and a 3000² RGB noise image (a 26 MiB body)."""
    import numpy as np
    from PIL import Image

    side = 7000
    grey = encode_png(Image.fromarray(np.tile(np.arange(side, dtype=np.uint8), (side, 1)), "L"))
    noise = encode_png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8)))
    return grey, noise


def expected_answers(bundle_dir: Path, photos: list[bytes]) -> dict:
    """(photo index, label set index) → (labels ranked, probabilities): the bundle alone, one image at a time."""
    from PIL import Image

    from fvgpt_runtime.bundle import Bundle
    from fvgpt_runtime.preprocess import draft, preprocess

    bundle = Bundle(bundle_dir)
    tower = bundle.tower()
    out = {}
    for i, data in enumerate(photos):
        features = tower(preprocess(draft(Image.open(io.BytesIO(data)), [bundle.preprocess]), bundle.preprocess)[None])
        for j, labels in enumerate(LABEL_SETS):
            scores = bundle.scores(features, labels)
            probs = scores.probabilities[0]
            order = sorted(range(len(probs)), key=lambda k: -probs[k])
            out[(i, j)] = ([scores.labels[k] for k in order], [float(probs[k]) for k in order])
    return out


def valid_request(rng: random.Random, photos: list[bytes]) -> tuple[dict, list[tuple[int, int]]]:
    """httpx keyword arguments of one valid /classify request, and (photo, label set) of each image in it."""
    idx = [rng.randrange(len(photos)) for _ in range(rng.randint(1, 4))]
    j = rng.randrange(len(LABEL_SETS))
    labels = LABEL_SETS[j]
    n = len(labels) if labels else 3
    if rng.random() < 0.5:
        doc = {"images": [base64.b64encode(photos[i]).decode() for i in idx], "top_k": n}
        kwargs = {"json": doc | ({"labels": labels} if labels else {})}
    else:
        fields = {"top_k": str(n)} | ({"labels": labels} if labels else {})
        kwargs = {"files": [("images", (f"p{i}.jpg", photos[i], "image/jpeg")) for i in idx], "data": fields}
    return kwargs, [(i, j) for i in idx]


def hostile_requests(photos: list[bytes]) -> list[tuple[str, str, str, dict]]:
    """(name, method, path, httpx request kwargs) of requests that must each get a 4xx."""
    from PIL import Image

    b64 = base64.b64encode(photos[0]).decode()
    bomb = encode_png(Image.new("1", (12000, 12000)))
    json_ct = {"content-type": "application/json"}
    post = [
        ("nested JSON", {"content": b'{"images": ' + b"[" * 2000 + b"]" * 2000 + b"}", "headers": json_ct}),
        ("invalid JSON", {"content": b"{not json", "headers": json_ct}),
        ("wrong types", {"json": {"images": [b64], "labels": {"a": 1}, "top_k": "5"}}),
        ("bad base64", {"json": {"images": ["not*base64!"]}}),
        ("data URI of text", {"json": {"images": ["data:text/html;base64," + b64]}}),
        ("URL", {"json": {"images": ["http://169.254.169.254/latest/meta-data"]}}),
        ("truncated JPEG", {"files": [("images", ("t.jpg", photos[1][: len(photos[1]) // 2]))]}),
        ("not an image", {"files": [("images", ("x.txt", b"hello"))]}),
        ("decompression bomb", {"files": [("images", ("bomb.png", bomb))]}),
        ("control-character label", {"json": {"images": [b64], "labels": ["c\x00t"]}}),
        ("too many labels", {"json": {"images": [b64], "labels": [f"l{i}" for i in range(500)]}}),
        ("top_k negative", {"json": {"images": [b64], "top_k": -1}}),
        ("unknown field", {"json": {"images": [b64], "image": 1}}),
        ("unsupported media type", {"content": photos[0], "headers": {"content-type": "image/jpeg"}}),
    ]
    return [(name, "POST", "/classify", kwargs) for name, kwargs in post] + [
        ("unknown path", "GET", "/classify/../admin", {}), ("wrong method", "GET", "/classify", {})]


RAW_HOSTILE = {  # sent on a raw socket, answered at once
    "protocol garbage": b"\x16\x03\x01\x02\x00\x01\r\n\r\n",
    "lying Content-Length": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 99999999999\r\n\r\n{}",
}
SLOWLORIS = {  # sent on a raw socket, answered (408) only when the server's header or body timeout ends them
    "half-sent headers": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Ty",
    "half-sent body": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"images\": [",
}


def raw_outcome(url: str, data: bytes, wait_s: float) -> str:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(data)
        try:
            head = s.recv(64)
        except TimeoutError:
            return "no answer"
    return head.split(b" ")[1].decode() if head.startswith(b"HTTP/1.1 ") else ("closed" if not head else "junk")


def outcome_of(status: int) -> str:
    return str(status) if status < 400 or status >= 500 else f"4xx:{status}"


def client(soak: Soak, seed: int, photos: list[bytes], answers: dict, hostile: list, timeout_s: float) -> None:
    import httpx

    rng = random.Random(seed)
    while not soak.stop.is_set():
        url = soak.url
        t0 = time.time()
        if rng.random() < 0.25:
            name, method, path, kwargs = rng.choice(hostile + [(n, "", "", {}) for n in RAW_HOSTILE])
            try:
                if not method:
                    outcome = raw_outcome(url, RAW_HOSTILE[name], timeout_s)
                    outcome = f"4xx:{outcome}" if outcome.startswith("4") else outcome
                else:
                    outcome = outcome_of(httpx.request(method, f"{url}{path}", timeout=timeout_s, **kwargs)
                                         .status_code)
            except (httpx.HTTPError, OSError) as exc:
                outcome = type(exc).__name__
                time.sleep(0.2)  # the server is gone (a fault): do not spin
            soak.add(Record("hostile", outcome, t0, time.time()))
            continue
        kwargs, expected = valid_request(rng, photos)
        try:
            r = httpx.post(f"{url}/classify", timeout=timeout_s, **kwargs)
            outcome = outcome_of(r.status_code)
        except (httpx.HTTPError, OSError) as exc:
            soak.add(Record("valid", type(exc).__name__, t0, time.time()))
            time.sleep(0.2)
            continue
        end = time.time()
        soak.add(Record("valid", outcome, t0, end, end - t0))
        if r.status_code == 200:
            for k, (result, key) in enumerate(zip(r.json()["results"], expected)):
                labels, probs = answers[key]
                got = [(p["label"], p["probability"]) for p in result["predictions"]]
                diff = max(abs(p - q) for (_, p), q in zip(got, probs))
                ranked = [lab for lab, _ in got]
                if ranked != labels[:len(ranked)] or diff > TOLERANCE:
                    with soak.lock:
                        soak.violations.append({"image": key[0], "label_set": key[1], "position": k,
                                                "max_abs_diff": diff,
                                                "ranking_changed": ranked != labels[:len(ranked)]})


def slowloris(soak: Soak, timeout_s: float) -> None:
    """One half-sent request at a time, for the whole run."""
    for name in itertools.cycle(SLOWLORIS):
        if soak.stop.is_set():
            return
        t0 = time.time()
        try:
            outcome = raw_outcome(soak.url, SLOWLORIS[name], timeout_s)
            outcome = f"4xx:{outcome}" if outcome.startswith("4") else outcome
        except OSError as exc:
            outcome = type(exc).__name__
            time.sleep(0.2)
        soak.add(Record("slowloris", outcome, t0, time.time()))


def sample_rss(soak: Soak, server_pid_of, t_start: float) -> None:
    import psutil

    from fvgpt_serving.process import server_processes

    while not soak.stop.is_set():
        row = {"t": round(time.time() - t_start, 1), "api_mib": None, "tower_mib": None}
        try:
            roles = server_processes(server_pid_of())
            for role in ("api", "tower"):
                row[f"{role}_mib"] = round(sum(p.memory_info().rss for p in roles[role]) / 2**20, 1)
        except (psutil.Error, IndexError):
            pass
        with soak.lock:
            soak.rss.append(row)
        time.sleep(1.0)


# ---- faults -----------------------------------------------------------------------------------------------------

def wait_ready_again(url: str, timeout_s: float = 120) -> float:
    """When /readyz answered 200 again (time.time())."""
    from fvgpt_serving.process import wait_ready

    try:
        wait_ready(None, url, timeout_s, every_s=0.2)
    except RuntimeError as exc:
        raise BenchError(f"{url}: {exc}") from None
    return time.time()


def kill_tower_worker(soak: Soak, server: Server) -> None:
    from fvgpt_serving.process import server_processes

    tower = server_processes(server.proc.pid)["tower"][0]
    t0 = time.time()
    tower.send_signal(signal.SIGKILL)
    probe = time.time()
    import httpx

    readyz = httpx.get(f"{server.url}/readyz", timeout=10)
    readyz_s = time.time() - probe
    back = wait_ready_again(server.url)
    soak.windows.append(("tower worker kill", t0, back))
    soak.faults.append({"fault": "tower worker kill", "readyz_while_down": readyz.status_code,
                        "readyz_answer_s": round(readyz_s, 3), "back_after_s": round(back - t0, 1)})


def big_inputs(soak: Soak, url: str, timeout_s: float) -> None:
    import httpx

    grey, noise = heavy_pngs()
    jobs = [[("images", (f"g{i}.png", grey)) for i in range(16)]] * 4 + [[("images", ("n.png", noise))]] * 16
    t0 = time.time()

    def send(files) -> None:
        start = time.time()
        try:
            outcome = outcome_of(httpx.post(f"{url}/classify", files=files, timeout=timeout_s).status_code)
        except (httpx.HTTPError, OSError) as exc:
            outcome = type(exc).__name__
        soak.add(Record("big", outcome, start, time.time()))

    threads = [threading.Thread(target=send, args=(files,)) for files in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    soak.windows.append(("big inputs", t0, time.time()))
    soak.faults.append({"fault": "big inputs", "requests": len(jobs), "seconds": round(time.time() - t0, 1),
                        "grey_png_bytes": len(grey), "noise_png_bytes": len(noise)})


def sigterm(soak: Soak, server: Server, bundle: Path, log: Path, env: dict, timeout_s: float) -> Server:
    """SIGTERM the server while heavy requests are in flight; the clients move to a new one once it is ready."""
    import httpx
    import numpy as np
    from PIL import Image

    grey = encode_png(Image.fromarray(np.tile(np.arange(3000, dtype=np.uint8), (3000, 1)), "L"))
    drained: list[str] = []

    def heavy() -> None:
        try:
            r = httpx.post(f"{server.url}/classify", files=[("images", (f"g{i}.png", grey)) for i in range(8)],
                           timeout=timeout_s)
            drained.append(outcome_of(r.status_code))
        except (httpx.HTTPError, OSError) as exc:
            drained.append(type(exc).__name__)

    threads = [threading.Thread(target=heavy) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.time()
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(120)
    except subprocess.TimeoutExpired:
        rc = None
    stopped = time.time()
    for t in threads:
        t.join()
    new = Server(bundle, log, env)
    new.wait()
    soak.url = new.url
    soak.windows.append(("SIGTERM", t0, time.time()))
    in_flight = [r for r in soak.records if r.start < t0 < r.end]
    soak.faults.append({"fault": "SIGTERM", "exit_code": rc, "drain_s": round(stopped - t0, 1),
                        "in_flight_at_signal": len(in_flight),
                        "in_flight_outcomes": {kind: dict(Counter(r.outcome for r in in_flight if r.kind == kind))
                                               for kind in ("valid", "hostile", "slowloris")},
                        "heavy_requests_in_flight": dict(Counter(drained)),
                        "new_server_ready_after_s": round(time.time() - t0, 1)})
    server.log.close()
    return new


# ---- the run ----------------------------------------------------------------------------------------------------

def summarize(soak: Soak) -> dict:
    def in_window(r: Record) -> bool:
        return any(start - 1 <= r.end and r.start <= end for _, start, end in soak.windows)

    outcomes = {kind: dict(Counter(r.outcome for r in soak.records if r.kind == kind))
                for kind in ("valid", "hostile", "slowloris", "big")}
    outside = [r for r in soak.records if not in_window(r)]
    fivexx = Counter(f"{r.kind} {r.outcome}" for r in outside if r.outcome.isdigit() and r.outcome >= "500")
    hostile_not_4xx = Counter(r.outcome for r in outside
                              if r.kind in ("hostile", "slowloris") and not r.outcome.startswith("4xx"))
    valid_ok = [r.latency for r in outside if r.kind == "valid" and r.outcome == "200"]
    api = [row["api_mib"] for row in soak.rss if row["api_mib"]]
    tower = [row["tower_mib"] for row in soak.rss if row["tower_mib"]]
    return {"requests": len(soak.records), "outcomes": outcomes,
            "5xx_outside_fault_windows": dict(fivexx), "500_anywhere": sum(r.outcome == "500" for r in soak.records),
            "transport_errors_outside_fault_windows": sum(not r.outcome[0].isdigit() and r.kind == "valid"
                                                          for r in outside),
            "hostile_not_4xx_outside_fault_windows": dict(hostile_not_4xx),
            "valid_latency": latency_summary(valid_ok), "valid_ok": len(valid_ok),
            "batch_independence_violations": len(soak.violations), "violations": soak.violations[:20],
            "rss_mib": {"api_first": api[0] if api else None, "api_max": max(api, default=None),
                        "api_last": api[-1] if api else None, "tower_max": max(tower, default=None)},
            "faults": soak.faults}


def run(args) -> dict:
    if not 0 < args.minutes <= MAX_MINUTES:
        raise BenchError(f"--minutes must be in (0, {MAX_MINUTES:g}]")
    if not 1 <= args.concurrency <= 64:
        raise BenchError("--concurrency must be in 1..64")
    load_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="fvgpt-soak-"))
    bundle = Path(args.bundle) if args.bundle else tiny_bundle(work)
    if not (bundle / "manifest.json").is_file():
        raise BenchError(f"{bundle} is not a bundle (no manifest.json)")
    photos = [data for _, data in photo_bytes()]
    answers = expected_answers(bundle, photos)
    hostile = hostile_requests(photos)
    log = Path(args.out) / "soak-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_") or k in args.keep_env}
    server = Server(bundle, log, env)
    servers = [server]
    try:
        server.wait()
        soak = Soak(server.url)
        t_start = time.time()
        threads = [threading.Thread(target=client, args=(soak, seed, photos, answers, hostile, args.timeout),
                                    daemon=True) for seed in range(args.concurrency)]
        threads.append(threading.Thread(target=slowloris, args=(soak, args.timeout), daemon=True))
        threads.append(threading.Thread(target=sample_rss, args=(soak, lambda: servers[-1].proc.pid, t_start),
                                        daemon=True))
        for t in threads:
            t.start()
        duration = args.minutes * 60
        schedule = [(0.25, lambda: kill_tower_worker(soak, servers[-1])),
                    (0.50, lambda: big_inputs(soak, servers[-1].url, args.timeout)),
                    (0.75, lambda: servers.append(sigterm(soak, servers[-1], bundle, log, env, args.timeout)))]
        for at, fault in schedule:
            time.sleep(max(0.0, t_start + at * duration - time.time()))
            print(f"{time.time() - t_start:6.0f} s  injecting a fault", file=sys.stderr, flush=True)
            fault()
        time.sleep(max(0.0, t_start + duration - time.time()))
        soak.stop.set()
        for t in threads:
            t.join(args.timeout + 5)
    finally:
        for s in servers:
            s.close()
    summary = summarize(soak)
    return {"benchmark": "soak", "created": utc_now(), "command": command_line(), "machine": machine_info(),
            "load_average": {"start": load_start, "end": load_average()}, "versions": library_versions(),
            "settings": {"minutes": args.minutes, "concurrency": args.concurrency, "timeout_s": args.timeout,
                         "bundle": str(bundle), "hostile_share": 0.25, "tolerance": TOLERANCE},
            "summary": summary, "fault_windows": [{"fault": f, "start_s": round(a - t_start, 1),
                                                   "end_s": round(b - t_start, 1)} for f, a, b in soak.windows],
            "rss_series": soak.rss}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help=f"length of the run (default 5; at most {MAX_MINUTES:g})")
    p.add_argument("--bundle", help="bundle to serve (default: a tiny zero-shot bundle exported first)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take (default 60)")
    p.add_argument("--keep-env", nargs="*", default=[], metavar="VAR",
                   help="FVGPT_* variables of this shell passed to the server (default: none, the server's defaults)")
    p.add_argument("--out", default="runs/benchmarks", help="folder for soak.json, soak.csv and the server log")
    return p


def main(argv: list[str] | None = None) -> int:
    if (written := run_and_write(run, build_parser().parse_args(argv), "soak", "rss_series")) is None:
        return 2
    report, json_path, csv_path = written
    s = report["summary"]
    lat = s["valid_latency"]
    print(json.dumps({k: s[k] for k in ("requests", "outcomes", "5xx_outside_fault_windows", "500_anywhere",
                                        "hostile_not_4xx_outside_fault_windows", "batch_independence_violations",
                                        "rss_mib", "faults")}, indent=1))
    print(f"valid requests outside fault windows: {s['valid_ok']} ok, p50 {lat['latency_ms_p50'] or 0:.1f} ms, "
          f"p99 {lat['latency_ms_p99'] or 0:.1f} ms")
    print(f"wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
