"""The real server on loopback (`bentoml serve` of the shell, `fvgpt serve`): what only a running server shows.
BentoML's own client, the HTTP errors of every layer, the protocol limits, the OpenAPI document with real answers
checked against it, a killed tower worker, SIGTERM, busy ports, per-server metrics, the smoke test. Everything else
runs in-process against the engine (tests/test_serving.py and the rest).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openapi_schema_validator import OAS30Validator
from openapi_schema_validator import validate as validate_schema
from openapi_spec_validator import validate as validate_document

from fvgpt.photos import photo_paths
from fvgpt_runtime.bundle import Bundle
from fvgpt_serving.cli import server_command
from fvgpt_serving.process import free_port, server_processes, stop, wait_ready
from test_serving import BAD
from serving_support import (Server, assert_matches, b64, big_gray_png, photo_bytes, post_files, post_json,
                             raw_exchange, running, truncated_multipart)

pytestmark = pytest.mark.slow

KEY = "http-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 1.5
ENV = {"FVGPT_API_KEY": KEY, "FVGPT_HEADER_TIMEOUT_S": str(TIMEOUT_S), "FVGPT_BODY_TIMEOUT_S": str(TIMEOUT_S),
       "FVGPT_READY_TTL_S": "0", "FVGPT_MAX_IMAGES": "6"}


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("http-logs") / "server.log", **ENV)
    with running(srv):
        yield srv


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle(tiny_bundle)


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw[:300]
    return int(head.split()[1]), json.loads(body)


# ---- BentoML's client -------------------------------------------------------------------------------------------
def test_bentoml_client_calls_the_typed_apis(server, bundle):
    import bentoml
    from PIL import Image

    photos = photo_paths()
    labels = ["a cat", bundle.classes.new_names[0], bundle.classes.base_names[0].replace("_", " ")]
    with bentoml.SyncHTTPClient(server.url, token=KEY) as client:
        answer = client.classify(images=[photos[0], Image.open(photos[1])], labels=labels, top_k=3)
        for result, photo in zip(answer["results"], photos[:2]):
            assert_matches(bundle, result, photo.read_bytes(), [labels[0], labels[1], bundle.classes.base_names[0]])
        several = client.classify(images=[photos[2]], models="*", mode="open")  # sent JSON-encoded: "*", "open"
        assert [m["model"] for m in several["results"][0]["models"]] == [Path(bundle.path).name]
        assert client.reload()["changes"] == {"loaded": [], "failed": [], "removed": []}
        with pytest.raises(bentoml.exceptions.BentoMLException, match="is not an image"):
            client.classify(images=[Path(__file__)])


def test_answers_over_http_are_the_engines(server, bundle):
    for r, data in ((post_files(server, [photo_bytes(1)], AUTH, top_k="6"), photo_bytes(1)),
                    (post_json(server, {"images": [b64(photo_bytes(2))], "top_k": 6}, AUTH), photo_bytes(2))):
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        assert_matches(bundle, r.json()["results"][0], data, None)


# ---- errors, probes, redirects, protocol --------------------------------------------------------------------------
ERRORS = {
    "unknown path": (lambda s: s.get("/classifyy"), 404, "Not Found"),
    "GET /classify": (lambda s: s.get("/classify"), 405, "Method Not Allowed"),
    "wrong method on a BentoML route": (lambda s: s.post("/livez"), 405, "Method Not Allowed"),
    "no key": (lambda s: post_files(s, [photo_bytes()]), 401, "API key"),
    "wrong key on a GET route": (lambda s: s.get("/models", headers={"X-API-Key": "nope"}), 401, "API key"),
    "not an image": (lambda s: post_files(s, [b"hello"], AUTH), 400, "not an image"),
    "too many images": (lambda s: post_files(s, [photo_bytes()] * 7, AUTH), 400, "too many images"),
    "truncated multipart": (lambda s: s.post("/classify", **truncated_multipart(AUTH)), 400, "truncated"),
    "unsupported content type": (lambda s: s.post("/classify", content=b"x", headers=AUTH | {
        "content-type": "image/jpeg"}), 415, "Content-Type"),
    "BentoML's pickle type": (lambda s: s.post("/classify", content=b"x", headers=AUTH | {
        "content-type": "application/vnd.bentoml+pickle"}), 415, "is not allowed"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_every_error_is_json(server, case):
    send, status, message = ERRORS[case]
    r = send(server)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"], r.json()


class Authed:
    """The module's server, every request sent with the key (the catalogues of tests/test_serving.py send none)."""

    def __init__(self, server: Server):
        self.server = server

    def request(self, method: str, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
        return self.server.request(method, path, headers=AUTH | (headers or {}), **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@pytest.mark.parametrize("case", [c for c in BAD if c not in ("too many images (multipart)", "too many images (JSON)",
                                                              "too many labels", "overlong label",
                                                              "over the pixel limit", "decompression bomb",
                                                              "request too large",
                                                              "extreme aspect ratio")])
def test_the_hostile_catalogue_gets_the_same_answers_over_http(server, case):
    """tests/test_serving.py's bad inputs through the real shell: the same status and message as in-process (the
    cases that depend on that module's smaller limits left out)."""
    send, status, message = BAD[case]
    r = send(Authed(server))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and message in r.json()["error"], r.text


def test_probes_and_the_document_need_no_key(server):
    for probe in ("/readyz", "/livez", "/healthz", "/metrics", "/docs.json", "/schema.json"):
        assert server.get(probe).status_code == 200, probe


def test_a_trailing_slash_is_redirected_without_echoing_the_host(server, bundle):
    r = server.post("/classify/", headers=AUTH | {"Host": "evil.example"},
                    files=[("images", ("a.jpg", photo_bytes(0)))])
    assert r.status_code == 307 and r.headers["location"] == "/classify", r.headers
    assert "evil" not in r.text
    with httpx.Client(base_url=server.url, follow_redirects=True, headers=AUTH, timeout=60) as client:
        followed = client.post("/classify/", files=[("images", ("a.jpg", photo_bytes(0)))], data={"top_k": "6"})
    assert followed.status_code == 200 and followed.url.path == "/classify", followed.text
    assert_matches(bundle, followed.json()["results"][0], photo_bytes(0), None)
    assert server.get("/models/", headers=AUTH).headers["location"] == "/models"


def test_the_served_protocol_has_its_timeouts_and_head_limit(server):
    """The shell installs shell/protocol.py in BentoML's uvicorn: half-sent heads and bodies get a JSON 408 after
    their timeout, a head over 16 KiB a JSON 400, garbage a JSON 400."""
    cases = [b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: applic",
             b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
             b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n{"]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda data: raw_exchange(server.url, data, 15), cases))
    for raw, elapsed in answers:
        status, doc = status_and_json(raw)
        assert status == 408 and "timeout" in doc["error"], doc
        assert TIMEOUT_S * 0.9 <= elapsed <= TIMEOUT_S + 8, elapsed
    big = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
    status, doc = status_and_json(raw_exchange(server.url, big, 10)[0])
    assert status == 400 and "over 16384 bytes" in doc["error"]
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"):
        status, doc = status_and_json(raw_exchange(server.url, garbage, 10)[0])
        assert status == 400 and "invalid HTTP request" in doc["error"], doc


# ---- the OpenAPI document -----------------------------------------------------------------------------------------
def test_openapi_document_states_what_is_enforced(server):
    doc = server.get("/docs.json").json()
    validate_document(doc)  # a valid OpenAPI 3.0 document, BentoML's part included
    for path, method in (("/classify", "post"), ("/models", "get"), ("/labels", "get"), ("/info", "get"),
                         ("/admin/reload", "post"), ("/readyz", "get"), ("/metrics", "get")):
        assert "200" in doc["paths"][path][method]["responses"], path
    body = doc["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    schemas = doc["components"]["schemas"]

    def check(instance, name: str) -> None:
        validate_schema(instance, {"$ref": f"#/components/schemas/{name}", "components": doc["components"]},
                        cls=OAS30Validator)

    request = {"images": [b64(photo_bytes(0))], "models": ["tiny"], "labels": ["a cat", "cat"], "top_k": 2}
    check(request, "ClassifyJSON")
    check(request | {"models": "*"}, "ClassifyJSON")
    one = {k: v for k, v in request.items() if k != "models"}
    refused = {"unknown field": request | {"topk": 2}, "model and models": request | {"model": "a"},
               "no images": request | {"images": []}, "too many images": request | {"images": ["x"] * 7},
               "empty labels": request | {"labels": []}, "empty label": request | {"labels": [""]},
               "top_k 0": request | {"top_k": 0}, "empty models": request | {"models": []},
               "empty model": one | {"model": ""}}
    for case, instance in refused.items():  # the schema refuses what the server refuses
        with pytest.raises(Exception):
            check(instance, "ClassifyJSON")
            pytest.fail(f"the schema accepts {case}")
        assert post_json(server, instance, AUTH).status_code == 400, case
    assert schemas["ClassifyForm"]["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
    assert schemas["ClassifyForm"]["properties"]["images"]["maxItems"] == 6  # this server's FVGPT_MAX_IMAGES
    single = post_files(server, [photo_bytes(0)], AUTH).json()
    check(single, "ClassifyResponse")
    with pytest.raises(Exception):
        check(single, "MultiClassifyResponse")
    check(post_json(server, {"images": [b64(photo_bytes(0))], "models": "*"}, AUTH).json(), "MultiClassifyResponse")
    check(post_json(server, {"images": ["http://x"]}, AUTH).json(), "Error")
    check(server.get("/models", headers=AUTH).json(), "ModelsResponse")
    check(server.get("/labels", headers=AUTH).json(), "LabelsResponse")
    check(server.get("/info", headers=AUTH).json(), "InfoResponse")
    check(server.post("/admin/reload", headers=AUTH).json(), "ReloadResponse")


def test_metrics_show_where_request_time_goes(server):
    post_files(server, [photo_bytes(0)], AUTH)
    text = server.get("/metrics").text
    for stage in ("parse", "decode", "preprocess", "queue", "transport", "tower", "heads", "serialise"):
        value = re.search(rf'fvgpt_stage_seconds_total{{stage="{stage}",clock="wall"}} (\S+)', text)
        assert value and float(value.group(1)) > 0, stage
    assert re.search(r'fvgpt_tower_images_total\{tower_id="tower-[0-9a-f]+"\} [1-9]', text)
    assert "bentoml_service_request_total" in text  # BentoML's own metrics are still there


# ---- a killed tower worker ----------------------------------------------------------------------------------------
def test_a_killed_tower_worker_costs_503s_and_readiness_at_once(server, bundle):
    """kill -9 of the tower worker under load: requests in flight get 503 + Retry-After (never a 500), /readyz
    answers 503 at once, also while a readiness canary was in flight when it died; a new worker is started, its
    tower opened again, and answers are right again."""
    (tower,) = server_processes(server.proc.pid)["tower"]
    answers: list[httpx.Response] = []
    readyz: list[tuple[float, int]] = []
    done = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60, headers=AUTH) as c:
            while not done.is_set():
                answers.append(c.post(f"{server.url}/classify", files=[("images", ("a.jpg", photo_bytes(3)))]))

    def probe() -> None:  # FVGPT_READY_TTL_S=0: every probe runs the canary through the tower
        while not done.is_set():
            t0 = time.perf_counter()
            status = httpx.get(f"{server.url}/readyz", timeout=30).status_code
            readyz.append((time.perf_counter() - t0, status))

    threads = [threading.Thread(target=load) for _ in range(6)] + [threading.Thread(target=probe)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        tower.send_signal(signal.SIGKILL)
        tower.wait(10)
        t0 = time.perf_counter()
        down = httpx.get(f"{server.url}/readyz", timeout=10)
        down_s = time.perf_counter() - t0
        back = None
        while time.perf_counter() - t0 < 90:
            if httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200:
                back = time.perf_counter() - t0
                break
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert down.status_code == 503 and down_s < 1.0, (down.status_code, down_s)
    assert back is not None, "/readyz never answered 200 again"
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1, sorted(set(codes))
    assert all(a.headers["retry-after"] for a in answers if a.status_code == 503)
    assert codes[-1] == 200
    assert {s for _, s in readyz} <= {200, 503} and max(s for s, _ in readyz) < 5, readyz
    (new,) = server_processes(server.proc.pid)["tower"]
    assert new.pid != tower.pid and server.get("/info", headers=AUTH).json()["tower_worker"]["restarts"] == 1
    r = post_files(server, [photo_bytes(3)], AUTH, top_k="6")
    assert r.status_code == 200, r.text
    assert_matches(bundle, r.json()["results"][0], photo_bytes(3), None)


# ---- fvgpt serve ----------------------------------------------------------------------------------------------------
def test_smoke_test_command(tiny_bundle):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")}
    proc = subprocess.run([sys.executable, "-m", "fvgpt.cli", "serve", str(tiny_bundle), "--smoke-test"],
                          check=False, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke test passed" in proc.stdout
    doc = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    assert len(doc["results"]) == 1 and doc["results"][0]["predictions"]


def test_fvgpt_serve_on_a_busy_port_exits_2_with_one_line(tiny_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fvgpt.cli", "serve", str(tiny_bundle), "--port", str(port)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and time.perf_counter() - t0 < 30
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and f"port {port} on 127.0.0.1 is in use" in proc.stderr


@pytest.fixture(scope="module")
def two_serves(tiny_bundle, tiny_zero_shot_bundle, tmp_path_factory):
    """Two `fvgpt serve` sharing one BENTOML_HOME (as two servers of one user do)."""
    home = tmp_path_factory.mktemp("shared-bentoml-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")} | {"BENTOML_HOME": str(home)}
    logs = tmp_path_factory.mktemp("serve-logs")
    servers = []
    for name, source in (("a", tiny_bundle), ("b", tiny_zero_shot_bundle)):
        port = free_port()
        log = open(logs / f"{name}.log", "w+")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "fvgpt.cli", "serve", str(source), "--port", str(port),
                                 "--drain-timeout", "60"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        servers.append((proc, f"http://127.0.0.1:{port}", log))
    try:
        for proc, url, _ in servers:
            wait_ready(proc, url, 120)
        yield servers
    finally:
        for proc, _, log in servers:
            stop(proc)
            log.close()


def classify_count(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r'bentoml_service_request_total\{[^}]*endpoint="/classify"[^}]*\} (\S+)',
                                            text))


def test_servers_sharing_bentoml_home_keep_their_own_metrics(two_serves):
    (_, a, _), (_, b, _) = two_serves
    for url, n in ((a, 3), (b, 1)):
        for _ in range(n):
            r = httpx.post(f"{url}/classify", files=[("images", ("a.jpg", photo_bytes(0)))], timeout=60)
            assert r.status_code == 200, r.text
    assert (classify_count(a), classify_count(b)) == (3, 1)


def test_sigterm_drains_in_flight_requests_and_exits_0(two_serves):
    """SIGTERM to `fvgpt serve` while requests are in flight: every one of them is answered 200, a new connection
    is refused at once, the command exits 0 after the drain, and the other server sharing its home keeps serving."""
    (proc, url, log), (_, other, _) = two_serves
    heavy = big_gray_png(3000)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, f"{url}/classify", files=[("images", (f"{i}.png", heavy))
                                                                     for i in range(4)], timeout=120)
                   for _ in range(8)]
        time.sleep(0.5)
        assert not all(f.done() for f in futures), "nothing was in flight"
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/livez", timeout=5)
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers if a.status_code != 200]
    assert proc.wait(90) == 0 and time.perf_counter() - t0 < 60
    log.seek(0)
    assert "Traceback" not in log.read()
    assert httpx.get(f"{other}/readyz", timeout=30).status_code == 200


def test_bentoml_serve_on_a_bad_bundle_exits_instead_of_crash_looping(tiny_bundle, tmp_path):
    """Started without the `fvgpt serve` checks (a container running `bentoml serve`): the configuration is
    validated before any worker starts, and the server exits non-zero instead of restarting its workers."""
    from fvgpt_runtime.manifest import MANIFEST

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    doc = json.loads((bad / MANIFEST).read_text())
    doc["classes"][0]["name"] = "changed"  # the digest no longer matches
    (bad / MANIFEST).write_text(json.dumps(doc))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")} | {"FVGPT_BUNDLE": str(bad)}
    for extra, message in (({}, "digest does not match"), ({"FVGPT_MAX_IMAGES": "many"},
                                                          "FVGPT_MAX_IMAGES='many' is not an integer")):
        t0 = time.perf_counter()
        proc = subprocess.run(server_command("127.0.0.1", free_port()), env=env | extra, capture_output=True,
                              check=False, text=True, timeout=120, start_new_session=True)
        assert proc.returncode != 0 and time.perf_counter() - t0 < 90
        out = proc.stdout + proc.stderr
        assert message in out and "Started server process" not in out, out[-2000:]
