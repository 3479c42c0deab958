"""The HTTP/1.1 protocol the server's uvicorn speaks: uvicorn's h11 protocol plus the limits it lacks, and JSON for the
errors it answers itself (installed by shell/internals.py).

uvicorn bounds only the idle time between requests (`timeout_keep_alive`): once the first byte of a request has
arrived, nothing bounds how long its headers or its body may take, so slowloris connections (half-sent headers, a
trickled body) each hold a descriptor for ever. Here a request's head must be complete within FVGPT_HEADER_TIMEOUT_S
of the connection opening or of the previous response, and its body within FVGPT_BODY_TIMEOUT_S of its head; past
either, the client gets a JSON 408 and the connection is closed. h11 limits a head to 16 KiB only while it is
incomplete (a 100 KB head that arrives at once passes); here a head over MAX_HEAD_BYTES is a JSON 400 however it
arrives. Malformed HTTP gets a JSON 400 instead of uvicorn's text/plain one.
"""
from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 << 10  # request line + headers + the blank line


def raw_json_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, written without h11 (which refuses to answer a
    request whose head never arrived)."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a head deadline, a body deadline and a head size limit per request."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm(self.header_timeout_s, self._head_timed_out, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self._disarm()
            self._give_up(400, f"the request head (request line and headers) is over {MAX_HEAD_BYTES} bytes")
            return
        cycle = self.cycle
        super().data_received(data)
        self._follow(cycle)

    def _head_too_large(self, data: bytes) -> bool:
        buffered = self.conn.trailing_data[0] + data
        end = buffered.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 1)
        return end + 4 > MAX_HEAD_BYTES if end >= 0 else len(buffered) > MAX_HEAD_BYTES

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()  # may start a pipelined request whose head was already buffered
        if self.transport.is_closing():
            self._disarm()
        elif self.cycle is cycle:
            self._arm(self.header_timeout_s, self._head_timed_out, cycle)
        else:
            self._follow(cycle)

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self._give_up(400, "invalid HTTP request received: a malformed request line or header")

    # ---- deadlines ----------------------------------------------------------------------------------------------
    def _follow(self, before: Any) -> None:
        """After events were handled: a new request's head arrived (→ body deadline, if it has a body), or the
        current request's body is complete (→ no deadline until its response is sent)."""
        cycle = self.cycle
        if cycle is None or self.transport.is_closing():
            return
        if cycle is not before:
            self._disarm()
            if cycle.more_body:
                self._arm(self.body_timeout_s, self._body_timed_out, cycle)
        elif not cycle.more_body and not cycle.response_complete:
            self._disarm()

    def _arm(self, seconds: float, callback: Any, cycle: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback, cycle)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self, cycle: Any) -> None:
        """No new request head since `cycle` (None: since the connection opened)."""
        self._deadline = None
        if self.cycle is not cycle or self.transport.is_closing():
            return
        partial, _ = self.conn.trailing_data
        if cycle is not None and not partial:  # an idle keep-alive connection: close it, as keep-alive would
            self.transport.close()
            return
        self._give_up(408, f"request head timeout: the request line and headers must arrive within "
                           f"{self.header_timeout_s:g} s (FVGPT_HEADER_TIMEOUT_S)")

    def _body_timed_out(self, cycle: Any) -> None:
        self._deadline = None
        if self.cycle is not cycle or not cycle.more_body or self.transport.is_closing():
            return
        if cycle.response_started:
            self.transport.close()
        else:
            self._give_up(408, f"request body timeout: the body must arrive within {self.body_timeout_s:g} s of "
                               f"the headers (FVGPT_BODY_TIMEOUT_S)")
        cycle.disconnected = True  # the app's receive() now returns http.disconnect, and its answer is dropped
        cycle.message_event.set()

    def _give_up(self, status: int, message: str) -> None:
        self.transport.write(raw_json_response(status, message))
        self.transport.close()
