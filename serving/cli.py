"""`fvgpt serve BUNDLE` / `fvgpt serve --repository DIR`: check the settings (and the bundle: everything the server
would load, its tower included), then run `bentoml serve fvgpt_serving.service:FVGPT` with the bundle (or repository)
and options passed as environment variables (serving/config.py), forward SIGINT/SIGTERM to it (the server drains,
serving/lifecycle.py), and exit with its status: 0 when stopped by a signal. A bad bundle or setting exits 2 with a
one-line error before any server starts. `--smoke-test` starts it on a free loopback port, classifies one bundled
photo over HTTP with the first ready classifier, prints the JSON and stops it.
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
    p = sub.add_parser("serve", help="serve a bundle, or a repository of them, over HTTP with BentoML (POST "
                                     "/classify, GET /models, /labels, /info)",
                       description="Starts `bentoml serve` on one bundle or on a model repository (DIR/NAME/VERSION/, "
                                   "one folder per classifier; bundles added, replaced or removed there are picked "
                                   "up while it runs). Classifiers on one backbone share one image tower behind "
                                   "adaptive batching (ONNX Runtime, CUDA where available, or the bundle's "
                                   "TensorRT engine); base/new/zero-shot routing and new labels per classifier. "
                                   "Limits, timeouts and the API key come from FVGPT_* environment variables "
                                   "(serving/README.md). On SIGTERM or Ctrl-C it stops accepting connections, "
                                   "finishes the requests in flight (at most --drain-timeout seconds), stops and "
                                   "exits 0. A bundle or setting that cannot be served exits 2 at once with a "
                                   "one-line error.")
    p.add_argument("bundle", nargs="?", help="bundle dir written by fvgpt export (served as a repository of one)")
    p.add_argument("--repository", metavar="DIR",
                   help="serve every bundle under DIR: DIR/NAME/VERSION/ (or DIR/NAME/ for one version); the "
                        "highest ready version of NAME is served unless a request names NAME@VERSION")
    p.add_argument("--poll-interval", type=float, default=config.DEFAULT_POLL_S, metavar="S",
                   help=f"seconds between scans for added, replaced or removed bundles (default "
                        f"{config.DEFAULT_POLL_S:g}; 0: only on POST /admin/reload)")
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
    p.add_argument("--drain-timeout", type=float, default=config.DEFAULT_DRAIN_S, metavar="S",
                   help=f"on SIGTERM/SIGINT: seconds the requests in flight may take to finish before they are "
                        f"cancelled; new connections are refused at once (default {config.DEFAULT_DRAIN_S:g})")
    p.add_argument("--smoke-test", action="store_true",
                   help="start on a free loopback port, classify one bundled photo, print the JSON, stop")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="--smoke-test: seconds to wait for /readyz (default 300)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    if (args.bundle is None) == (args.repository is None):
        raise ValueError("give either a BUNDLE or --repository DIR (see fvgpt serve --help)")
    if args.repository is not None and not Path(args.repository).is_dir():
        raise ValueError(f"--repository {args.repository}: not a folder (create it; bundles go in DIR/NAME/VERSION/)")
    if not 2 <= args.max_batch_size <= 4096:
        raise ValueError("--max-batch-size must be between 2 and 4096")
    if args.max_latency_ms < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError("--max-latency-ms and --threads must be positive")
    if not 0 <= args.poll_interval <= 86_400:
        raise ValueError("--poll-interval must be between 0 and 86400 seconds")
    source = {config.BUNDLE_ENV: str(Path(args.bundle).resolve())} if args.bundle is not None else \
        {config.REPOSITORY_ENV: str(Path(args.repository).resolve())}
    env = {k: v for k, v in os.environ.items() if k not in (config.BUNDLE_ENV, config.REPOSITORY_ENV)} | source | {
        config.RUNTIME_ENV: args.runtime,
        config.PRECISION_ENV: args.precision or "", config.THREADS_ENV: str(args.threads or ""),
        config.MAX_BATCH_ENV: str(args.max_batch_size), config.MAX_LATENCY_ENV: str(args.max_latency_ms),
        config.POLL_ENV: str(args.poll_interval), config.DRAIN_ENV: str(args.drain_timeout),
        "BENTOML_DO_NOT_TRACK": os.environ.get("BENTOML_DO_NOT_TRACK", "True"),
    }
    cfg, _ = config.check_config(env)  # the FVGPT_* settings inherited from the environment too
    if args.bundle is not None:
        check_bundle(cfg, config.max_batch_size(env))
    if args.smoke_test:
        return _smoke_test(env, args.ready_timeout)
    return _run_forwarding_signals(server_command(args.host, args.port), env, f"http://{args.host}:{args.port}")


def check_bundle(cfg: config.ServeConfig, max_batch: int) -> None:
    """Everything the server would do with the one bundle, here and now: verify and load it as the repository does
    (manifest, hashes, tables, heads, text graph, a heads run) and open its tower as the encoder does (a run on a
    blank image). A BundleError with a one-line reason if any of it fails: better than a server whose only
    classifier is refused."""
    from fvgpt_runtime.manifest import BundleError

    from .repository import load, scan
    from .towers import load_tower

    classifier = load(scan(cfg.source, single=True)[0], cfg.runtime, cfg.precision, max_batch)
    try:
        if not classifier.ready:
            raise BundleError(classifier.reason)
        load_tower(cfg.source, classifier.runtime, classifier.precision, classifier.device, cfg.threads)
    except BundleError as exc:
        raise BundleError(f"{cfg.source} cannot be served: {' '.join(str(exc).split())}") from None
    except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime or TensorRT make of the tower: one line
        raise BundleError(f"{cfg.source} cannot be served: its tower does not load ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())})") from None


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
    print(f"fvgpt serve: {url}  (POST /classify, GET /models, /labels, /info, /readyz, /metrics, /docs.json); "
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


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the server (it drains and stops its workers), then SIGKILL every process of its tree if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a server process and all its descendants, by process id: BentoML's workers run in sessions of their
    own, so signalling the server's process group would leave them running."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
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
            ready = [m for m in httpx.get(f"{url}/models", headers=headers, timeout=30).json()["models"]
                     if m["state"] == "ready" and m["default"]]
            photo = photo_paths()[1]
            with open(photo, "rb") as fh:
                resp = httpx.post(f"{url}/classify", files=[("images", (photo.name, fh, "image/jpeg"))],
                                  data={"model": ready[0]["name"]}, headers=headers, timeout=120)
            print(f"POST {url}/classify ({photo.name}) → {resp.status_code}")
            print(json.dumps(resp.json(), indent=2))
            ok = resp.status_code == 200 and len(resp.json().get("results", [])) == 1
        except (RuntimeError, httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            print(f"smoke test failed: {exc}", file=sys.stderr)
            ok = False
        finally:
            stop(proc)
        if not ok:
            log.seek(0)
            print("server log (last 40 lines):\n" + "".join(log.readlines()[-40:]), file=sys.stderr)
    print("smoke test passed" if ok else "smoke test FAILED", flush=True)
    return 0 if ok else 1
