"""The server under faults and hostile load: real `bentoml serve` / `fvgpt serve` processes on loopback, real signals,
real sockets, no mocks.

One server for most of the module (short timeouts, small budgets, so each case is cheap); a second one, started
through `fvgpt serve`, is stopped with SIGTERM by the drain test. Timing assertions are relative to times measured
in the same test (the machine is shared), and generous.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.common import server_processes
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import MANIFEST, Manifest, sha256_file
from fvgpt_serving.cli import free_port, stop, wait_ready
from test_serving import Server, assert_matches, encode, photo_bytes, post_files, running

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = BODY_TIMEOUT_S = 1.5
INFLIGHT_CAP = 160 << 20
FAULTS = {"FVGPT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "FVGPT_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
          "FVGPT_MAX_IMAGE_PIXELS": str(16_000_000), "FVGPT_MAX_REQUEST_PIXELS": str(100_000_000),
          "FVGPT_MAX_INFLIGHT_BYTES": str(INFLIGHT_CAP), "FVGPT_MAX_REQUEST_BYTES": str(8 << 20),
          "FVGPT_MAX_IMAGES": "8", "FVGPT_READY_TTL_S": "1"}


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("fault-logs") / "faults.log", **FAULTS)
    with running(srv):
        yield srv


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


def big_gray_png(side: int) -> bytes:
    """A large but tiny-on-the-wire PNG (a gradient compresses to a few KB): costly to decode, cheap to send."""
    return encode(Image.fromarray(np.tile(np.arange(side, dtype=np.uint8), (side, 1)), "L"))


def timed(send) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = send()
    return time.perf_counter() - t0, r


def raw_exchange(url: str, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send `data` on a fresh connection and read until the server closes it (or `wait_s` passes)."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks), time.perf_counter() - t0


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw[:300]
    return int(head.split()[1]), json.loads(body)


# ---- timeouts (finding 7) ---------------------------------------------------------------------------------------
def test_unfinished_headers_and_bodies_time_out(url):
    """Half-sent headers, a silent connection and a half-sent body are answered 408 and closed after their timeout,
    so slowloris connections cannot pile up; a complete request on a connection is unaffected."""
    cases = {"half-sent headers": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: applic",
             "silent": b"",
             "half-sent body": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 100000\r\n\r\n{\"images\": [\""}
    with ThreadPoolExecutor(len(cases) * 4) as pool:
        answers = list(pool.map(lambda data: raw_exchange(url, data, 15), list(cases.values()) * 4))
    for (case, _), (raw, elapsed) in zip(list(cases.items()) * 4, answers):
        assert raw, f"{case}: the connection stayed open {elapsed:.1f} s without an answer"
        status, doc = status_and_json(raw)
        assert status == 408 and "timeout" in doc["error"].lower(), (case, doc)
        assert HEADER_TIMEOUT_S * 0.9 <= elapsed <= HEADER_TIMEOUT_S + 8, (case, elapsed)
    r = post_files(url, [photo_bytes(0)])
    assert r.status_code == 200, r.text


def test_protocol_errors_answer_json(url):
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"):
        raw, _ = raw_exchange(url, garbage, 10)
        status, doc = status_and_json(raw)
        assert status == 400 and "invalid HTTP request" in doc["error"], doc


# ---- decode cost (finding 5) ------------------------------------------------------------------------------------
def test_request_pixel_budget(url):
    """Each image is within FVGPT_MAX_IMAGE_PIXELS, together they are over FVGPT_MAX_REQUEST_PIXELS: refused from
    the headers, before anything is decoded."""
    r = post_files(url, [big_gray_png(3900)] * 7)  # 7 × 15.2 MP = 106 MP > 100 MP
    assert r.status_code == 413, r.text
    assert "FVGPT_MAX_REQUEST_PIXELS" in r.json()["error"] and "106470000" in r.json()["error"]


def test_heavy_requests_do_not_delay_a_light_one_by_more_than_a_slice(url):
    """Four requests of six 3,900² PNGs each (24 decode slices, one per image, on 2 decode threads) are decoding
    when a one-photo request arrives: it waits for at most the slices already running, not for the heavy requests'
    queues. A slice's time under this load is measured in the same run: the heavy requests' wall time / 12."""
    heavy_image = big_gray_png(3900)
    post_files(url, [heavy_image])  # warm-up
    light_alone = statistics.median(timed(lambda: post_files(url, [photo_bytes(1)]))[0] for _ in range(3))
    with ThreadPoolExecutor(4) as pool:
        t0 = time.perf_counter()
        heavy = [pool.submit(post_files, url, [heavy_image] * 6) for _ in range(4)]
        time.sleep(0.5)  # the heavy requests are decoding
        light, r = timed(lambda: post_files(url, [photo_bytes(1)]))
        light_done = time.perf_counter()
        statuses = [f.result().status_code for f in heavy]
        heavy_s = time.perf_counter() - t0
    slice_s = heavy_s / 12
    assert r.status_code == 200 and statuses == [200] * 4, (r.text, statuses)
    assert light <= light_alone + 3 * slice_s, (f"light request {light:.2f} s under load, {light_alone:.2f} s "
                                                f"alone; heavy requests {heavy_s:.2f} s, one slice {slice_s:.2f} s")
    assert t0 + heavy_s - light_done > slice_s, "the heavy requests were not running any more: no contest"


def photo_mosaic(cols: int, rows: int) -> Image.Image:
    """Real photo content at its native resolution, tiled into a large image."""
    tiles = [Image.open(io.BytesIO(photo_bytes(i))).convert("RGB").resize((320, 213)) for i in range(4)]
    mosaic = Image.new("RGB", (320 * cols, 213 * rows))
    for k in range(cols * rows):
        mosaic.paste(tiles[(k * 7 + k // cols) % 4], (320 * (k % cols), 213 * (k // cols)))
    return mosaic


def test_large_jpegs_decode_at_reduced_scale(url, bundle_for_crash):
    """A 2560×1704 JPEG is decoded at 1/4 scale (short side ≥ 4 × the 64-px input): the service's answer equals
    the bundle's on exactly that decode (the documented preprocessing), and the pixels stay within the measured
    bound of open_clip's full-resolution transform."""
    from fvgpt_runtime.preprocess import draft, preprocess

    bundle, cfg = bundle_for_crash, bundle_for_crash.preprocess
    data = encode(photo_mosaic(8, 8), "JPEG", quality=90)
    drafted = draft(Image.open(io.BytesIO(data)), [cfg])
    assert drafted.size == (640, 426)
    pixels = preprocess(drafted, cfg)
    full = preprocess(Image.open(io.BytesIO(data)), cfg)
    assert np.abs(pixels - full).mean() < 0.005 and np.abs(pixels - full).max() < 0.1
    r = post_files(url, [data], top_k="6")
    assert r.status_code == 200, r.text
    scores = bundle.classify(pixels[None])
    want = dict(zip(scores.labels, scores.probabilities[0].tolist()))
    got = {p["label"]: p["probability"] for p in r.json()["results"][0]["predictions"]}
    assert list(got) == sorted(want, key=want.get, reverse=True)
    assert max(abs(got[k] - want[k]) for k in got) <= 1e-5


