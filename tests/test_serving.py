"""The HTTP service end to end: real `bentoml serve` processes on loopback ports, real HTTP, no mocks.

Two servers for the module, started together: the tiny FVG-PT bundle (small limits, so limit tests stay cheap) and
the tiny zero-shot bundle behind an API key.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.preprocess import preprocess
from fvgpt.photos import photo_paths
from fvgpt_serving.cli import free_port, server_command, stop, wait_ready

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
LIMITS = {"FVGPT_MAX_IMAGE_PIXELS": "1000000", "FVGPT_MAX_IMAGES": "4", "FVGPT_MAX_LABELS": "8",
          "FVGPT_MAX_LABEL_CHARS": "40", "FVGPT_MAX_REQUEST_BYTES": str(2 << 20), "FVGPT_MAX_ASPECT_RATIO": "20",
          "FVGPT_READY_TTL_S": "0"}  # every /readyz runs its canary inference


class Server:
    """`bentoml serve` on one bundle (FVGPT_BUNDLE) or, with repository=True, on a folder of them."""

    def __init__(self, source: Path, log: Path, repository: bool = False, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")}
        full_env = inherited | {"FVGPT_REPOSITORY" if repository else "FVGPT_BUNDLE": str(source),
                                "FVGPT_MAX_BATCH_SIZE": "8", "FVGPT_MAX_LATENCY_MS": "10000"} | env
        self.log = open(log, "w+")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(server_command("127.0.0.1", self.port), env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> None:
        try:
            wait_ready(self.proc, self.url, 120)
        except RuntimeError:
            self.log.seek(0)
            raise RuntimeError(self.log.read()[-4000:]) from None

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


@contextmanager
def running(*servers: Server) -> Iterator[None]:
    """Wait until every server is ready; stop them all at the end, whatever happened."""
    try:
        for server in servers:
            server.wait()
        yield
    finally:
        for server in servers:
            server.close()


@pytest.fixture(scope="module")
def servers(tiny_bundle, tiny_zero_shot_bundle, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server-logs")
    fvgpt = Server(tiny_bundle, logs / "fvgpt.log", **LIMITS)
    zero_shot = Server(tiny_zero_shot_bundle, logs / "zero-shot.log", FVGPT_API_KEY=API_KEY)
    with running(fvgpt, zero_shot):
        yield fvgpt, zero_shot


@pytest.fixture(scope="module")
def url(servers) -> str:
    return servers[0].url


@pytest.fixture(scope="module")
def zs_url(servers) -> str:
    return servers[1].url


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle(tiny_bundle)


# ---- helpers ------------------------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo_bytes(i: int = 0) -> bytes:
    return photo_paths()[i].read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post_files(url: str, images: list[bytes], headers: dict | None = None, **fields) -> httpx.Response:
    files = [("images", (f"img{i}.bin", data, "application/octet-stream")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/classify", files=files, data=fields, headers=headers, timeout=60)


def post_json(url: str, doc, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/classify", json=doc, headers=headers, timeout=60)


def expected(bundle: Bundle, data: bytes, labels: list[str] | None):
    """What the service should answer, computed in-process on the same bytes."""
    scores = bundle.classify(preprocess(Image.open(io.BytesIO(data)), bundle.preprocess)[None], labels)
    return scores.head, dict(zip(scores.labels, scores.probabilities[0].tolist()))


def returned(result: dict) -> dict[str, float]:
    return {p["label"]: p["probability"] for p in result["predictions"]}


def assert_matches(bundle: Bundle, result: dict, data: bytes, labels: list[str] | None) -> None:
    """Same head, model id, ranking and probabilities (to 1e-5) as Bundle.scores in-process."""
    head, probs = expected(bundle, data, labels)
    got = returned(result)
    assert result["head"] == head and result["model_id"] == bundle.model_id
    assert list(got) == sorted(probs, key=probs.get, reverse=True)[:len(got)]
    assert max(abs(got[k] - probs[k]) for k in got) <= 1e-5


def base_classes(bundle: Bundle) -> list[str]:
    return bundle.classes.base_names


def new_classes(bundle: Bundle) -> list[str]:
    return bundle.classes.new_names


# ---- good requests ------------------------------------------------------------------------------------------------
def test_multipart_many_images_and_top_k(url, bundle):
    images = [photo_bytes(i) for i in range(3)]
    r = post_files(url, images, top_k="2")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    for result, data in zip(results, images):
        assert len(result["predictions"]) == 2 and result["head"] == "new"
        assert_matches(bundle, result, data, None)


@pytest.mark.parametrize("labels", [None, "base", "mixed", "new-labels", "bundled-new"])
def test_base64_probabilities_equal_in_process_scores(url, bundle, labels):
    chosen = {None: None, "base": base_classes(bundle)[:2], "mixed": [base_classes(bundle)[0], new_classes(bundle)[0]],
              "new-labels": ["a cat", "an astronaut", "a cup of coffee"], "bundled-new": new_classes(bundle)}[labels]
    images = [photo_bytes(i) for i in range(4)]
    n = len(chosen or bundle.classes.names)
    doc = {"images": [b64(d) for d in images], "top_k": n} | ({"labels": chosen} if chosen else {})
    r = post_json(url, doc)
    assert r.status_code == 200, r.text
    for result, data in zip(r.json()["results"], images):
        assert_matches(bundle, result, data, chosen)


def test_routing(url, zs_url, bundle):
    def head(labels, target=url, headers=None):
        r = post_json(target, {"images": [b64(photo_bytes())], "labels": labels}, headers)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["head"]

    assert head(base_classes(bundle)) == "base"
    assert head(base_classes(bundle)[1:2]) == "base"
    assert head([base_classes(bundle)[0], new_classes(bundle)[0]]) == "new"
    assert head([base_classes(bundle)[0], "a rocket"]) == "new"
    assert head(["a rocket", "a cat"]) == "new"
    assert head(None) == "new"  # every bundled class, new ones included
    assert head(["cat", "a spaceship"], zs_url, {"Authorization": f"Bearer {API_KEY}"}) == "zero-shot"


def test_data_uri_display_names_and_subset_mode(url, bundle):
    base = base_classes(bundle)
    display = [c.replace("_", " ") for c in base]
    r = post_json(url, {"images": ["data:image/jpeg;base64," + b64(photo_bytes(1))], "labels": display,
                        "mode": "subset", "top_k": len(base)})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["head"] == "base" and set(returned(result)) == set(base)  # display forms are the bundled classes
    assert_matches(bundle, result, photo_bytes(1), base)


def test_labels_with_unicode_format_characters(url, bundle):
    """Emoji ZWJ sequences, a flag tag sequence, a soft hyphen and a zero-width non-joiner are text (Unicode category
    Cf), not control characters: accepted, and scored like any new label."""
    labels = ["\U0001F469\u200D\U0001F4BB coder", "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074"
              "\U000E007F flag", "co\u00ADoperation", "\u0645\u06CC\u200C\u062E\u0648\u0627\u0647\u0645"]
    r = post_json(url, {"images": [b64(photo_bytes(0))], "labels": labels, "top_k": len(labels)})
    assert r.status_code == 200, r.text
    assert set(returned(r.json()["results"][0])) == set(labels)
    assert_matches(bundle, r.json()["results"][0], photo_bytes(0), labels)


def test_multipart_labels_as_repeated_fields(url, bundle):
    labels = [new_classes(bundle)[0], "a dog"]
    r = post_files(url, [photo_bytes(2)], labels=labels, top_k="2")
    assert r.status_code == 200, r.text
    assert_matches(bundle, r.json()["results"][0], photo_bytes(2), labels)


def test_labels_and_info(url, bundle):
    r = httpx.get(f"{url}/labels")
    assert r.status_code == 200
    doc = r.json()
    assert doc["model_id"] == bundle.model_id
    assert [(c["name"], c["base"]) for c in doc["classes"]] == list(zip(bundle.classes.names, bundle.classes.base))
    info = httpx.get(f"{url}/info").json()
    assert info["tower"]["provider"] == "CPUExecutionProvider" and info["tower"]["runtime"] == "onnx"
    assert info["tower"]["tower_id"] == bundle.manifest.tower_id
    assert info["batching"] == {"max_batch_size": 8, "max_latency_ms": 10000}
    assert info["limits"]["max_images"] == 4 and info["api_key_required"] is False


def odd_images() -> dict[str, bytes]:
    photo = Image.open(photo_paths()[0])
    gray16 = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    return {"1x1": encode(Image.new("RGB", (1, 1), (200, 40, 40))),
            "16-bit PNG": encode(Image.fromarray(gray16)),
            "CMYK JPEG": encode(photo.convert("CMYK"), "JPEG", quality=90),
            "RGBA PNG": encode(rgba),
            "grayscale JPEG": encode(photo.convert("L"), "JPEG"),
            "palette GIF": encode(photo.convert("P"), "GIF"),
            "non-square tiny": encode(photo.resize((7, 3)))}


@pytest.mark.parametrize("kind", list(odd_images()))
def test_unusual_images_are_classified(url, bundle, kind):
    data = odd_images()[kind]
    r = post_files(url, [data], top_k=str(len(bundle.classes.names)))
    assert r.status_code == 200, r.text
    assert_matches(bundle, r.json()["results"][0], data, None)


# ---- bad requests -------------------------------------------------------------------------------------------------
def truncated_jpeg() -> bytes:
    data = photo_bytes(0)
    return data[: len(data) // 2]


BAD = {
    "non-image bytes": (lambda u: post_files(u, [b"hello, this is not an image"]), 400, "not an image"),
    "truncated JPEG": (lambda u: post_files(u, [truncated_jpeg()]), 400, "truncated"),
    "empty file": (lambda u: post_files(u, [b""]), 400, "empty"),
    "over the pixel limit": (lambda u: post_files(u, [encode(Image.new("L", (1100, 1000)))]), 413, "pixels"),
    "decompression bomb": (lambda u: post_files(u, [encode(Image.new("1", (4000, 4000)))]), 413, "pixels"),
    "extreme aspect ratio": (lambda u: post_files(u, [encode(Image.new("RGB", (400, 2)))]), 400, "aspect ratio"),
    "empty body": (lambda u: httpx.post(f"{u}/classify", content=b"",
                                        headers={"content-type": "application/json"}), 400, "empty request body"),
    "no body, no content type": (lambda u: httpx.post(f"{u}/classify"), 400, "empty request body"),
    "wrong field name": (lambda u: httpx.post(f"{u}/classify", files={"image": ("a.jpg", photo_bytes())}), 400,
                         "unknown form field 'image'"),
    "URL as form text": (lambda u: httpx.post(f"{u}/classify", files=[("images", (None, "http://example.com/a.jpg"))]),
                         400, "must be a file upload"),
    "URL in JSON": (lambda u: post_json(u, {"images": ["https://example.com/cat.jpg"]}), 400, "URLs are not fetched"),
    "invalid base64": (lambda u: post_json(u, {"images": ["not*base64!"]}), 400, "not valid base64"),
    "non-base64 data URI": (lambda u: post_json(u, {"images": ["data:image/png,abc"]}), 400, "base64"),
    "image not a string": (lambda u: post_json(u, {"images": [123]}), 400, "must be a base64 string"),
    "images not a list": (lambda u: post_json(u, {"images": b64(photo_bytes())}), 400, "non-empty list"),
    "no images in JSON": (lambda u: post_json(u, {"images": []}), 400, "non-empty list"),
    "unknown JSON field": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "topk": 3}), 400, "'topk'"),
    "invalid JSON": (lambda u: httpx.post(f"{u}/classify", content=b"{not json",
                                          headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "JSON not an object": (lambda u: post_json(u, [b64(photo_bytes())]), 400, "must be an object"),
    "too many images (multipart)": (lambda u: post_files(u, [photo_bytes(3)] * 5), 400, "too many images"),
    "too many images (JSON)": (lambda u: post_json(u, {"images": [b64(photo_bytes(3))] * 5}), 400, "too many images"),
    "request too large": (lambda u: httpx.post(f"{u}/classify", content=b"x" * (2 << 20 | 1),
                                               headers={"content-type": "application/json"}), 413, "limit"),
    "unsupported content type": (lambda u: httpx.post(f"{u}/classify", content=photo_bytes(),
                                                      headers={"content-type": "image/jpeg"}), 415, "Content-Type"),
    "too many labels": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": [f"l{i}" for i in range(9)]}),
                        400, "too many labels"),
    "empty labels": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": []}), 400, "labels is empty"),
    "empty label": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": ["cat", "  "]}), 400,
                    "labels[1] is empty"),
    "overlong label": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": ["x" * 41]}), 400,
                       "characters long"),
    "duplicate label": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": ["cat", " cat"]}), 400,
                        "repeats"),
    "label not a string": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": ["cat", 3]}), 400,
                           "must be a string"),
    "control characters": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": ["c\x00t"]}), 400,
                           "control characters"),
    "C1 control character": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": ["c\x85t\x9b"]}),
                             400, "control characters"),
    "lone surrogate": (lambda u: httpx.post(f"{u}/classify", content=b'{"images": ["' + b64(photo_bytes()).encode()
                                            + b'"], "labels": ["c\\ud800t"]}',
                                            headers={"content-type": "application/json"}), 400, "control characters"),
    "unknown label in a subset": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": ["a cat"],
                                                          "mode": "subset"}), 400, "not a bundled class"),
    "subset without labels": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "mode": "subset"}), 400,
                              "needs labels"),
    "unknown mode": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "mode": "strict"}), 400, "mode"),
    "top_k zero": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "top_k": 0}), 400, "top_k"),
    "top_k negative": (lambda u: post_files(u, [photo_bytes()], top_k="-1"), 400, "top_k"),
    "top_k too large": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": ["cat", "dog"],
                                                "top_k": 3}), 400, "between 1 and 2"),
    "top_k not an integer": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "top_k": "5"}), 400, "integer"),
    "top_k not a number (multipart)": (lambda u: post_files(u, [photo_bytes()], top_k="five"), 400, "not an integer"),
    "GET /classify": (lambda u: httpx.get(f"{u}/classify"), 405, "Method Not Allowed"),
    # deep enough for every Python's parser to give up (3.11 near depth 1,000, 3.13 between 5,000 and 20,000)
    "deeply nested JSON": (lambda u: httpx.post(f"{u}/classify", content=b'{"images": ' + b"[" * 100_000
                                                + b"]" * 100_000 + b"}", headers={"content-type": "application/json"}),
                           400, "nested too deeply"),
    "nested JSON image": (lambda u: post_json(u, {"images": [[[["x"]]]]}), 400, "must be a base64 string"),
    "nested JSON label": (lambda u: post_json(u, {"images": [b64(photo_bytes())], "labels": [[["cat"]]]}), 400,
                          "must be a string"),
    "data URI of another type": (lambda u: post_json(u, {"images": ["data:text/html;base64," + b64(photo_bytes())]}),
                                 400, "text/html is not an image type"),
    "data URI type mismatch": (lambda u: post_json(u, {"images": ["data:image/png;base64," + b64(photo_bytes())]}),
                               400, "declared image/png but is a JPEG"),
    "unknown path": (lambda u: httpx.get(f"{u}/classifyy"), 404, "Not Found"),
    "wrong method on a BentoML route": (lambda u: httpx.post(f"{u}/livez"), 405, "Method Not Allowed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_json_4xx(url, case):
    send, status, message = BAD[case]
    r = send(url)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert isinstance(error, str) and message in error, error


def test_healthy_after_bad_input(url, bundle):
    for send, _, _ in BAD.values():
        send(url)
    assert httpx.get(f"{url}/readyz").status_code == 200
    r = post_files(url, [photo_bytes(3)])
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["predictions"]) == 5  # the default top_k
    assert_matches(bundle, r.json()["results"][0], photo_bytes(3), None)


def test_readyz_runs_a_canary_inference(url):
    before = batch_histogram(url)[0]
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert batch_histogram(url)[0] == before + 1  # one image-graph batch: the canary went through the encoder


# ---- API key ------------------------------------------------------------------------------------------------------
def test_api_key(zs_url):
    doc = {"images": [b64(photo_bytes(1))], "top_k": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": API_KEY}):
        r = post_json(zs_url, doc, headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert httpx.get(f"{zs_url}/labels", headers=headers).status_code == 401
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
        r = post_json(zs_url, doc, headers)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["head"] == "zero-shot"
        assert [c["name"] for c in httpx.get(f"{zs_url}/labels", headers=headers).json()["classes"]] == \
            ["cat", "dog", "rocket"]
    for probe in ("/readyz", "/livez", "/healthz", "/metrics", "/docs.json"):
        assert httpx.get(f"{zs_url}{probe}").status_code == 200, probe


# ---- load ---------------------------------------------------------------------------------------------------------
def batch_histogram(url: str) -> tuple[float, float]:
    """(batches run, batches made of a single request) by the Encoder's adaptive batcher, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    count = re.search(r'adaptive_batch_size_count\{[^}]*method_name="encode"[^}]*\} (\S+)', text)
    ones = re.search(r'adaptive_batch_size_bucket\{le="1.0",[^}]*method_name="encode"[^}]*\} (\S+)', text)
    return float(count.group(1)), float(ones.group(1))


def test_concurrent_requests_are_batched_without_errors(url, bundle):
    photos = [photo_bytes(i) for i in range(4)]
    expected_top = {i: max((p := expected(bundle, d, None)[1]), key=p.get) for i, d in enumerate(photos)}
    before = batch_histogram(url)

    def one(i: int) -> tuple[int, str]:
        r = post_files(url, [photos[i % 4]], top_k="1")
        return r.status_code, r.json()["results"][0]["predictions"][0]["label"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(200)))
    assert [a for a in answers if a[0] != 200] == []
    assert all(label == expected_top[i % 4] for i, (_, label) in enumerate(answers))
    count, ones = (a - b for a, b in zip(batch_histogram(url), before))
    assert count < 200 and ones < count, f"{count} batches, {ones} of one request: requests were not batched"


# ---- CLI ----------------------------------------------------------------------------------------------------------
def test_smoke_test_command(tiny_bundle):
    env = os.environ.copy()
    env.pop("FVGPT_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "fvgpt.cli", "serve", str(tiny_bundle), "--smoke-test"],
                          check=False, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke test passed" in proc.stdout
    doc = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    assert len(doc["results"]) == 1 and doc["results"][0]["predictions"]
