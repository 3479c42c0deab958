"""Everything the server needs from BentoML's (and its uvicorn's and circus') internals, behind one function,
`install`, which first checks that the installed BentoML is the version these hooks were written and tested
against, and refuses to start on another one with a one-line message (tests/test_serving_shell.py checks the shape
of each internal used, so an upgrade fails a test, not a server).

What BentoML 1.4.40 gives no public handle on:
  * in the worker (uvicorn runs the service): the uvicorn.Server, found as the bound method uvicorn installs as its
    SIGTERM handler before the application starts. On it: the HTTP protocol class (shell/protocol.py: header and
    body timeouts, the head size limit, JSON protocol errors), the graceful-shutdown timeout (FVGPT_DRAIN_TIMEOUT_S,
    unless `bentoml serve --timeout-graceful-shutdown` set one), and a hook on SIGTERM/SIGINT that marks the engine
    draining (readiness 503) and shuts the listening socket down, so the kernel refuses new connections at once in
    every process holding it (the arbiter keeps a copy open) instead of queueing them until they are reset.
  * in the arbiter (`bentoml serve`): circus kills a worker 30 s after SIGTERM (its watchers' graceful_timeout);
    the stop gives it the drain timeout plus KILL_GRACE_S instead, so a drain is never cut short.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("fvgpt.shell")

TESTED_BENTOML = "1.4.40"
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
KILL_GRACE_S = 10.0  # beyond the drain timeout: lifespan shutdown, before the arbiter SIGKILLs the worker


class UntestedBentoML(SystemExit):
    pass


def check_version() -> None:
    import bentoml

    if bentoml.__version__ != TESTED_BENTOML:
        print(f"error: fvgpt serve hooks into BentoML {TESTED_BENTOML}'s internals and BentoML "
              f"{bentoml.__version__} is installed: pip install 'bentoml=={TESTED_BENTOML}' (the `serve` extra)",
              file=sys.stderr, flush=True)
        raise UntestedBentoML(2)


def install(role: str, drain_s: float, header_timeout_s: float = 10.0, body_timeout_s: float = 30.0,
            on_drain: Callable[[], None] | None = None) -> bool:
    """role "arbiter": the drain-aware stop; role "worker": protocol, drain timeout and the SIGTERM hook (False when
    no uvicorn server runs this process's main thread)."""
    check_version()
    if role == "arbiter":
        patch_arbiter_stop(drain_s)
        return True
    server = uvicorn_server()
    if server is None:
        logger.warning("fvgpt: no uvicorn server found: header/body timeouts and the graceful drain are off")
        return False
    from .protocol import GuardedH11Protocol

    server.config.http_protocol_class = type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})
    if server.config.timeout_graceful_shutdown is None:  # `bentoml serve --timeout-graceful-shutdown` wins
        server.config.timeout_graceful_shutdown = drain_s
    loop = asyncio.get_running_loop()

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(start_drain, server, signum, on_drain)
        server.handle_exit(signum, frame)

    for sig in EXIT_SIGNALS:
        signal.signal(sig, handler)
    return True


def uvicorn_server() -> Any:
    """The uvicorn.Server running this worker: uvicorn installs its bound `handle_exit` as the SIGTERM handler
    before the application starts (BentoML's worker gives us no other handle on it)."""
    import uvicorn

    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return server if isinstance(server, uvicorn.Server) else None


def start_drain(server: Any, signum: int, on_drain: Callable[[], None] | None) -> None:
    if getattr(server, "_fvgpt_draining", False):
        return
    server._fvgpt_draining = True
    if on_drain is not None:
        on_drain()
    logger.info("fvgpt: %s: refusing new connections, draining %d request(s) in flight (at most %s s)",
                signal.Signals(signum).name, len(server.server_state.tasks), server.config.timeout_graceful_shutdown)
    for srv in getattr(server, "servers", []):
        listeners = [socket.socket(fileno=os.dup(s.fileno())) for s in srv.sockets]
        srv.close()  # this loop stops accepting first, so the shutdown below cannot surface as an accept error
        for sock in listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the shared socket stops listening: refused, not queued
            except OSError:
                pass
            sock.close()


def patch_arbiter_stop(drain_s: float) -> None:
    """The arbiter's stop gives each watcher's workers the drain timeout plus KILL_GRACE_S to exit."""
    from tornado import gen

    from bentoml._internal.utils.circus import Arbiter

    if getattr(Arbiter.stop, "fvgpt_drain", False):
        return
    bentoml_stop = Arbiter.stop

    @gen.coroutine
    def stop(self: Any) -> Any:
        for watcher in self.watchers:
            watcher.graceful_timeout = max(watcher.graceful_timeout, drain_s + KILL_GRACE_S)
        yield bentoml_stop(self)

    stop.fvgpt_drain = True  # type: ignore[attr-defined]
    Arbiter.stop = stop
