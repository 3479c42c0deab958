"""POST /classify's input as a BentoML IODescriptor: the engine's request model, read by the engine's own parser.

BentoML reads an API's input through its input spec's `from_http_request`; its default would parse multipart with
Starlette (dropping a truncated body's last part), fetch URLs sent in file fields (server-side request forgery) and
answer its own error shapes. Here the engine reads the body (size limit, admission, multipart or JSON, validation) and
the spec carries the result to the API function: the validated fields as its arguments, and, on the request's state,
what only the engine needs (image names, the admission reservation) or the error to answer.

The spec's schema (GET /schema.json, a built Bento's apis/schema.json) is the engine's multipart form, with `images`
marked as files the way BentoML marks them, so `bentoml.SyncHTTPClient(url).classify(images=[Path(...)], ...)`
sends a multipart request the engine reads (its JSON-encoded text parts included).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import bentoml
from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request

from fvgpt_serving.engine.engine import Engine
from fvgpt_serving.engine.errors import ApiError
from fvgpt_serving.engine.models import HEADS, ClassifyModels, Prediction, Result
from fvgpt_serving.engine.parse import Disconnected, parse_classify
from fvgpt_serving.engine.settings import Limits

STATE = "fvgpt"  # request.state attribute: (ClassifyRequest, Reservation) or the ApiError to answer
FILE = {"type": "file", "format": "binary"}  # how BentoML's schema marks a file field (its client sends a part)


def lower_headers(request: Request) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}


async def chunks(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise Disconnected() from None


def classify_input(limits: Limits) -> type[bentoml.IODescriptor]:
    form = ClassifyModels(limits).form

    class ClassifyInput(bentoml.IODescriptor, form):  # type: ignore[misc, valid-type]
        multipart_fields: ClassVar[list[str]] = ["images"]

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            schema = form.model_json_schema(*args, **kwargs)
            schema["properties"]["images"]["items"] = FILE
            return schema

        @classmethod
        def openapi_components(cls, name: str) -> dict[str, Any]:
            return {}  # GET /docs.json has the engine's schemas of both encodings instead (shell/routes.py)

        @classmethod
        async def from_http_request(cls, request: Request, serde: Any) -> ClassifyInput:
            engine: Engine = bentoml.get_current_service().engine
            headers = lower_headers(request)
            try:
                engine.authorize(headers)
                parsed = await parse_classify(headers.get("content-type"), chunks(request),
                                              headers.get("content-length"), engine.models, engine.budget,
                                              engine.metrics)
            except ApiError as exc:
                setattr(request.state, STATE, exc)
                return cls.model_construct(images=[])
            setattr(request.state, STATE, parsed)
            req = parsed[0]
            return cls.model_construct(images=req.images, labels=req.labels, top_k=req.top_k, mode=req.mode,
                                       model=req.model, models=req.models)

    ClassifyInput.__name__ = ClassifyInput.__qualname__ = "ClassifyInput"
    return ClassifyInput


class ImageResult(BaseModel):
    """One image's answer: with `model` (or neither) one classifier's (model ... predictions), with `models` one per
    classifier (models)."""

    model: str | None = None
    version: str | None = None
    model_id: str | None = None
    head: HEADS | None = None
    predictions: list[Prediction] | None = None
    models: list[Result] | None = None


class ClassifyOutput(bentoml.IODescriptor):
    """POST /classify's answer as BentoML's schema states it: ClassifyResponse and MultiClassifyResponse (the
    engine's models, GET /docs.json) in one shape. BentoML's client keeps only the fields an answer's schema lists,
    and BentoML 1.4.40's OpenAPI writer fails on an output that is a union of models."""

    results: list[ImageResult]

    @classmethod
    def openapi_components(cls, name: str) -> dict[str, Any]:
        return {}
