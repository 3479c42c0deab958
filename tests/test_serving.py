"""The serving engine in-process: every route's behaviour on real bundles, real towers (in the engine's worker
process), real request bodies (built by httpx as a client sends them); no server, no mocks. What only a server can
show (HTTP parsing, BentoML's client, signals, ports) is tests/test_serving_http.py's.

Two engines for the module: the tiny FVG-PT bundle (small limits, so limit tests stay cheap) and the tiny zero-shot
bundle behind an API key.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fvgpt.photos import photo_paths
from fvgpt_runtime.bundle import Bundle
from serving_support import (assert_matches, b64, encode, engine_client, expected, photo_bytes, post_files, post_json,
                             returned, truncated_multipart)

API_KEY = "test-key-123"
LIMITS = {"FVGPT_MAX_IMAGE_PIXELS": "1000000", "FVGPT_MAX_IMAGES": "4", "FVGPT_MAX_LABELS": "8",
          "FVGPT_MAX_LABEL_CHARS": "40", "FVGPT_MAX_REQUEST_BYTES": str(2 << 20), "FVGPT_MAX_ASPECT_RATIO": "20",
          "FVGPT_READY_TTL_S": "0", "FVGPT_POLL_S": "0"}  # every readiness check runs its canary inference


@pytest.fixture(scope="module")
def client(tiny_bundle):
    with engine_client(tiny_bundle, **LIMITS) as c:
        yield c


@pytest.fixture(scope="module")
def zs_client(tiny_zero_shot_bundle):
    with engine_client(tiny_zero_shot_bundle, FVGPT_API_KEY=API_KEY, FVGPT_POLL_S="0") as c:
        yield c


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle(tiny_bundle)


def base_classes(bundle: Bundle) -> list[str]:
    return bundle.classes.base_names


def new_classes(bundle: Bundle) -> list[str]:
    return bundle.classes.new_names


# ---- good requests ------------------------------------------------------------------------------------------------
def test_multipart_many_images_and_top_k(client, bundle):
    images = [photo_bytes(i) for i in range(3)]
    r = post_files(client, images, top_k="2")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    for result, data in zip(results, images):
        assert len(result["predictions"]) == 2 and result["head"] == "new"
        assert_matches(bundle, result, data, None)


@pytest.mark.parametrize("labels", [None, "base", "mixed", "new-labels", "bundled-new"])
def test_base64_probabilities_equal_in_process_scores(client, bundle, labels):
    chosen = {None: None, "base": base_classes(bundle)[:2], "mixed": [base_classes(bundle)[0], new_classes(bundle)[0]],
              "new-labels": ["a cat", "an astronaut", "a cup of coffee"], "bundled-new": new_classes(bundle)}[labels]
    images = [photo_bytes(i) for i in range(4)]
    n = len(chosen or bundle.classes.names)
    doc = {"images": [b64(d) for d in images], "top_k": n} | ({"labels": chosen} if chosen else {})
    r = post_json(client, doc)
    assert r.status_code == 200, r.text
    for result, data in zip(r.json()["results"], images):
        assert_matches(bundle, result, data, chosen)


def test_routing(client, zs_client, bundle):
    def head(labels, target=client, headers=None):
        r = post_json(target, {"images": [b64(photo_bytes())], "labels": labels}, headers)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["head"]

    assert head(base_classes(bundle)) == "base"
    assert head(base_classes(bundle)[1:2]) == "base"
    assert head([base_classes(bundle)[0], new_classes(bundle)[0]]) == "new"
    assert head([base_classes(bundle)[0], "a rocket"]) == "new"
    assert head(["a rocket", "a cat"]) == "new"
    assert head(None) == "new"  # every bundled class, new ones included
    assert head(["cat", "a spaceship"], zs_client, {"Authorization": f"Bearer {API_KEY}"}) == "zero-shot"


@pytest.mark.parametrize("scheme", ["data:image/jpeg;base64,", "DATA:IMAGE/JPEG;BASE64,", "Data:image/jpeg;base64,"])
def test_data_uri_display_names_and_subset_mode(client, bundle, scheme):
    """A data URI's scheme, type and `base64` are case-insensitive (RFC 2397)."""
    base = base_classes(bundle)
    display = [c.replace("_", " ") for c in base]
    r = post_json(client, {"images": [scheme + b64(photo_bytes(1))], "labels": display, "mode": "subset",
                           "top_k": len(base)})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["head"] == "base" and set(returned(result)) == set(base)  # display forms are the bundled classes
    assert_matches(bundle, result, photo_bytes(1), base)


