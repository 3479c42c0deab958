"""The HTTP routes we own, as a Starlette app mounted into the BentoML service.

Why not @bentoml.api: BentoML's multipart handling of file-typed parameters downloads a URL sent in a file field
(server-side request forgery), and its 4xx bodies are not {"error": ...}. Here we read the raw body ourselves.
BentoML's /livez, /readyz, /healthz, /metrics and /docs.json are untouched and never need the API key.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fvgpt_runtime.bundle import Scores

from .errors import ApiError, error_response
from .request import parse_classify

if TYPE_CHECKING:
    from .service import FVGPT

logger = logging.getLogger("bentoml.fvgpt")

Handler = Callable[[Request, "FVGPT"], Awaitable[Response]]


def authorize(request: Request, api_key: str | None) -> None:
    """With FVGPT_API_KEY set, require it as `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    if api_key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                       {"WWW-Authenticate": "Bearer"})


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """API key check and error mapping shared by every route: ApiError → its status, anything else → logged 500."""

    async def run(request: Request) -> Response:
        svc: FVGPT = bentoml.get_current_service()
        try:
            authorize(request, svc.config.api_key)
            return await handler(request, svc)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except Exception:  # the client gets a JSON 500, the log gets the traceback
            logger.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "internal server error; the server log has the details")

    return run


def ranked(scores: Scores, top_k: int, model_id: str) -> list[dict]:
    results = []
    for row in scores.probabilities:
        order = np.argsort(-row, kind="stable")[:top_k]
        results.append({"model_id": model_id, "head": scores.head,
                        "predictions": [{"label": scores.labels[j], "probability": float(row[j])} for j in order]})
    return results


@endpoint
async def classify(request: Request, svc: FVGPT) -> Response:
    req = await parse_classify(request, svc.limits, svc.bundle.classes)
    pixels = await svc.pixels(req.images, req.names)
    scores = await svc.classify(pixels, req.labels)
    return JSONResponse({"results": ranked(scores, req.top_k, svc.bundle.model_id)})


@endpoint
async def labels(request: Request, svc: FVGPT) -> Response:
    return JSONResponse({"model_id": svc.bundle.model_id, "kind": svc.bundle.kind,
                         "classes": svc.bundle.classes.records()})


@endpoint
async def info(request: Request, svc: FVGPT) -> Response:
    return JSONResponse({"model_id": svc.bundle.model_id, "kind": svc.bundle.kind,
                         "image_size": svc.bundle.preprocess.size, "tower": await svc.runtime_info(),
                         "text_graph": {"provider": "CPUExecutionProvider", "threads": 1},
                         "batching": svc.batching,
                         "limits": svc.limits.as_dict(), "api_key_required": svc.config.api_key is not None})


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", exc.headers)


http_app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/labels", labels, methods=["GET"]),
                             Route("/info", info, methods=["GET"])],
                     exception_handlers={HTTPException: http_error})
