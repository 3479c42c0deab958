"""The engine under faults and hostile load, in-process: decode cost and fairness, admission, JPEG draft, idle latency
after a burst, a tower worker killed (real processes, real signals), and bundles that only a full load can refuse.
Timing assertions are relative to times measured in the same test (the machine is shared), and generous. What needs
a server (timeouts, protocol errors, SIGTERM) is tests/test_serving_http.py's.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import MANIFEST, Manifest, sha256_file
from fvgpt_serving.process import free_port
from serving_support import assert_matches, big_gray_png, encode, engine_client, photo_bytes, post_files

pytestmark = pytest.mark.slow

INFLIGHT_CAP = 160 << 20
FAULTS = {"FVGPT_MAX_IMAGE_PIXELS": str(16_000_000), "FVGPT_MAX_REQUEST_PIXELS": str(100_000_000),
          "FVGPT_MAX_INFLIGHT_BYTES": str(INFLIGHT_CAP), "FVGPT_MAX_REQUEST_BYTES": str(8 << 20),
          "FVGPT_MAX_IMAGES": "8", "FVGPT_READY_TTL_S": "1", "FVGPT_POLL_S": "0"}


@pytest.fixture(scope="module")
def client(tiny_bundle):
    with engine_client(tiny_bundle, **FAULTS) as c:
        yield c


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle(tiny_bundle)


def timed(send) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = send()
    return time.perf_counter() - t0, r


# ---- decode cost ------------------------------------------------------------------------------------------------
def test_request_pixel_budget(client):
    """Each image is within FVGPT_MAX_IMAGE_PIXELS, together they are over FVGPT_MAX_REQUEST_PIXELS: refused from
    the headers, before anything is decoded."""
    r = post_files(client, [big_gray_png(3900)] * 7)  # 7 × 15.2 MP = 106 MP > 100 MP
    assert r.status_code == 413, r.text
    assert "FVGPT_MAX_REQUEST_PIXELS" in r.json()["error"] and "106470000" in r.json()["error"]


def test_heavy_requests_do_not_delay_a_light_one_by_more_than_a_slice(client):
    """Four requests of six 3,900² PNGs each (24 decode slices, one per image, on 2 decode threads) are decoding
    when a one-photo request arrives: it waits for at most the slices already running, not for the heavy requests'
    queues. A slice's time under this load is measured in the same run: the heavy requests' wall time / 12."""
    heavy_image = big_gray_png(3900)
    post_files(client, [heavy_image])  # warm-up
    light_alone = statistics.median(timed(lambda: post_files(client, [photo_bytes(1)]))[0] for _ in range(3))
    with ThreadPoolExecutor(4) as pool:
        t0 = time.perf_counter()
        heavy = [pool.submit(post_files, client, [heavy_image] * 6) for _ in range(4)]
        time.sleep(0.5)  # the heavy requests are decoding
        light, r = timed(lambda: post_files(client, [photo_bytes(1)]))
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


def test_large_jpegs_decode_at_reduced_scale(client, bundle):
    """A 2560×1704 JPEG is decoded at 1/4 scale (short side ≥ 4 × the 64-px input): the answer equals the bundle's
    on exactly that decode (the documented preprocessing), and the pixels stay within the measured bound of
    open_clip's full-resolution transform."""
    from fvgpt_runtime.preprocess import draft, preprocess

    cfg = bundle.preprocess
    data = encode(photo_mosaic(8, 8), "JPEG", quality=90)
    drafted = draft(Image.open(io.BytesIO(data)), [cfg])
    assert drafted.size == (640, 426)
    pixels = preprocess(drafted, cfg)
    full = preprocess(Image.open(io.BytesIO(data)), cfg)
    assert np.abs(pixels - full).mean() < 0.005 and np.abs(pixels - full).max() < 0.1
    r = post_files(client, [data], top_k="6")
    assert r.status_code == 200, r.text
    scores = bundle.classify(pixels[None])
    want = dict(zip(scores.labels, scores.probabilities[0].tolist()))
    got = {p["label"]: p["probability"] for p in r.json()["results"][0]["predictions"]}
    assert list(got) == sorted(want, key=want.get, reverse=True)
    assert max(abs(got[k] - want[k]) for k in got) <= 1e-5


