"""The GET routes (/models, /labels, /info) and the OpenAPI document (/docs.json), as a small Starlette app the
service mounts: BentoML APIs are POST routes, and these are GETs. Each hands its request to the engine and writes its
reply; /docs.json needs no key, like BentoML's own probes.
"""
from __future__ import annotations

from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fvgpt_serving.engine.engine import Engine, Reply
from fvgpt_serving.engine.openapi import merge

from .io import lower_headers


def engine() -> Engine:
    return bentoml.get_current_service().engine


def response(reply: Reply) -> Response:
    return Response(reply.body, reply.status, reply.headers)


async def labels(request: Request) -> Response:
    return response(await engine().labels_http(lower_headers(request), request.query_params.get("model")))


async def models(request: Request) -> Response:
    return response(await engine().models_http(lower_headers(request)))


async def info(request: Request) -> Response:
    return response(await engine().info_http(lower_headers(request), request.query_params.get("model")))


def openapi_document(service: Any) -> dict:
    """BentoML's document of its own routes (liveness, readiness, metrics) with the engine's routes: our APIs' paths
    and the schemas BentoML derived for them are replaced by the engine's (the models that parse and answer)."""
    doc = service.openapi_spec.asdict()
    ours = {api.route for api in service.apis.values()}
    derived = {name for key, api in service.apis.items()
               for spec in (api.input_spec, api.output_spec) for name in spec.openapi_components(key)}
    doc["paths"] = {path: item for path, item in doc.get("paths", {}).items() if path not in ours}
    schemas = doc.get("components", {}).get("schemas", {})
    doc.setdefault("components", {})["schemas"] = {k: v for k, v in schemas.items() if k not in derived}
    return merge(doc, engine().models)


async def docs(request: Request) -> Response:
    from .service import FVGPT

    return JSONResponse(openapi_document(FVGPT))


routes = Starlette(routes=[Route("/labels", labels, methods=["GET"]), Route("/models", models, methods=["GET"]),
                           Route("/info", info, methods=["GET"]), Route("/docs.json", docs, methods=["GET"])])