def test_labels_with_unicode_format_characters(client, bundle):
    """Emoji ZWJ sequences, a flag tag sequence, a soft hyphen and a zero-width non-joiner are text (Unicode category
    Cf), not control characters: accepted, and scored like any new label."""
    labels = ["\U0001F469\u200D\U0001F4BB coder", "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074"
              "\U000E007F flag", "co\u00ADoperation", "\u0645\u06CC\u200C\u062E\u0648\u0627\u0647\u0645"]
    r = post_json(client, {"images": [b64(photo_bytes(0))], "labels": labels, "top_k": len(labels)})
    assert r.status_code == 200, r.text
    assert set(returned(r.json()["results"][0])) == set(labels)
    assert_matches(bundle, r.json()["results"][0], photo_bytes(0), labels)


def test_multipart_labels_as_repeated_fields(client, bundle):
    labels = [new_classes(bundle)[0], "a dog"]
    r = post_files(client, [photo_bytes(2)], labels=labels, top_k="2")
    assert r.status_code == 200, r.text
    assert_matches(bundle, r.json()["results"][0], photo_bytes(2), labels)


def test_multipart_fields_json_encoded_as_bentoml_client_sends_them(client, bundle):
    """BentoML's client JSON-encodes a form's text fields: a labels part holding a JSON list of strings is that list,
    `"subset"` is subset, `"fvgpt"` names the classifier; a JSON list that is not one of strings stays a label."""
    labels = [new_classes(bundle)[0], "a dog"]
    r = post_files(client, [photo_bytes(2)], labels=json.dumps(labels), top_k="2", mode='"open"', model='"fvgpt"')
    assert r.status_code == 200, r.text
    assert_matches(bundle, r.json()["results"][0], photo_bytes(2), labels)
    r = post_files(client, [photo_bytes(2)], labels=["[1, 2]", "a dog"], top_k="2")
    assert r.status_code == 200 and set(returned(r.json()["results"][0])) == {"[1, 2]", "a dog"}, r.text
    r = post_files(client, [photo_bytes(2)], models=json.dumps(["fvgpt"]), top_k="1")
    assert r.status_code == 200 and r.json()["results"][0]["models"][0]["model"] == "fvgpt", r.text


def test_labels_and_info(client, bundle):
    r = client.get("/labels")
    assert r.status_code == 200
    doc = r.json()
    assert doc["model_id"] == bundle.model_id
    assert [(c["name"], c["base"]) for c in doc["classes"]] == list(zip(bundle.classes.names, bundle.classes.base))
    info = client.get("/info").json()
    assert info["tower"]["provider"] == "CPUExecutionProvider" and info["tower"]["runtime"] == "onnx"
    assert info["tower"]["tower_id"] == bundle.manifest.tower_id
    assert info["batching"] == {"max_batch_size": 8, "max_latency_ms": 10000}
    assert info["limits"]["max_images"] == 4 and info["api_key_required"] is False
    worker = info["tower_worker"]
    assert worker["kind"] == "process" and worker["up"] and worker["pid"] not in (None, os.getpid())
    stages = info["stages"]
    assert set(stages) == {"read", "parse", "decode", "preprocess", "queue", "transport", "tower", "heads",
                           "serialise"}
    post_files(client, [photo_bytes(0)])
    after = client.get("/info").json()["stages"]
    for stage in ("parse", "decode", "preprocess", "tower", "heads", "serialise"):  # one more of each, timed
        assert after[stage]["calls"] > stages[stage]["calls"] and after[stage]["wall_s"] > stages[stage]["wall_s"]
    assert after["tower"]["cpu_s"] > stages["tower"]["cpu_s"]  # measured in the worker process


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
def test_unusual_images_are_classified(client, bundle, kind):
    data = odd_images()[kind]
    r = post_files(client, [data], top_k=str(len(bundle.classes.names)))
    assert r.status_code == 200, r.text
    assert_matches(bundle, r.json()["results"][0], data, None)