# ---- admission control ------------------------------------------------------------------------------------------
def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_bytes_in_flight_are_capped(client):
    """Sixteen concurrent requests of a 6 MiB PNG each (twice the body while parsing, 8 MiB while decoding: 320 MiB
    in all) against a 160 MiB cap: the ones over it get 503 with Retry-After, none fails otherwise, every byte is
    given back, and the process's memory returns near where it was."""
    noise = np.random.default_rng(0).integers(0, 255, (1448, 1448, 3), dtype=np.uint8)
    body = encode(Image.fromarray(noise))  # ~6 MiB of incompressible PNG
    assert 5 << 20 < len(body) < 7 << 20
    post_files(client, [photo_bytes(0)])
    before = rss()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post_files(client, [body]), range(16)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for a in answers:
        if a.status_code == 503:
            assert a.headers["Retry-After"] and "FVGPT_MAX_INFLIGHT_BYTES" in a.json()["error"]
    assert client.engine.budget.held == 0
    time.sleep(1.0)
    after = rss()
    assert after - before < 96 << 20, f"RSS {before / 2**20:.0f} → {after / 2**20:.0f} MiB after the burst"
    assert post_files(client, [photo_bytes(0)]).status_code == 200


def test_a_decode_that_can_never_fit_is_a_413_naming_the_limit(tiny_bundle):
    """Two 5800² RGB PNGs (noise-free: 224 KB on the wire) decode to ~190 MiB at once on two threads, more than a
    160 MiB FVGPT_MAX_INFLIGHT_BYTES holds even on an idle server: 413 naming the limit (it used to be a 503 that
    waiting could never fix). Two of them one at a time fit."""
    side = 5800
    image = encode(Image.fromarray(np.broadcast_to(np.arange(side, dtype=np.uint8)[:, None, None] % 7,
                                                   (side, side, 3)).copy()))
    with engine_client(tiny_bundle, FVGPT_MAX_INFLIGHT_BYTES=str(INFLIGHT_CAP), FVGPT_MAX_REQUEST_BYTES=str(8 << 20),
                       FVGPT_MAX_IMAGE_PIXELS=str(40_000_000), FVGPT_POLL_S="0") as c:
        r = post_files(c, [image, image])
        assert r.status_code == 413, r.text
        assert "FVGPT_MAX_INFLIGHT_BYTES" in r.json()["error"] and "Retry-After" not in r.headers
        assert c.engine.budget.held == 0
        assert post_files(c, [image]).status_code == 200


# ---- latency after a burst ----------------------------------------------------------------------------------------
def idle_latency(client, n: int = 12) -> float:
    data = photo_bytes(2)
    return statistics.median(timed(lambda: post_files(client, [data]))[0] for _ in range(n))


def test_idle_latency_returns_after_a_burst(client):
    """A lone request runs as soon as the tower is free: a burst leaves nothing behind that holds it back (BentoML's
    adaptive batcher used to learn to wait for batch mates after bursts: 9 ms → 40–56 ms in the issue). Each figure
    is the better of two rounds: the machine is shared."""
    before = min(idle_latency(client), idle_latency(client))
    photos = [photo_bytes(i) for i in range(4)]

    def burst(k: int) -> list[int]:
        return [post_files(client, [photos[(k + i) % 4]]).status_code for i in range(50)]

    with ThreadPoolExecutor(16) as pool:
        statuses = [s for part in pool.map(burst, range(16)) for s in part]
    assert set(statuses) == {200}
    time.sleep(1.0)
    after = min(idle_latency(client), idle_latency(client))
    assert after <= 1.5 * before + 0.015, f"idle latency {before * 1e3:.1f} ms → {after * 1e3:.1f} ms"


# ---- the tower worker dies ------------------------------------------------------------------------------------------
def test_a_killed_tower_worker_gives_503s_readiness_at_once_and_a_new_worker(tiny_bundle, bundle):
    with engine_client(tiny_bundle, FVGPT_READY_TTL_S="0", FVGPT_POLL_S="0") as c:
        pool = c.engine.pool
        old = pool.worker.proc
        answers, ready = [], []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                answers.append(post_files(c, [photo_bytes(3)]))

        def probe() -> None:  # every readiness check runs the canary through the tower
            while not stop.is_set():
                ready.append(timed(c.ready))

        threads = [threading.Thread(target=load) for _ in range(6)] + [threading.Thread(target=probe)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            os.kill(old.pid, signal.SIGKILL)
            old.wait(10)
            down_s, down = timed(c.ready)
            t0 = time.perf_counter()
            while not pool.up and time.perf_counter() - t0 < 60:
                time.sleep(0.05)
            back_s = time.perf_counter() - t0
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not down and down_s < 0.5, (down, down_s)  # at once, without touching the tower
        assert pool.up and back_s < 60 and pool.restarts == 1 and pool.worker.proc.pid != old.pid
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and 503 in codes, sorted(set(codes))
        assert all(a.headers["Retry-After"] and "tower worker" in a.json()["error"] for a in answers
                   if a.status_code == 503)
        assert codes[-1] == 200 and max(s for s, _ in ready) < 5, max(s for s, _ in ready)
        r = post_files(c, [photo_bytes(3)], top_k="6")
        assert r.status_code == 200, r.text
        assert_matches(bundle, r.json()["results"][0], photo_bytes(3), None)


# ---- bad bundles fail fast ----------------------------------------------------------------------------------------
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
