"""`fvgpt serve BUNDLE`: run `bentoml serve fvgpt_serving.service:FVGPT` with the bundle and options passed as environment
variables (serving/config.py), forward SIGINT/SIGTERM to it, and exit with its status. `--smoke-test` starts it on a
free loopback port, classifies one bundled photo over HTTP, prints the JSON and stops it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import config

SERVICE = "fvgpt_serving.service:FVGPT"
REPO_ROOT = Path(__file__).resolve().parent.parent  # bentoml serve imports the installed fvgpt_serving from here


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP with BentoML (POST /classify, GET /labels, GET /info)",
                       description="Starts `bentoml serve` on the bundle: adaptive batching on the tower (ONNX "
                                   "Runtime, CUDA where available, or the bundle's TensorRT engine), base/new/zero-"
                                   "shot routing, new labels through the text graph. Limits and the API key come "
                                   "from FVGPT_* environment variables (serving/README.md).")
    p.add_argument("bundle", help="bundle dir written by fvgpt export")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--runtime", choices=config.RUNTIMES, default="auto",
                   help="tower runtime (default auto: the choice of the bundle's tuning profile (`fvgpt tune`) when "
                        "it was measured on a host like this one; else the bundle's TensorRT engine if usable here, "
                        "else ONNX Runtime at the bundle's default precision)")
    p.add_argument("--precision", help="tower precision (default: the tuning profile's choice, else the bundle's "
                                       "default); with a profile, --runtime/--precision pick its fastest candidate "
                                       "that fits")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for the tower (default: one per core)")
    p.add_argument("--max-batch-size", type=int, default=config.DEFAULT_MAX_BATCH,
                   help=f"largest batch the adaptive batcher forms, in images across requests (default "
                        f"{config.DEFAULT_MAX_BATCH})")
    p.add_argument("--max-latency-ms", type=int, default=config.DEFAULT_MAX_LATENCY_MS,
                   help=f"queue wait + inference budget; requests that cannot meet it get 503 (default "
                        f"{config.DEFAULT_MAX_LATENCY_MS})")
    p.add_argument("--smoke-test", action="store_true",
                   help="start on a free loopback port, classify one bundled photo, print the JSON, stop")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="--smoke-test: seconds to wait for /readyz (default 300)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from fvgpt_runtime.manifest import open_manifest
    from fvgpt_runtime.tuning import check_request

    # Fail here, with the bundle's own message: a worker that fails to start is only restarted by BentoML.
    manifest = open_manifest(args.bundle)
    check_request(manifest, args.runtime, args.precision)
    if not 2 <= args.max_batch_size <= manifest.max_batch:
        raise ValueError(f"--max-batch-size must be between 2 and the bundle's max batch {manifest.max_batch}")
    if args.max_latency_ms < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError("--max-latency-ms and --threads must be positive")
    env = os.environ | {
        config.BUNDLE_ENV: str(Path(args.bundle).resolve()), config.RUNTIME_ENV: args.runtime,
        config.PRECISION_ENV: args.precision or "", config.THREADS_ENV: str(args.threads or ""),
        config.MAX_BATCH_ENV: str(args.max_batch_size), config.MAX_LATENCY_ENV: str(args.max_latency_ms),
        "BENTOML_DO_NOT_TRACK": os.environ.get("BENTOML_DO_NOT_TRACK", "True"),
    }
    if args.smoke_test:
        return _smoke_test(env, args.ready_timeout)
    return _run_forwarding_signals(server_command(args.host, args.port), env, f"http://{args.host}:{args.port}")


def server_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--working-dir", str(REPO_ROOT)]


def _run_forwarding_signals(cmd: list[str], env: dict[str, str], url: str) -> int:
    # Same process group as us, so `kill -- -PGID` of `fvgpt serve` reaches the workers too; a terminal Ctrl-C then
    # reaches the server twice (directly and forwarded), which BentoML's arbiter handles as one clean shutdown.
    proc = subprocess.Popen(cmd, env=env)
    forwarded: list[int] = []

    def forward(signum: int, _frame) -> None:
        forwarded.append(signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"fvgpt serve: {url}  (POST /classify, GET /labels, GET /info, /readyz, /metrics, /docs.json); "
          f"server PID {proc.pid}", flush=True)
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarded and rc in (0, -forwarded[0]):
        return 0  # stopped on request
    return 128 - rc if rc < 0 else rc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the `bentoml serve` process (it stops its workers), then SIGKILL its process group if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s")


def _smoke_test(env: dict[str, str], timeout_s: float) -> int:
    import httpx

    from fvgpt.photos import photo_paths

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {env[config.API_KEY_ENV]}"} if env.get(config.API_KEY_ENV) else {}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(server_command("127.0.0.1", port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        print(f"smoke test: starting {url} (server PID {proc.pid})", flush=True)
        try:
            wait_ready(proc, url, timeout_s)
            photo = photo_paths()[1]
            with open(photo, "rb") as fh:
                resp = httpx.post(f"{url}/classify", files=[("images", (photo.name, fh, "image/jpeg"))],
                                  headers=headers, timeout=120)
            print(f"POST {url}/classify ({photo.name}) → {resp.status_code}")
            print(json.dumps(resp.json(), indent=2))
            ok = resp.status_code == 200 and len(resp.json().get("results", [])) == 1
        except (RuntimeError, httpx.HTTPError, ValueError) as exc:
            print(f"smoke test failed: {exc}", file=sys.stderr)
            ok = False
        finally:
            stop(proc)
        if not ok:
            log.seek(0)
            print("server log (last 40 lines):\n" + "".join(log.readlines()[-40:]), file=sys.stderr)
    print("smoke test passed" if ok else "smoke test FAILED", flush=True)
    return 0 if ok else 1