# ---- admission control (finding 6) ------------------------------------------------------------------------------
def test_bytes_in_flight_are_capped(url, server):
    """Sixteen concurrent requests of a 6 MiB PNG each (twice the body while parsing, 8 MiB while decoding: 320 MiB
    in all) against a 160 MiB cap: the ones over it get 503 with Retry-After, none fails otherwise, and the API
    process's memory returns near where it was."""
    api = server_processes(server.proc.pid)["api"][0]
    noise = np.random.default_rng(0).integers(0, 255, (1448, 1448, 3), dtype=np.uint8)
    body = encode(Image.fromarray(noise))  # ~6 MiB of incompressible PNG
    assert 5 << 20 < len(body) < 7 << 20
    post_files(url, [photo_bytes(0)])
    before = api.memory_info().rss
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post_files(url, [body]), range(16)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for a in answers:
        if a.status_code == 503:
            assert a.headers["retry-after"] and "FVGPT_MAX_INFLIGHT_BYTES" in a.json()["error"]
    time.sleep(1.0)
    after = api.memory_info().rss
    assert after - before < 64 << 20, f"API RSS {before / 2**20:.0f} → {after / 2**20:.0f} MiB after the burst"
    assert post_files(url, [photo_bytes(0)]).status_code == 200


# ---- latency after a burst (finding 9) --------------------------------------------------------------------------
def idle_latency(url: str, n: int = 12) -> float:
    with httpx.Client(timeout=60) as client:
        data = photo_bytes(2)
        return statistics.median(
            timed(lambda: client.post(f"{url}/classify", files=[("images", ("a.jpg", data))]))[0] for _ in range(n))


