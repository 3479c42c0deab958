"""The ASGI middleware around the whole BentoML service: every error answer is {"error": "<message>"}, and a path
with a trailing slash is redirected without echoing the Host header.

* An error answer that is not {"error": "<message>"} (Starlette's and BentoML's text/plain 404 for an unknown path,
  405 for a wrong method, /readyz's 503; BentoML's own 4xx bodies, a JSON list) becomes {"error": "<METHOD> <path>:
  <its text>"} with the same status and the headers a client needs; an exception that escapes a route becomes a
  logged JSON 500 instead of uvicorn's plain "Internal Server Error".
  Protocol errors, answered before any route runs, are shell/protocol.py's.
* `POST /classify/`: Starlette would redirect to an absolute URL built from the request's Host header
  (`Host: evil.example` → `http://evil.example/classify`). Here the answer is a 307 whose Location is the path alone
  (`/classify`): clients resolve it against the URL they used.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from starlette.responses import JSONResponse

logger = logging.getLogger("fvgpt.shell")

KEPT_HEADERS = (b"allow", b"retry-after", b"www-authenticate")  # what a client needs from a rewritten error


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class JSONErrors:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            query = scope.get("query_string", b"").decode("latin-1")
            location = path.rstrip("/") + (f"?{query}" if query else "")
            response = error_response(307, f"{scope['method']} {path}: the route is {path.rstrip('/')}",
                                      {"location": location})
            return await response(scope, receive, send)
        held: dict | None = None  # the start of a plain-text error answer, until its body is complete
        body: list[bytes] = []
        started = False

        async def rewrite(message: dict) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None:
                started = True
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            started = True
            text = _message(b"".join(body))
            if text is None:  # already {"error": "..."}: as it was
                await send(held)
                return await send({"type": "http.response.body", "body": b"".join(body)})
            headers = {k.decode(): v.decode() for k, v in held.get("headers", []) if k.lower() in KEPT_HEADERS}
            await error_response(held["status"], f"{scope['method']} {path}: {text}", headers)(scope, receive, send)

        try:
            await self.app(scope, receive, rewrite)
        except Exception:
            if started:
                raise
            logger.exception("%s %s failed", scope["method"], path)
            await error_response(500, "internal server error; the server log has the details")(scope, receive, send)


def _message(body: bytes) -> str | None:
    """The message of an error answer's body; None when it is {"error": "<message>"} already."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return None
    if isinstance(doc, list) and doc and isinstance(doc[0], dict) and isinstance(doc[0].get("error"), str):
        return doc[0]["error"]  # BentoML 1.4.40 answers its 4xx exceptions as [{"error": "..."}]
    return json.dumps(doc)