# ---- bad requests -------------------------------------------------------------------------------------------------
def truncated_jpeg() -> bytes:
    data = photo_bytes(0)
    return data[: len(data) // 2]


BAD = {
    "non-image bytes": (lambda c: post_files(c, [b"hello, this is not an image"]), 400, "not an image"),
    "truncated JPEG": (lambda c: post_files(c, [truncated_jpeg()]), 400, "truncated"),
    "truncated multipart body": (lambda c: c.post("/classify", **truncated_multipart(top_k="1")), 400,
                                 "the multipart body is truncated"),
    "empty file": (lambda c: post_files(c, [b""]), 400, "empty"),
    "over the pixel limit": (lambda c: post_files(c, [encode(Image.new("L", (1100, 1000)))]), 413, "pixels"),
    "decompression bomb": (lambda c: post_files(c, [encode(Image.new("1", (4000, 4000)))]), 413, "pixels"),
    "extreme aspect ratio": (lambda c: post_files(c, [encode(Image.new("RGB", (400, 2)))]), 400, "aspect ratio"),
    "empty body": (lambda c: c.post("/classify", content=b"", headers={"content-type": "application/json"}), 400,
                   "empty request body"),
    "no body, no content type": (lambda c: c.post("/classify"), 400, "empty request body"),
    "wrong field name": (lambda c: c.post("/classify", files={"image": ("a.jpg", photo_bytes())}), 400,
                         "unknown form field 'image'"),
    "URL as form text": (lambda c: c.post("/classify", files=[("images", (None, "http://example.com/a.jpg"))]),
                         400, "must be a file upload"),
    "URL in JSON": (lambda c: post_json(c, {"images": ["https://example.com/cat.jpg"]}), 400, "URLs are not fetched"),
    "invalid base64": (lambda c: post_json(c, {"images": ["not*base64!"]}), 400, "not valid base64"),
    "non-base64 data URI": (lambda c: post_json(c, {"images": ["data:image/png,abc"]}), 400, "base64"),
    "image not a string": (lambda c: post_json(c, {"images": [123]}), 400, "must be a base64 string"),
    "images not a list": (lambda c: post_json(c, {"images": b64(photo_bytes())}), 400, "non-empty list"),
    "no images in JSON": (lambda c: post_json(c, {"images": []}), 400, "non-empty list"),
    "unknown JSON field": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "topk": 3}), 400, "'topk'"),
    "invalid JSON": (lambda c: c.post("/classify", content=b"{not json", headers={"content-type": "application/json"}),
                     400, "not valid JSON"),
    "JSON not an object": (lambda c: post_json(c, [b64(photo_bytes())]), 400, "must be an object"),
    "too many images (multipart)": (lambda c: post_files(c, [photo_bytes(3)] * 5), 400, "too many images"),
    "too many images (JSON)": (lambda c: post_json(c, {"images": [b64(photo_bytes(3))] * 5}), 400, "too many images"),
    "request too large": (lambda c: c.post("/classify", content=b"x" * (2 << 20 | 1),
                                           headers={"content-type": "application/json"}), 413, "limit"),
    "unsupported content type": (lambda c: c.post("/classify", content=photo_bytes(),
                                                  headers={"content-type": "image/jpeg"}), 415, "Content-Type"),
    "too many labels": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": [f"l{i}" for i in range(9)]}),
                        400, "too many labels"),
    "empty labels": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": []}), 400, "labels is empty"),
    "empty label": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": ["cat", "  "]}), 400,
                    "labels[1] is empty"),
    "overlong label": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": ["x" * 41]}), 400,
                       "characters long"),
    "duplicate label": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": ["cat", " cat"]}), 400,
                        "repeats"),
    "label not a string": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": ["cat", 3]}), 400,
                           "must be a string"),
    "control characters": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": ["c\x00t"]}), 400,
                           "control characters"),
    "C1 control character": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": ["c\x85t\x9b"]}),
                             400, "control characters"),
    "lone surrogate": (lambda c: c.post("/classify", content=b'{"images": ["' + b64(photo_bytes()).encode()
                                        + b'"], "labels": ["c\\ud800t"]}',
                                        headers={"content-type": "application/json"}), 400, "control characters"),
    "unknown label in a subset": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": ["a cat"],
                                                          "mode": "subset"}), 400, "not a bundled class"),
    "subset without labels": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "mode": "subset"}), 400,
                              "needs labels"),
    "unknown mode": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "mode": "strict"}), 400, "mode"),
    "top_k zero": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "top_k": 0}), 400, "top_k"),
    "top_k negative": (lambda c: post_files(c, [photo_bytes()], top_k="-1"), 400, "top_k"),
    "top_k too large": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": ["cat", "dog"],
                                                "top_k": 3}), 400, "between 1 and 2"),
    "top_k not an integer": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "top_k": "5"}), 400, "integer"),
    "top_k not a number (multipart)": (lambda c: post_files(c, [photo_bytes()], top_k="five"), 400, "not an integer"),
    # deep enough for every Python's parser to give up (3.11 near depth 1,000, 3.13 between 5,000 and 20,000)
    "deeply nested JSON": (lambda c: c.post("/classify", content=b'{"images": ' + b"[" * 100_000 + b"]" * 100_000
                                            + b"}", headers={"content-type": "application/json"}),
                           400, "nested too deeply"),
    "nested JSON image": (lambda c: post_json(c, {"images": [[[["x"]]]]}), 400, "must be a base64 string"),
    "nested JSON label": (lambda c: post_json(c, {"images": [b64(photo_bytes())], "labels": [[["cat"]]]}), 400,
                          "must be a string"),
    "data URI of another type": (lambda c: post_json(c, {"images": ["data:text/html;base64," + b64(photo_bytes())]}),
                                 400, "text/html is not an image type"),
    "data URI type mismatch": (lambda c: post_json(c, {"images": ["data:image/png;base64," + b64(photo_bytes())]}),
                               400, "declared image/png but is a JPEG"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_json_4xx(client, case):
    send, status, message = BAD[case]
    r = send(client)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert isinstance(error, str) and message in error, error


def test_healthy_after_bad_input(client, bundle):
    for send, _, _ in BAD.values():
        send(client)
    assert client.ready()
    assert client.engine.budget.held == 0  # every refused request gave its reservation back
    r = post_files(client, [photo_bytes(3)])
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["predictions"]) == 5  # the default top_k
    assert_matches(bundle, r.json()["results"][0], photo_bytes(3), None)