def test_idle_latency_returns_after_a_burst(url):
    """The adaptive batcher learned to hold a lone request back for batch mates after bursts (9 ms → 40–56 ms in the
    issue; 31 → 85 ms on this test before the fix). Each figure is the better of two rounds: the machine is shared."""
    before = min(idle_latency(url), idle_latency(url))
    photos = [photo_bytes(i) for i in range(4)]

    def client(k: int) -> list[int]:
        with httpx.Client(timeout=60) as c:
            return [c.post(f"{url}/classify", files=[("images", ("a.jpg", photos[(k + i) % 4]))]).status_code
                    for i in range(50)]

    with ThreadPoolExecutor(16) as pool:
        statuses = [s for part in pool.map(client, range(16)) for s in part]
    assert set(statuses) == {200}
    time.sleep(1.0)
    after = min(idle_latency(url), idle_latency(url))
    assert after <= 1.5 * before + 0.015, f"idle latency {before * 1e3:.1f} ms → {after * 1e3:.1f} ms"


# ---- encoder crash (finding 3) ----------------------------------------------------------------------------------
def test_encoder_crash_gives_503s_and_a_prompt_readyz(url, server, bundle_for_crash):
    encoder = server_processes(server.proc.pid)["encoder"][0]
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                answers.append(c.post(f"{url}/classify", files=[("images", ("a.jpg", photo_bytes(3)))]))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        encoder.send_signal(signal.SIGKILL)
        encoder.wait(10)
        readyz = [timed(lambda: httpx.get(f"{url}/readyz", timeout=10)) for _ in range(3)]
        back_after = None
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 90:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                back_after = time.perf_counter() - t0
                break
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    for elapsed, r in readyz:
        assert r.status_code == 503 and elapsed < 1.0, (r.status_code, elapsed)
    assert back_after is not None, "/readyz never answered 200 again"
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1, sorted(set(codes))
    for a in answers:
        if a.status_code == 503:
            assert a.headers["retry-after"] and a.headers["content-type"] == "application/json", a.text
    assert codes[-1] == 200
    r = post_files(url, [photo_bytes(3)], top_k="6")
    assert r.status_code == 200, r.text
    assert_matches(bundle_for_crash, r.json()["results"][0], photo_bytes(3), None)


@pytest.fixture(scope="module")
def bundle_for_crash(tiny_bundle) -> Bundle:
    return Bundle(tiny_bundle)


