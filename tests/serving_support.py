"""What the serving tests share: the engine run in-process (EngineClient: the same routes, bodies built by httpx as
a client would send them, answers shaped like httpx's), real servers on loopback (Server), images, and the
in-process reference answers (Bundle.classify on the same bytes) that served answers are compared with."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from fvgpt.photos import photo_paths
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.preprocess import preprocess
from fvgpt_serving.cli import server_command
from fvgpt_serving.engine.engine import Engine
from fvgpt_serving.engine.settings import Settings
from fvgpt_serving.process import free_port, stop, wait_ready


# ---- the engine in-process ----------------------------------------------------------------------------------------
@dataclass
class Answer:
    """An engine reply, read like an httpx.Response."""

    status_code: int
    content: bytes
    headers: dict[str, str]

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode()


async def _chunks(body: bytes):
    yield body


class EngineClient:
    """An Engine on its own event loop thread, answering the routes a server answers: request(method, path, ...)
    takes httpx's arguments (files=, data=, json=, content=, headers=, params=)."""

    def __init__(self, settings: Settings, ready_timeout_s: float = 120):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self.thread.start()
        self.engine = Engine(settings)
        self.call(self.engine.start())
        self.wait_ready(ready_timeout_s)

    def call(self, coro, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def ready(self) -> bool:
        return self.call(self.engine.ready())

    def wait_ready(self, timeout_s: float) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine was not ready after {timeout_s:.0f} s")
            time.sleep(0.1)

    def request(self, method: str, path: str, **kwargs) -> Answer:
        req = httpx.Request(method, f"http://engine{path}", **kwargs)
        headers = {k.lower(): v for k, v in req.headers.items()}
        model = req.url.params.get("model")
        e = self.engine
        routes = {("POST", "/classify"): lambda: e.classify_http(headers, _chunks(req.read())),
                  ("POST", "/explain"): lambda: e.explain_http(headers, _chunks(req.read())),
                  ("GET", "/labels"): lambda: e.labels_http(headers, model),
                  ("GET", "/models"): lambda: e.models_http(headers),
                  ("GET", "/info"): lambda: e.info_http(headers, model),
                  ("POST", "/admin/reload"): lambda: e.reload_http(headers)}
        reply = self.call(routes[(method, path)]())
        return Answer(reply.status, reply.body, reply.headers)

    def get(self, path: str, **kwargs) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> Answer:
        return self.request("POST", path, **kwargs)

    def close(self) -> None:
        self.call(self.engine.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def settings(source: Path, repository: bool = False, **env: str) -> Settings:
    """Settings as a server started with these FVGPT_* variables would have them (only those: not this shell's)."""
    return Settings.from_env({"FVGPT_REPOSITORY" if repository else "FVGPT_BUNDLE": str(source)} | env)


@contextmanager
def engine_client(source: Path, repository: bool = False, **env: str) -> Iterator[EngineClient]:
    client = EngineClient(settings(source, repository, **env))
    try:
        yield client
    finally:
        client.close()


# ---- real servers -------------------------------------------------------------------------------------------------
class Server:
    """`bentoml serve` of the shell on one bundle (FVGPT_BUNDLE) or, with repository=True, on a folder of them."""

    def __init__(self, source: Path, log: Path, repository: bool = False, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")}
        full_env = inherited | {"FVGPT_REPOSITORY" if repository else "FVGPT_BUNDLE": str(source)} | env
        self.log = open(log, "w+")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(server_command("127.0.0.1", self.port), env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> None:
        try:
            wait_ready(self.proc, self.url, 120)
        except RuntimeError:
            self.log.seek(0)
            raise RuntimeError(self.log.read()[-4000:]) from None

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", timeout=60, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

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


# ---- requests and answers -----------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo_bytes(i: int = 0) -> bytes:
    return photo_paths()[i].read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def big_gray_png(side: int) -> bytes:
    """A large but tiny-on-the-wire PNG (a gradient compresses to a few KB): costly to decode, cheap to send."""
    return encode(Image.fromarray(np.tile(np.arange(side, dtype=np.uint8), (side, 1)), "L"))


def post_files(client, images: list[bytes], headers: dict | None = None, **fields):
    files = [("images", (f"img{i}.bin", data, "application/octet-stream")) for i, data in enumerate(images)]
    return client.post("/classify", files=files, data=fields, headers=headers)


def post_json(client, doc, headers: dict | None = None):
    return client.post("/classify", json=doc, headers=headers)


def expected(bundle: Bundle, data: bytes, labels: list[str] | None, precision: str | None = None):
    """What the service should answer, computed in-process on the same bytes."""
    scores = bundle.classify(preprocess(Image.open(io.BytesIO(data)), bundle.preprocess)[None], labels, precision)
    return scores.head, dict(zip(scores.labels, scores.probabilities[0].tolist()))


def returned(result: dict) -> dict[str, float]:
    return {p["label"]: p["probability"] for p in result["predictions"]}


def assert_matches(bundle: Bundle, result: dict, data: bytes, labels: list[str] | None,
                   precision: str | None = None) -> None:
    """Same head, model id, ranking and probabilities (to 1e-5) as Bundle.scores in-process."""
    head, probs = expected(bundle, data, labels, precision)
    got = returned(result)
    assert result["head"] == head and result["model_id"] == bundle.model_id
    assert list(got) == sorted(probs, key=probs.get, reverse=True)[:len(got)]
    assert max(abs(got[k] - probs[k]) for k in got) <= 1e-5


def truncated_multipart(headers: dict | None = None, **fields) -> dict:
    """httpx keyword arguments of a multipart POST of two photos (and `fields`) cut before its closing boundary, in
    the second photo's part."""
    req = httpx.Request("POST", "http://x/classify", files=[("images", ("a.jpg", photo_bytes(0))),
                                                            ("images", ("b.jpg", photo_bytes(1)))], data=fields)
    return {"content": req.read()[:-100], "headers": (headers or {}) | {"content-type": req.headers["content-type"]}}


def raw_exchange(url: str, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send `data` on a fresh connection to http://HOST:PORT and read until the server closes it (or `wait_s`
    passes): what came back, and the seconds it took."""
    import socket
    import time

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
