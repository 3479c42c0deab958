"""Our routes in the service's OpenAPI document (GET /docs.json): BentoML's own document plus the path items and
schemas of /classify, /models, /labels, /info and /admin/reload.

BentoML 1.4.40 adds to its document only @bentoml.api methods and mounted FastAPI apps; our routes are a Starlette
app (serving/app.py says why), so the mounted app serves the merged document at /docs.json itself (its mount is
matched before BentoML's own route; tests/test_serving_repository.py checks the served document). The schemas are
pydantic models written for the document only: the handlers build plain dicts, and the tests validate real answers
against these schemas. The document is OpenAPI 3.0 (BentoML's version), so pydantic's `"type": "null"` alternatives
become `nullable`.
"""
from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"
TAG = "Service APIs"  # BentoML's tag for a service's inference endpoints
HEADS = Literal["base", "new", "zero-shot"]


class Error(BaseModel):
    """Every rejected request: a message naming the problem and what to do."""

    error: str


class ClassifyJSON(BaseModel):
    """POST /classify as application/json."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, description="base64 images or data URIs (data:image/jpeg;base64,...); "
                                                        "JPEG, PNG, WebP, GIF, BMP, TIFF. URLs are not fetched.")
    labels: list[str] | None = Field(None, min_length=1, description="label set to score, for each classifier "
                                                                      "(default: each classifier's classes)")
    top_k: int | None = Field(None, ge=1, description="ranked labels per image and classifier (default "
                                                      "min(5, labels scored))")
    mode: Literal["open", "subset"] = Field("open", description="subset: only bundled classes are accepted")
    model: str | None = Field(None, description="one classifier, \"name\" or \"name@version\"; the response has one "
                                                "result per image. Optional when the server has one classifier.")
    models: list[str] | Literal["*"] | None = Field(None, description="several classifiers, or \"*\" for every one "
                                                                      "served; each image gets one result per "
                                                                      "classifier")


class ClassifyForm(BaseModel):
    """POST /classify as multipart/form-data: the same fields; `images` and `labels`, `models` repeat."""

    model_config = ConfigDict(extra="forbid")
    images: list[bytes] = Field(min_length=1, description="image files (a text part is refused)")
    labels: list[str] | None = None
    top_k: int | None = Field(None, ge=1)
    mode: Literal["open", "subset"] = "open"
    model: str | None = None
    models: list[str] | None = Field(None, description="repeated; one part \"*\" for every classifier")


class Prediction(BaseModel):
    label: str
    probability: float


class Result(BaseModel):
    """One classifier's answer for one image."""

    model: str
    version: str
    model_id: str
    head: HEADS
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    """`model` given (or neither): one result per image, in request order."""

    results: list[Result]


class ImageResults(BaseModel):
    models: list[Result] = Field(description="one result per classifier, in request order (\"*\": by name)")


class MultiClassifyResponse(BaseModel):
    """`models` given: per image (in request order) one result per classifier."""

    results: list[ImageResults]


class ModelRecord(BaseModel):
    name: str
    version: str
    default: bool = Field(description="the version a request naming only the classifier gets")
    state: Literal["loading", "ready", "failed"]
    reason: str | None = Field(description="why a failed version is not served")
    kind: Literal["fvgpt", "zero-shot"] | None
    model_id: str | None
    tower_id: str | None
    precision: str | None
    classes: int | None


class ModelsResponse(BaseModel):
    models: list[ModelRecord]
    loaded: bool = Field(description="the repository's first scan has been loaded")


class ClassRecord(BaseModel):
    name: str
    base: bool


class LabelsResponse(BaseModel):
    model: str
    version: str
    model_id: str
    kind: Literal["fvgpt", "zero-shot"]
    classes: list[ClassRecord]


class TowerInfo(BaseModel):
    tower_id: str
    runtime: str
    provider: str
    precision: str
    threads: int | None
    images: int = Field(description="images run through this tower since the server started")