# ---- graceful drain (finding 2) ---------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_bundle, tmp_path):
    """SIGTERM to `fvgpt serve` while requests are in flight: every one of them is answered 200, a new connection
    is refused at once, and the command exits 0 after the drain."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")}
    log = open(tmp_path / "drain.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "fvgpt.cli", "serve", str(tiny_bundle), "--port", str(port),
                             "--drain-timeout", "60"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, 120)
        heavy = big_gray_png(3000)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post_files, url, [heavy] * 4) for _ in range(8)]
            time.sleep(0.5)
            assert not all(f.done() for f in futures), "nothing was in flight"
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/livez", timeout=5)
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers if a.status_code != 200]
        rc = proc.wait(90)
        assert rc == 0 and time.perf_counter() - t0 < 60, rc
    finally:
        stop(proc)
        log.seek(0)
        text = log.read()
        log.close()
    assert "Traceback" not in text, text[-3000:]


# ---- bad bundles fail fast (finding 8) --------------------------------------------------------------------------
def rewrite_manifest(bundle: Path, change) -> None:
    """Edit the manifest and re-sign it (its digest and file hashes made consistent again), as a buggy exporter
    would: only the full validation can refuse it."""
    doc = json.loads((bundle / MANIFEST).read_text())
    doc = change(doc)
    if isinstance(doc, dict):
        if isinstance(doc.get("files"), dict):
            doc["files"] = {name: sha256_file(bundle / name) if (bundle / name).is_file() else h
                            for name, h in doc["files"].items()}
        doc["digest"] = Manifest.digest_of(doc)
    (bundle / MANIFEST).write_text(json.dumps(doc))


def corrupt(path: Path, data: bytes = b"not an onnx graph") -> None:
    path.write_bytes(data)


def drop(key: str):
    return lambda doc: {k: v for k, v in doc.items() if k != key}


BAD_BUNDLES = {
    "manifest is a list": (lambda b: (b / MANIFEST).write_text("[]"), "must hold a JSON object"),
    "no classes (re-signed)": (lambda b: rewrite_manifest(b, drop("classes")), "classes is missing"),
    "no files (re-signed)": (lambda b: rewrite_manifest(b, drop("files")), "files is missing"),
    "classes changed, digest stale": (lambda b: (b / MANIFEST).write_text(
        (b / MANIFEST).read_text().replace('"red_circle"', '"red_circlf"')), "digest does not match"),
    "heads graph garbage (re-signed)": (lambda b: (corrupt(b / "heads.onnx"), rewrite_manifest(b, lambda d: d)),
                                        "heads.onnx"),
    "tower graph garbage (re-signed)": (lambda b: (corrupt(b / "tower.fp32.onnx"), rewrite_manifest(b, lambda d: d)),
                                        "tower"),
    "tables truncated (re-signed)": (lambda b: (corrupt(b / "tables.safetensors", b"\x08"),
                                                rewrite_manifest(b, lambda d: d)), "tables"),
    "a file missing": (lambda b: (b / "text.onnx").unlink(), "text.onnx: missing"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_a_bad_bundle_makes_fvgpt_serve_exit_with_one_line(tiny_bundle, tmp_path, capsys, case):
    from fvgpt.cli import main

    make_bad, message = BAD_BUNDLES[case]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    make_bad(bad)
    port = free_port()
    assert main(["serve", str(bad), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_bentoml_serve_on_a_bad_bundle_exits_instead_of_crash_looping(tiny_bundle, tmp_path):
    """Started without the `fvgpt serve` checks (a container running `bentoml serve`): the configuration is
    validated before any worker starts, and the server exits non-zero instead of restarting its workers."""
    from fvgpt_serving.cli import server_command

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    rewrite_manifest(bad, drop("classes"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")} | {"FVGPT_BUNDLE": str(bad)}
    for extra in ({}, {"FVGPT_MAX_IMAGES": "many"}):
        t0 = time.perf_counter()
        proc = subprocess.run(server_command("127.0.0.1", free_port()), env=env | extra, capture_output=True,
                              check=False, text=True, timeout=120, start_new_session=True)
        assert proc.returncode != 0 and time.perf_counter() - t0 < 90
        out = proc.stdout + proc.stderr
        assert ("classes is missing" if not extra else "FVGPT_MAX_IMAGES='many' is not an integer") in out, out[-2000:]
        assert "Started server process" not in out, out[-2000:]
