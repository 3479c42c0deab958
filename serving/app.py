"""The HTTP routes we own, as a Starlette app mounted into the BentoML service.

Why not @bentoml.api: BentoML's multipart handling of file-typed parameters downloads a URL sent in a file field
(server-side request forgery), and its 4xx bodies are not {"error": ...}. Here we read the raw body ourselves, and
contribute the routes' schemas to BentoML's OpenAPI document instead (serving/openapi.py, GET /docs.json).
BentoML's /livez, /readyz, /healthz and /metrics are untouched; they and /docs.json never need the API key.
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

from .admission import Reservation
from .errors import ApiError, error_response
from .openapi import openapi_document
from .repository import Classifier
from .request import ClassifyRequest, parse_classify, resolve_model

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


def ranked(c: Classifier, scores: Scores, top_k: int) -> list[dict]:
    """One result per image for one classifier."""
    results = []
    for row in scores.probabilities:
        order = np.argsort(-row, kind="stable")[:top_k]
        results.append({"model": c.name, "version": c.version, "model_id": c.bundle.model_id, "head": scores.head,
                        "predictions": [{"label": scores.labels[j], "probability": float(row[j])} for j in order]})
    return results


@endpoint
async def classify(request: Request, svc: FVGPT) -> Response:
    req, reservation = await parse_classify(request, svc.limits, svc.budget)
    with reservation:  # the request's bytes count against FVGPT_MAX_INFLIGHT_BYTES until it is answered
        return await classify_parsed(req, svc, reservation)


async def classify_parsed(req: ClassifyRequest, svc: FVGPT, reservation: Reservation) -> Response:
    chosen = svc.repo.snapshot.resolve(req.model, req.models, svc.limits.max_models)
    plans, top_ks = [], []
    for c in chosen:
        try:
            labels, top_k = req.for_classifier(c.bundle.classes, svc.limits)
        except ApiError as exc:
            if req.models is not None:  # name the classifier whose classes the labels or top_k do not fit
                exc.message = f"{c.ref}: {exc.message}"
            raise
        plans.append((c, labels))
        top_ks.append(top_k)
    scores = await svc.classify(req.images, req.names, plans, reservation)
    per_classifier = [ranked(c, s, k) for (c, _), s, k in zip(plans, scores, top_ks)]
    if req.models is None:  # one classifier: one result per image, as a single-bundle server always answered
        return JSONResponse({"results": per_classifier[0]})
    return JSONResponse({"results": [{"models": list(per_image)} for per_image in zip(*per_classifier)]})


def selected(request: Request, svc: FVGPT) -> Classifier:
    """The classifier a GET route's ?model= names, or the only one."""
    model = request.query_params.get("model")
    return svc.repo.snapshot.resolve(None if model is None else resolve_model(model), None, 1)[0]


@endpoint
async def labels(request: Request, svc: FVGPT) -> Response:
    c = selected(request, svc)
    return JSONResponse({"model": c.name, "version": c.version, "model_id": c.bundle.model_id, "kind": c.bundle.kind,
                         "classes": c.bundle.classes.records()})


@endpoint
async def models(request: Request, svc: FVGPT) -> Response:
    snap = svc.repo.snapshot
    return JSONResponse({"models": snap.records(), "loaded": snap.scanned})


@endpoint
async def info(request: Request, svc: FVGPT) -> Response:
    """Server-wide facts; with ?model= (or when the server has one classifier) also that classifier's, under the
    keys a single-bundle server always had (model_id, kind, image_size, tower, text_graph)."""
    snap, towers = svc.repo.snapshot, await svc.runtime_info()
    doc = {"source": {"path": str(svc.config.source), "single_bundle": svc.config.single,
                      "poll_s": svc.config.poll_s},
           "classifiers": {"versions": len(snap.classifiers), "ready": len(snap.ready)},
           "towers": list(towers.values()), "batching": svc.batching, "limits": svc.limits.as_dict(),
           "inflight_bytes": svc.budget.held,
           "timeouts": {"header_s": svc.config.header_timeout_s, "body_s": svc.config.body_timeout_s,
                        "drain_s": svc.config.drain_s},
           "api_key_required": svc.config.api_key is not None}
    if "model" in request.query_params or len(snap.names) == 1:
        c = selected(request, svc)
        doc = {"model": c.name, "version": c.version, "model_id": c.bundle.model_id, "kind": c.bundle.kind,
               "image_size": c.bundle.preprocess.size, "tower": towers.get(c.tower_id),
               "text_graph": {"provider": "CPUExecutionProvider", "threads": 1}} | doc
    return JSONResponse(doc)


@endpoint
async def reload(request: Request, svc: FVGPT) -> Response:
    """Scan the repository now (failed versions are tried again) and answer when it is in line with the folder."""
    changes = await svc.sync(retry_failed=True)
    return JSONResponse({"changes": changes, "models": svc.repo.snapshot.records()})


async def docs(request: Request) -> Response:
    """BentoML's OpenAPI document with our routes added; served here because this mount is matched before
    BentoML's own /docs.json route."""
    return JSONResponse(openapi_document(bentoml.get_current_service()))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", exc.headers)


http_app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/labels", labels, methods=["GET"]),
                             Route("/models", models, methods=["GET"]), Route("/info", info, methods=["GET"]),
                             Route("/admin/reload", reload, methods=["POST"]),
                             Route("/docs.json", docs, methods=["GET"])],
                     exception_handlers={HTTPException: http_error})
