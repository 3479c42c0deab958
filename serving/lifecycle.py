"""How a server stops, and the HTTP protocol of its API worker: the hooks into BentoML's arbiter and uvicorn.

How BentoML 1.4.40 stops a server (read from _bentoml_impl/server/serving.py, bentoml/_internal/utils/circus and
circus's Arbiter/Watcher): SIGTERM (or SIGINT) reaches the arbiter, the `bentoml serve` process. Its `stop` first
runs its exit stack, which deletes the folder holding the Unix sockets the services talk over, then stops every
watcher at once (circus sends SIGTERM to the API worker and the encoder together). uvicorn in the API worker then
waits for its requests in flight, but those still needing the tower find the encoder's socket path gone and the
encoder stopping: "Cannot connect to unix socket ... No such file or directory", a 500 each. uvicorn stops accepting
by closing its own copy of the listening socket; the arbiter's copy keeps the port open, so connections made after
the signal wait in the backlog until they are reset. And nothing bounds the drain (`--timeout-graceful-shutdown` is
unset by default).

What this module changes:
  * arbiter (`drain_api_first`, installed by the FVGPT service's deployment hook, which BentoML runs in the arbiter
    before any worker starts): stop the API watcher first and wait for its workers to exit (SIGKILL after the drain
    timeout plus a grace), then run BentoML's own stop (socket folder, encoder).
  * API worker (`serve_api`, from FVGPT's startup hook): on SIGTERM/SIGINT the listening socket is shut down, so the
    kernel refuses new connections at once in every process holding it; `draining` makes /readyz answer 503; uvicorn
    drains with timeout_graceful_shutdown = FVGPT_DRAIN_TIMEOUT_S, then cancels what is left. uvicorn also gets
    serving/protocol.py's protocol (header and body timeouts, JSON protocol errors).
  * encoder (`outlive_api`): a signal sent to the whole process group (Ctrl-C in a terminal) reaches the encoder with
    the API worker; it keeps serving until no API worker of its server is left, bounded by the drain timeout.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("bentoml.fvgpt")

API_WATCHER = "service"  # the name BentoML's serve_http gives the entry service's watcher
WORKER_MODULE = "_bentoml_impl.worker.service"
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
KILL_GRACE_S = 10.0  # beyond the drain timeout: lifespan shutdown, before the arbiter SIGKILLs a worker


def uvicorn_server() -> Any:
    """The uvicorn.Server running this worker: uvicorn installs its bound `handle_exit` as the SIGTERM handler
    before the application starts (BentoML's worker gives us no other handle on it)."""
    import uvicorn

    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return server if isinstance(server, uvicorn.Server) else None


def on_exit_signal(server: Any, first: Callable[[int], None]) -> None:
    """Call `first(signum)` on the event loop when SIGTERM/SIGINT arrives, then let uvicorn handle the signal."""
    loop = asyncio.get_running_loop()

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(first, signum)
        server.handle_exit(signum, frame)

    for sig in EXIT_SIGNALS:
        signal.signal(sig, handler)


class Drain:
    """The API worker's side of a graceful stop."""

    def __init__(self) -> None:
        self.draining = False

    def serve_api(self, drain_s: float, header_timeout_s: float, body_timeout_s: float) -> bool:
        """Hook into the running uvicorn server (False when there is none: not started by uvicorn's main thread)."""
        from .protocol import GuardedH11Protocol

        server = uvicorn_server()
        if server is None:
            logger.warning("fvgpt: no uvicorn server found: header/body timeouts and the graceful drain are off")
            return False
        server.config.http_protocol_class = type("GuardedH11Protocol", (GuardedH11Protocol,), {
            "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})
        if server.config.timeout_graceful_shutdown is None:  # `bentoml serve --timeout-graceful-shutdown` wins
            server.config.timeout_graceful_shutdown = drain_s
        on_exit_signal(server, lambda signum: self._start(server, signum))
        return True

    def _start(self, server: Any, signum: int) -> None:
        if self.draining:
            return
        self.draining = True
        in_flight = len(server.server_state.tasks)
        logger.info("fvgpt: %s: refusing new connections, draining %d request(s) in flight (at most %s s)",
                    signal.Signals(signum).name, in_flight, server.config.timeout_graceful_shutdown)
        for srv in getattr(server, "servers", []):
            listeners = [socket.socket(fileno=os.dup(s.fileno())) for s in srv.sockets]
            srv.close()  # this loop stops accepting first, so the shutdown below cannot surface as an accept error
            for sock in listeners:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the shared socket stops listening: refused, not queued
                except OSError:
                    pass
                sock.close()


def api_workers_alive(api_service: str) -> bool:
    """Whether a sibling worker process (same arbiter) serves `api_service`."""
    import psutil

    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.Error:
        return False
    for proc in siblings:
        try:
            cmd = proc.cmdline()
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and WORKER_MODULE in cmd and \
                    ("--service-name", api_service) in itertools.pairwise(cmd):
                return True
        except psutil.Error:
            continue
    return False


def outlive_api(api_service: str, drain_s: float) -> None:
    """Encoder: on SIGTERM/SIGINT keep serving while an API worker is alive (at most the drain timeout plus a
    grace), then let uvicorn stop."""
    server = uvicorn_server()
    if server is None:
        return
    loop = asyncio.get_running_loop()

    def wait_then_exit(signum: int) -> None:
        deadline = time.monotonic() + drain_s + KILL_GRACE_S
        while time.monotonic() < deadline and api_workers_alive(api_service):
            time.sleep(0.1)
        loop.call_soon_threadsafe(server.handle_exit, signum, None)

    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=wait_then_exit, args=(signum,), name="fvgpt-outlive-api", daemon=True).start()

    for sig in EXIT_SIGNALS:
        signal.signal(sig, handler)


def drain_api_first(drain_s: float) -> None:
    """Arbiter: make BentoML's Arbiter.stop stop the API watcher first (its workers drain), then the rest."""
    from bentoml._internal.utils.circus import Arbiter
    from tornado import gen

    if getattr(Arbiter.stop, "fvgpt_drain_first", False):
        return
    bentoml_stop = Arbiter.stop

    @gen.coroutine
    def stop(self: Any) -> Any:
        if getattr(self, "_fvgpt_stopping", False):  # a second signal while draining
            return
        self._fvgpt_stopping = True
        self._stopping = True  # circus: no respawn, and no "a watcher has no process: quit" while the API drains
        first = [w for w in self.watchers if w.name == API_WATCHER]
        if first and len(first) < len(self.watchers):
            for watcher in first:
                watcher.graceful_timeout = drain_s + KILL_GRACE_S
            yield [watcher._stop() for watcher in first]
        yield bentoml_stop(self)

    stop.fvgpt_drain_first = True  # type: ignore[attr-defined]
    Arbiter.stop = stop
