"""The OpenAPI 3.0 document of the engine's routes, generated from the models that parse and answer them
(engine/models.py), with the server's limits in it: what the document says is what the server enforces.

pydantic writes JSON Schema 2020-12; OpenAPI 3.0 wants `nullable` instead of `{"type": "null"}` alternatives and a
one-value `enum` instead of `const` (`openapi30`). The shell merges these paths into the document of its HTTP
server's own routes (liveness, readiness, metrics).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .models import (ClassifyModels, ClassifyResponse, Error, InfoResponse, LabelsResponse, ModelsResponse,
                     MultiClassifyResponse, ReloadResponse)

REF = "#/components/schemas/{model}"
TAG = "Service APIs"  # BentoML's tag for a service's inference endpoints
ERRORS = {"400": "a malformed request: the message names the field", "401": "FVGPT_API_KEY is set and the key is "
          "missing or wrong", "404": "no such classifier or version", "413": "body, image or request over a size "
          "limit (the message names it)", "415": "unsupported Content-Type", "503": "overloaded, the tower worker "
          "restarting, the repository still loading, or the classifier is not served (its reason); retry after "
          "Retry-After where given"}
SECURITY = [{"bearer": []}, {"apiKey": []}, {}]  # {}: no key needed when the server has none
SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "description": "FVGPT_API_KEY"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "FVGPT_API_KEY"}}
MODEL_PARAMETER = {"name": "model", "in": "query", "required": False, "schema": {"type": "string", "minLength": 1},
                   "description": "\"name\" or \"name@version\"; optional when the server has one classifier"}


def openapi30(node: Any) -> Any:
    """pydantic's JSON Schema (2020-12) → OpenAPI 3.0 schema objects: `{"type": "null"}` alternatives become
    `nullable: true`, `const` a one-value `enum`."""
    if isinstance(node, list):
        return [openapi30(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: openapi30(v) for k, v in node.items()}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    options = node.get("anyOf")
    if options and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        del node["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            node |= rest[0]
        else:
            node["anyOf" if len(rest) > 1 else "allOf"] = rest
        node["nullable"] = True
        if "enum" in node:  # OpenAPI 3.0: an enum lists null itself for null to be valid
            node["enum"] = [*node["enum"], None]
    return node


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(summary: str, ok: dict, errors: list[str], **extra: Any) -> dict:
    return {"tags": [TAG], "summary": summary, "security": SECURITY,
            "responses": {"200": _json(ok, "success")} | {code: _json(_ref(Error), ERRORS[code]) for code in errors},
            **extra}


def paths(models: ClassifyModels) -> dict[str, dict]:
    classify = _operation(
        "Classify images with one classifier or several",
        {"oneOf": [_ref(ClassifyResponse), _ref(MultiClassifyResponse)]}, list(ERRORS),
        description="`model` (or no selection, when the server has one classifier): one result per image. "
                    "`models`: per image, one result per classifier. labels, top_k and mode apply to each classifier.",
        requestBody={"required": True, "content": {
            "application/json": {"schema": _ref(models.json)},
            "multipart/form-data": {"schema": _ref(models.form), "encoding": {"images": {"contentType": "image/*"}}},
        }})
    return {"/classify": {"post": classify},
            "/models": {"get": _operation("Every classifier version, its state and, if refused, why",
                                          _ref(ModelsResponse), ["401"])},
            "/labels": {"get": _operation("A classifier's classes and their base/new flags", _ref(LabelsResponse),
                                          ["400", "401", "404", "503"], parameters=[MODEL_PARAMETER])},
            "/info": {"get": _operation("Towers, batching, limits and where request time goes (and a classifier's "
                                        "facts, with ?model=)", _ref(InfoResponse), ["400", "401", "404", "503"],
                                        parameters=[MODEL_PARAMETER])},
            "/admin/reload": {"post": _operation("Scan the model repository now; refused versions are tried again",
                                                 _ref(ReloadResponse), ["401"])}}


def schemas(models: ClassifyModels) -> dict[str, dict]:
    answers = [Error, ClassifyResponse, MultiClassifyResponse, ModelsResponse, LabelsResponse, InfoResponse,
               ReloadResponse]
    _, doc = models_json_schema([(m, "validation") for m in [models.json, models.form, *answers]],
                                ref_template=REF)
    return openapi30(doc["$defs"])


def merge(document: dict, models: ClassifyModels) -> dict:
    """An OpenAPI 3.0 document (the HTTP server's own) with the engine's paths, schemas and security schemes added;
    the document's own schemas get the same 3.0 conversion, so the whole document validates."""
    components = document.setdefault("components", {})
    components["schemas"] = openapi30(components.get("schemas", {})) | schemas(models)
    components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    document.setdefault("paths", {}).update(paths(models))
    return document