def test_readiness_runs_a_canary_inference(client):
    batches = client.engine.metrics.snapshot()["batches"]
    assert client.ready()
    assert client.engine.metrics.snapshot()["batches"] == batches + 1  # one tower batch: the canary went through


# ---- API key ------------------------------------------------------------------------------------------------------
def test_api_key(zs_client):
    doc = {"images": [b64(photo_bytes(1))], "top_k": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": API_KEY}):
        r = post_json(zs_client, doc, headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert r.headers["WWW-Authenticate"] == "Bearer"
        for route in ("/labels", "/models", "/info"):
            assert zs_client.get(route, headers=headers).status_code == 401, route
        assert zs_client.post("/admin/reload", headers=headers).status_code == 401
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
        r = post_json(zs_client, doc, headers)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["head"] == "zero-shot"
        assert [c["name"] for c in zs_client.get("/labels", headers=headers).json()["classes"]] == \
            ["cat", "dog", "rocket"]


# ---- load ---------------------------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_and_batch_independent(client, bundle):
    """200 requests from 8 threads: none fails, batches form (fewer batches than requests, not all of one image),
    and every answer equals the image's answer alone (ranking, 1e-5), whatever its batch mates."""
    photos = [photo_bytes(i) for i in range(4)]
    want = [expected(bundle, d, None)[1] for d in photos]
    before = client.engine.metrics.snapshot()

    def one(i: int) -> tuple[int, dict]:
        r = post_files(client, [photos[i % 4]], top_k="6")
        return r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(200)))
    assert [a for a in answers if a[0] != 200] == []
    for i, (_, doc) in enumerate(answers):
        got, probs = returned(doc["results"][0]), want[i % 4]
        assert list(got) == sorted(probs, key=probs.get, reverse=True)
        assert max(abs(got[k] - probs[k]) for k in got) <= 1e-5
    after = client.engine.metrics.snapshot()
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    batches = sum(sizes.values())
    assert batches < 200 and sizes.get(1, 0) < batches, f"{sizes}: requests were not batched"


def test_an_overloaded_queue_is_refused_with_503(tiny_zero_shot_bundle):
    """FVGPT_MAX_LATENCY_MS=1: once the batcher has timed a batch, a request whose images ahead cannot run within
    1 ms is refused at once with 503 and Retry-After, and nothing else fails."""
    with engine_client(tiny_zero_shot_bundle, FVGPT_MAX_LATENCY_MS="1", FVGPT_POLL_S="0") as c, \
            ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post_files(c, [photo_bytes(0)] * 4), range(64)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    refused = [a for a in answers if a.status_code == 503]
    assert all(a.headers["Retry-After"] and "FVGPT_MAX_LATENCY_MS" in a.json()["error"] for a in refused)
