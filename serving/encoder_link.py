"""The API process's link to the encoder process: every call into it goes through here, and here is what the API
process knows of the encoder's health.

When the encoder process dies (a crash, the OOM killer, kill -9), BentoML's arbiter starts a new one at its next
check, up to 10 s later (circus's check_delay, which BentoML 1.4.40 fixes at 10 s). Meanwhile its Unix socket still
accepts connections (the arbiter holds it) but nothing answers them, and the calls that were in flight fail with
aiohttp connection errors, which BentoML's client passes on as they are (a 500 each, before this module). So:

  * while a call runs, the encoder's process is watched (by pid and start time, through psutil): when it dies the
    call is abandoned at once; a transport error ends it too. Either way the request gets a 503 with Retry-After.
  * from then on the link is down: calls fail at once with the same 503, and readiness is false without touching
    the encoder (so /readyz answers 503 in milliseconds, not after a probe timeout). A background task asks the new
    encoder for its status until one answers, lets the service open its towers again (a new encoder has none), and
    marks the link up.

An encoder in another process tree (a remote deployment) cannot be watched; then only transport errors count.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import aiohttp
import psutil
from bentoml.exceptions import BentoMLException

from .errors import ApiError

logger = logging.getLogger("bentoml.fvgpt")

WATCH_S = 0.1  # how often a call in flight checks that the encoder process is alive
RECOVER_EVERY_S = 0.5
STATUS_TIMEOUT_S = 5.0
RETRY_AFTER = {"Retry-After": "2"}
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError)


def encoder_status(pid: int) -> dict[str, Any]:
    """What the encoder answers to `status` about its process, for `EncoderLink.watch`."""
    return {"pid": pid, "started": psutil.Process(pid).create_time()}


class EncoderLink:
    def __init__(self, proxy: Any, reopen: Callable[[], Awaitable[None]]):
        self.proxy = proxy  # the service's bentoml.depends(Encoder)
        self.reopen = reopen  # opens the towers in a new encoder
        self.process: psutil.Process | None = None
        self.down_since: float | None = None
        self._recovery: asyncio.Task | None = None

    # ---- health -------------------------------------------------------------------------------------------------
    def watch(self, status: dict[str, Any]) -> None:
        """Watch the process an encoder's `status` names, if it is ours to see (same pid and start time here)."""
        try:
            proc = psutil.Process(status["pid"])
            self.process = proc if abs(proc.create_time() - status["started"]) < 1e-3 else None
        except (psutil.Error, KeyError, TypeError):
            self.process = None

    def alive(self) -> bool:
        proc = self.process
        if proc is None:
            return True
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @property
    def up(self) -> bool:
        if self.down_since is None and not self.alive():
            self._lost("its process exited")
        return self.down_since is None

    def _lost(self, why: str) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning("fvgpt: the encoder is down (%s): answering 503 until it is back", why)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    def _unavailable(self) -> ApiError:
        return ApiError(503, "the model process is restarting; retry in a few seconds", RETRY_AFTER)

    async def _recover(self) -> None:
        while True:
            try:
                status = await asyncio.wait_for(self.proxy.to_async.status(), STATUS_TIMEOUT_S)
                self.watch(status)
                if self.alive():
                    await self.reopen()
                    logger.info("fvgpt: the encoder is back (pid %s) after %.1f s", status.get("pid"),
                                time.monotonic() - (self.down_since or time.monotonic()))
                    self.down_since = None
                    return
            except Exception as exc:  # noqa: BLE001 - not back yet: try again
                logger.debug("fvgpt: encoder not back yet: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(RECOVER_EVERY_S)

    # ---- calls --------------------------------------------------------------------------------------------------
    async def call(self, method: str, /, probe: bool = False, **kwargs: Any) -> Any:
        """The encoder's `method`; ApiError 503 (Retry-After) when it is down, dies meanwhile, or is overloaded.
        probe=True calls it even when the link is down (recovery, startup), and raises what the call raises."""
        if not probe and not self.up:
            raise self._unavailable()
        task = asyncio.ensure_future(getattr(self.proxy.to_async, method)(**kwargs))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCH_S)
                if done:
                    return task.result()
                if not self.alive():
                    self._lost("its process exited during a call")
                    raise self._unavailable()
        except BentoMLException as exc:
            if exc.error_code == HTTPStatus.SERVICE_UNAVAILABLE:
                raise ApiError(503, "the model is overloaded (queue wait over FVGPT_MAX_LATENCY_MS); retry later",
                               {"Retry-After": "1"}) from None
            raise
        except TRANSPORT_ERRORS as exc:
            if probe:
                raise
            self._lost(f"{type(exc).__name__}: {exc}")
            raise self._unavailable() from None
        finally:
            if not task.done():
                task.cancel()
