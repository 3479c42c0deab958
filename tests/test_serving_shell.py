"""The BentoML shell without a server: the BentoML version check, the shape of every BentoML / uvicorn / circus
internal shell/internals.py touches (an upgrade that changes one fails here, not in production), the HTTP protocol
on a real uvicorn, the service's schema, and `bentoml build`."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bentoml
from fvgpt_serving.process import free_port
from fvgpt_serving.shell import internals
from fvgpt_serving.shell.protocol import MAX_HEAD_BYTES, GuardedH11Protocol
from serving_support import raw_exchange

REPO = Path(__file__).resolve().parents[1]


# ---- the version check ----------------------------------------------------------------------------------------------
def test_an_untested_bentoml_is_refused_with_one_line(monkeypatch, capsys):
    internals.check_version()  # the installed one is the tested one
    monkeypatch.setattr(bentoml, "__version__", "1.5.0")
    with pytest.raises(SystemExit) as exc:
        internals.install("worker", 30.0)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1.4.40" in err and "1.5.0" in err and err.startswith("error: ")


# ---- the internals' shapes ----------------------------------------------------------------------------------------
def test_uvicorn_server_shape():
    """The worker finds uvicorn's Server as the bound handle_exit installed for SIGTERM, sets its protocol class and
    graceful timeout during lifespan startup (before the listening servers are created from the config), and shuts
    its listening sockets down on SIGTERM."""
    import uvicorn

    assert list(inspect.signature(uvicorn.Server.handle_exit).parameters) == ["self", "sig", "frame"]
    assert "signal.signal(sig, self.handle_exit)" in inspect.getsource(uvicorn.Server.capture_signals)
    startup = inspect.getsource(uvicorn.Server.startup)
    assert startup.index("self.lifespan.startup()") < startup.index("config.http_protocol_class")
    serve = inspect.getsource(uvicorn.Server)
    assert "self.servers" in serve and "server_state.tasks" in inspect.getsource(uvicorn.Server.shutdown)
    assert "self.http_protocol_class" in inspect.getsource(uvicorn.Config.load)  # loaded before the lifespan runs
    assert "timeout_graceful_shutdown" in inspect.signature(uvicorn.Config).parameters
    worker = Path(inspect.getfile(bentoml)).parents[1] / "_bentoml_impl" / "worker" / "service.py"
    assert "uvicorn.Server(config).run(" in worker.read_text()  # in the worker's main thread: signals reach it


def test_h11_protocol_shape():
    """What GuardedH11Protocol reads and overrides of uvicorn's H11Protocol and h11."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

    for name in ("connection_made", "connection_lost", "data_received", "on_response_complete", "send_400_response"):
        assert callable(getattr(H11Protocol, name)), name
    init = inspect.getsource(H11Protocol.__init__)
    assert all(f"self.{a}" in init for a in ("conn = h11.Connection(", "cycle: RequestResponseCycle", "loop ="))
    cycle = inspect.getsource(RequestResponseCycle.__init__)
    assert all(f"self.{a} =" in cycle for a in ("more_body", "response_complete", "response_started", "disconnected",
                                                "message_event"))
    conn = h11.Connection(h11.SERVER)
    assert conn.their_state is h11.IDLE and conn.trailing_data == (b"", False)


def test_circus_arbiter_shape():
    """The arbiter's stop is a coroutine method the drain-aware one wraps; watchers carry graceful_timeout."""
    from circus.arbiter import Arbiter as CircusArbiter
    from circus.watcher import Watcher

    from bentoml._internal.utils.circus import Arbiter

    assert issubclass(Arbiter, CircusArbiter) and "self.watchers = watchers" in inspect.getsource(CircusArbiter)
    assert "yield self._stop_watchers(" in inspect.getsource(CircusArbiter.stop)
    assert "w._stop(" in inspect.getsource(CircusArbiter._stop_watchers)
    assert inspect.signature(Watcher.__init__).parameters["graceful_timeout"].default == 30.0
    assert "graceful_timeout = self.graceful_timeout" in inspect.getsource(Watcher.kill_process)


