"""`fvgpt serve BUNDLE` / `fvgpt serve --repository DIR`: check the port, the BentoML version and the settings (and
the bundle: everything the server would load, its tower included), then run `bentoml serve
fvgpt_serving.shell.service:FVGPT` with the bundle (or repository) and options passed as environment variables
(serving/engine/settings.py) and a BENTOML_HOME of its own (so its /metrics are its own), forward SIGINT/SIGTERM to
it (the server drains) and exit with its status: 0 when stopped by a signal. A busy port, a bad bundle or setting
exits 2 with a one-line error before any server starts. `--smoke-test` starts it on a free loopback port, classifies
one bundled photo over HTTP with the first ready classifier, prints the JSON and stops it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .engine.settings import API_KEY_ENV, BUNDLE_ENV, REPOSITORY_ENV, RUNTIMES, Settings
from .process import free_port, port_in_use, stop, wait_ready

SERVICE = "fvgpt_serving.shell.service:FVGPT"
REPO_ROOT = Path(__file__).resolve().parent.parent  # bentoml serve imports the installed fvgpt_serving from here
D = Settings(Path())  # the defaults


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a bundle, or a repository of them, over HTTP with BentoML (POST "
                                     "/classify, GET /models, /labels, /info)",
                       description="Starts `bentoml serve` on one bundle or on a model repository (DIR/NAME/VERSION/, "
                                   "one folder per classifier; bundles added, replaced or removed there are picked "
                                   "up while it runs). Classifiers on one backbone share one image tower, run in a "
                                   "worker process behind the server's batcher (ONNX Runtime, OpenVINO, CUDA "
                                   "where available, or the bundle's TensorRT engine); base/new/zero-shot routing "
                                   "and new labels per classifier. "
                                   "Limits, timeouts and the API key come from FVGPT_* environment variables "
                                   "(serving/README.md). On SIGTERM or Ctrl-C it stops accepting connections, "
                                   "finishes the requests in flight (at most --drain-timeout seconds), stops and "
                                   "exits 0. A busy port, or a bundle or setting that cannot be served, exits 2 at "
                                   "once with a one-line error.")
    p.add_argument("bundle", nargs="?", help="bundle dir written by fvgpt export (served as a repository of one)")
    p.add_argument("--repository", metavar="DIR",
                   help="serve every bundle under DIR: DIR/NAME/VERSION/ (or DIR/NAME/ for one version); the "
                        "highest ready version of NAME is served unless a request names NAME@VERSION")
    p.add_argument("--poll-interval", type=float, default=D.poll_s, metavar="S",
                   help=f"seconds between scans for added, replaced or removed bundles (default "
                        f"{D.poll_s:g}; 0: only on POST /admin/reload)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="tower runtime (default auto: the choice of the bundle's tuning profile (`fvgpt tune`) when "
                        "it was measured on a host like this one; else the bundle's TensorRT engine if usable here, "
                        "else ONNX Runtime at the bundle's default precision)")
    p.add_argument("--precision", help="tower precision (default: the tuning profile's choice, else the bundle's "
                                       "default); with a profile, --runtime/--precision pick its fastest candidate "
                                       "that fits")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for the tower (default: one per core)")
    p.add_argument("--max-batch-size", type=int, default=D.max_batch_size,
                   help=f"largest batch the batcher forms, in images across requests (default "
                        f"{D.max_batch_size})")
    p.add_argument("--max-latency-ms", type=int, default=D.max_latency_ms,
                   help=f"queue wait + inference budget; requests that cannot meet it get 503 (default "
                        f"{D.max_latency_ms})")
    p.add_argument("--drain-timeout", type=float, default=D.drain_s, metavar="S",
                   help=f"on SIGTERM/SIGINT: seconds the requests in flight may take to finish before they are "
                        f"cancelled; new connections are refused at once (default {D.drain_s:g})")
    p.add_argument("--smoke-test", action="store_true",
                   help="start on a free loopback port, classify one image (--smoke-image), print the JSON, stop")
    p.add_argument("--smoke-image", metavar="FILE",
                   help="--smoke-test: the image to classify (default: a photo shipped with the package; a "
                        "classifier of other things answers it with its nearest class)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="--smoke-test: seconds to wait for /readyz (default 300)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    if (args.bundle is None) == (args.repository is None):
        raise ValueError("give either a BUNDLE or --repository DIR (see fvgpt serve --help)")
    if args.repository is not None and not Path(args.repository).is_dir():
        raise ValueError(f"--repository {args.repository}: not a folder (create it; bundles go in DIR/NAME/VERSION/)")
    if not 1 <= args.max_batch_size <= 4096:
        raise ValueError("--max-batch-size must be between 1 and 4096")
    if args.max_latency_ms < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError("--max-latency-ms and --threads must be positive")
    if not 0 <= args.poll_interval <= 86_400:
        raise ValueError("--poll-interval must be between 0 and 86400 seconds")
    if args.smoke_image is not None and not Path(args.smoke_image).is_file():
        raise ValueError(f"--smoke-image {args.smoke_image}: no such file")
    if not args.smoke_test and port_in_use(args.host, args.port):
        raise ValueError(f"port {args.port} on {args.host} is in use (another server?): stop it or choose another "
                         f"with --port")
    from .shell.internals import check_version

    check_version()
    source = {BUNDLE_ENV: str(Path(args.bundle).resolve())} if args.bundle is not None else \
        {REPOSITORY_ENV: str(Path(args.repository).resolve())}
    v = Settings.ENV
    env = {k: v for k, v in os.environ.items() if k not in (BUNDLE_ENV, REPOSITORY_ENV)} | source | {
        v["runtime"]: args.runtime, v["precision"]: args.precision or "", v["threads"]: str(args.threads or ""),
        v["max_batch_size"]: str(args.max_batch_size), v["max_latency_ms"]: str(args.max_latency_ms),
        v["poll_s"]: str(args.poll_interval), v["drain_s"]: str(args.drain_timeout),
        "BENTOML_DO_NOT_TRACK": os.environ.get("BENTOML_DO_NOT_TRACK", "True"),
    }
    settings = Settings.from_env(env)  # the FVGPT_* settings inherited from the environment too
    if args.bundle is not None:
        check_bundle(settings)
    with tempfile.TemporaryDirectory(prefix="fvgpt-serve-") as home:
        env["BENTOML_HOME"] = home  # BentoML keeps its metrics under its home, and clears them at start
        if args.smoke_test:
            return _smoke_test(env, args.ready_timeout, args.smoke_image)
        return _run_forwarding_signals(server_command(args.host, args.port), env, f"http://{args.host}:{args.port}")


def check_bundle(settings: Settings) -> None:
    """Everything the server would do with the one bundle, here and now: verify and load it as the repository does
    (manifest, hashes, tables, heads, text graph, a heads run) and open its tower as the tower worker does (a run on a
    blank image). A BundleError with a one-line reason if any of it fails: better than a server whose only
    classifier is refused."""
    from fvgpt_runtime.manifest import BundleError
    from fvgpt_runtime.repository import scan

    from .engine.repository import load
    from .engine.tower_worker import open_tower

    classifier = load(scan(settings.source, single=True)[0], settings.runtime, settings.precision,
                      settings.max_batch_size)
    try:
        if not classifier.ready:
            raise BundleError(classifier.reason)
        opened = {}
        for tower in classifier.towers:  # each after the tower it reads
            opened[tower.tower_id] = open_tower(tower, settings.threads, opened.get(tower.source))
    except BundleError as exc:
        raise BundleError(f"{settings.source} cannot be served: {' '.join(str(exc).split())}") from None
    except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime or TensorRT make of the tower: one line
        raise BundleError(f"{settings.source} cannot be served: its tower does not load ({type(exc).__name__}: "
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


def _smoke_test(env: dict[str, str], timeout_s: float, image: str | None = None) -> int:
    import httpx

    from fvgpt.photos import photo_paths

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {env[API_KEY_ENV]}"} if env.get(API_KEY_ENV) else {}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(server_command("127.0.0.1", port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        print(f"smoke test: starting {url} (server PID {proc.pid})", flush=True)
        try:
            wait_ready(proc, url, timeout_s)
            ready = [m for m in httpx.get(f"{url}/models", headers=headers, timeout=30).json()["models"]
                     if m["state"] == "ready" and m["default"]]
            photo = Path(image) if image else photo_paths()[1]
            with open(photo, "rb") as fh:
                resp = httpx.post(f"{url}/classify", files=[("images", (photo.name, fh, "application/octet-stream"))],
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