class InfoResponse(BaseModel):
    """Server-wide facts; the classifier fields are there with ?model= or when the server has one classifier."""

    model: str | None = None
    version: str | None = None
    model_id: str | None = None
    kind: Literal["fvgpt", "zero-shot"] | None = None
    image_size: int | None = None
    tower: TowerInfo | None = None
    text_graph: dict[str, Any] | None = None
    source: dict[str, Any]
    classifiers: dict[str, int]
    towers: list[TowerInfo]
    batching: dict[str, int]
    limits: dict[str, int]
    inflight_bytes: int = Field(description="bytes the requests in flight hold now (FVGPT_MAX_INFLIGHT_BYTES caps it)")
    timeouts: dict[str, float] = Field(description="header_s, body_s (per request) and drain_s (on SIGTERM)")
    api_key_required: bool


class Changes(BaseModel):
    loaded: list[str]
    failed: list[str]
    removed: list[str]


class ReloadResponse(BaseModel):
    changes: Changes
    models: list[ModelRecord]


MODELS = [Error, ClassifyJSON, ClassifyForm, ClassifyResponse, MultiClassifyResponse, ModelsResponse, LabelsResponse,
          InfoResponse, ReloadResponse]


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


ERRORS = {"400": "a malformed request: the message names the field", "401": "FVGPT_API_KEY is set and the key is "
          "missing or wrong", "404": "no such classifier or version", "413": "body or image over a limit",
          "415": "unsupported Content-Type", "503": "overloaded, still loading, or the classifier is not served "
          "(its reason); retry after Retry-After"}
SECURITY = [{"bearer": []}, {"apiKey": []}, {}]  # {}: no key needed when the server has none
MODEL_PARAMETER = {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                   "description": "\"name\" or \"name@version\"; optional when the server has one classifier"}


def _operation(summary: str, ok: dict, errors: list[str], **extra: Any) -> dict:
    return {"tags": [TAG], "summary": summary, "security": SECURITY,
            "responses": {"200": _json(ok, "success")} | {code: _json(_ref(Error), ERRORS[code]) for code in errors},
            **extra}


def paths() -> dict[str, dict]:
    classify = _operation(
        "Classify images with one classifier or several",
        {"oneOf": [_ref(ClassifyResponse), _ref(MultiClassifyResponse)]}, list(ERRORS),
        description="`model` (or no selection, when the server has one classifier): one result per image. "
                    "`models`: per image, one result per classifier. labels, top_k and mode apply to each classifier.",
        requestBody={"required": True, "content": {
            "application/json": {"schema": _ref(ClassifyJSON)},
            "multipart/form-data": {"schema": _ref(ClassifyForm), "encoding": {"images": {"contentType": "image/*"}}},
        }})
    return {"/classify": {"post": classify},
            "/models": {"get": _operation("Every classifier version, its state and, if refused, why",
                                          _ref(ModelsResponse), ["401"])},
            "/labels": {"get": _operation("A classifier's classes and their base/new flags", _ref(LabelsResponse),
                                          ["400", "401", "404", "503"], parameters=[MODEL_PARAMETER])},
            "/info": {"get": _operation("Runtime, towers, batching and limits (and a classifier's, with ?model=)",
                                        _ref(InfoResponse), ["400", "401", "404", "503"],
                                        parameters=[MODEL_PARAMETER])},
            "/admin/reload": {"post": _operation("Scan the model repository now; refused versions are tried again",
                                                 _ref(ReloadResponse), ["401"])}}


@cache
def schemas() -> dict[str, dict]:
    _, doc = models_json_schema([(m, "validation") for m in MODELS], ref_template=REF)
    return openapi30(doc["$defs"])


def merge(document: dict) -> dict:
    """BentoML's document (as a dict) with our paths, schemas and security schemes added. BentoML's own schemas get
    the same 3.0 conversion (its TaskStatusResponse has a `"type": "null"`), so the whole document validates."""
    components = document.setdefault("components", {})
    components["schemas"] = openapi30(components.get("schemas", {})) | schemas()
    components.setdefault("securitySchemes", {}).update({
        "bearer": {"type": "http", "scheme": "bearer", "description": "FVGPT_API_KEY"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "FVGPT_API_KEY"}})
    document.setdefault("paths", {}).update(paths())
    return document


def openapi_document(service: Any) -> dict:
    """The merged document of a running service instance (BentoML's part generated by BentoML, each time)."""
    return merge(service.bento_service.openapi_spec.asdict())