def test_bentoml_api_shapes():
    """The service relies on BentoML's API endpoint calling the input spec's from_http_request, passing a returned
    Response on as it is, and taking the status from the request context afterwards; on the __is_ready__ and
    __metrics__ hooks; and on a mounted app being matched before BentoML's own /docs.json."""
    from _bentoml_impl.server.app import ServiceAppFactory

    endpoint = inspect.getsource(ServiceAppFactory.api_endpoint)
    assert "method.input_spec.from_http_request(request, serde)" in endpoint
    assert "if isinstance(output, Response):" in endpoint
    assert "response.status_code = ctx.response.status_code" in endpoint
    assert "__is_ready__" in inspect.getsource(ServiceAppFactory.readyz)
    assert "__metrics__" in inspect.getsource(ServiceAppFactory.metrics)
    build = inspect.getsource(ServiceAppFactory.__call__)
    assert build.index("PassiveMount") < build.index('"docs.json"')


# ---- the protocol on a real uvicorn ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def protocol_server():
    """uvicorn with GuardedH11Protocol (0.5 s timeouts) in front of an app that answers 200 "ok"."""
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol = type("Guarded", (GuardedH11Protocol,), {"header_timeout_s": 0.5, "body_timeout_s": 0.5})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def exchange(port: int, data: bytes) -> bytes:
    return raw_exchange(f"http://127.0.0.1:{port}", data, 5)[0]


def head_of(size: int) -> bytes:
    start = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def test_the_head_limit_holds_however_the_head_arrives(protocol_server):
    """h11 limits only an incomplete head: a 100 KB head sent at once used to get a 200. Now a head of 16 KiB + 1
    byte is a JSON 400, one of exactly 16 KiB is served."""
    assert len(head_of(MAX_HEAD_BYTES)) == MAX_HEAD_BYTES
    assert exchange(protocol_server, head_of(MAX_HEAD_BYTES)).startswith(b"HTTP/1.1 200")
    for size in (MAX_HEAD_BYTES + 1, 100_000):
        raw = exchange(protocol_server, head_of(size))
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, raw[:200]
        assert f"over {MAX_HEAD_BYTES} bytes" in json.loads(body)["error"]


def test_slow_heads_and_bodies_get_a_json_408(protocol_server):
    for data in (b"GET / HTTP/1.1\r\nHost: x\r\nX-Half", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab"):
        t0 = time.perf_counter()
        raw = exchange(protocol_server, data)
        assert raw.startswith(b"HTTP/1.1 408") and b"timeout" in raw, raw[:200]
        assert 0.4 < time.perf_counter() - t0 < 4


# ---- the service and its Bento --------------------------------------------------------------------------------------
def test_the_service_declares_typed_apis():
    from fvgpt_serving.shell.service import FVGPT

    routes = {r["name"]: r for r in FVGPT.schema()["routes"]}
    assert {(n, r["route"]) for n, r in routes.items()} == {("classify", "/classify"), ("reload", "/admin/reload")}
    inputs = routes["classify"]["input"]["properties"]
    assert inputs["images"]["items"]["type"] == "file"  # BentoML's client sends the images as file parts
    assert set(inputs) == {"images", "labels", "top_k", "mode", "model", "models"}
    assert routes["classify"]["input"]["not"] == {"required": ["model", "models"]}


def test_bentoml_build_from_the_checkout(tmp_path):
    """`bentoml build` (the one documented command, from the repo root): its apis/schema.json lists the routes, it
    holds the project's source and no training weights, and its image installs the project from that source."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")} | {"BENTOML_HOME": str(home),
                                                                                "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run([sys.executable, "-m", "bentoml", "build"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (bento,) = [p for p in (home / "bentos" / "fvgpt-serve").iterdir() if p.is_dir()]
    routes = json.loads((bento / "apis" / "schema.json").read_text())["routes"]
    assert [r["route"] for r in routes] == ["/classify", "/admin/reload"]
    files = [p.relative_to(bento).as_posix() for p in bento.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith(".safetensors")], "training weights in the Bento"
    assert {f.split("/")[1] for f in files if f.startswith("src/")} == {"pyproject.toml", "README.md", "bentofile.yaml",
                                                                       "fvgpt", "runtime", "export", "serving"}
    assert "src/serving/shell/service.py" in files and "src/fvgpt/weights/README.md" in files
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert requirements[0] == "--editable .[cpu,serve]" and "bentoml==1.4.40" in requirements
    import yaml

    image = yaml.safe_load((bento / "bento.yaml").read_text())["image"]
    assert image["build_include"] == ["pyproject.toml", "README.md", "fvgpt", "runtime", "export", "serving"]
