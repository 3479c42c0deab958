"""The HTTP API's typed models: one set that parses requests (JSON and multipart fields), serialises answers and
produces the OpenAPI document (engine/openapi.py), so what the document says is what the server enforces.

Requests. POST /classify takes the same fields in two encodings (engine/parse.py reads the body): ClassifyJSON
(images as base64 strings or data URIs) and ClassifyForm (images as file parts). Both validate to a ClassifyRequest.
The bounds come from the server's Limits, so the models are made per Limits (`ClassifyModels`). Every check raises
the message a client gets (400 unless said otherwise), naming the field and what to do. What depends on a
classifier's classes (labels against them, top_k against the labels scored) is checked per classifier by
fvgpt_runtime.label_sets.

Answers are built with `model_construct` (the engine made them: nothing to validate) and serialised by pydantic.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fvgpt_runtime.images import InputError, decode_base64
from fvgpt_runtime.label_sets import MODES, normalize

from .settings import Limits

HEADS = Literal["base", "new", "zero-shot"]
KINDS = Literal["fvgpt", "zero-shot"]
ALL_MODELS = "*"
MAX_MODEL_REF_CHARS = 200
FIELDS = ("images", "labels", "top_k", "mode", "model", "models")
EXPLAIN_FIELDS = ("targets",)
USAGE = ("send images as multipart/form-data (repeated file field 'images') or as JSON "
         "{\"images\": [\"<base64>\", ...]}")
ModelRef = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_REF_CHARS)]


def refuse(message: str) -> PydanticCustomError:
    """A validation error whose message is exactly `message` (what the client gets)."""
    return PydanticCustomError("fvgpt", message)


def type_name(value: object) -> str:
    return type(value).__name__


# ---- answers ------------------------------------------------------------------------------------------------------

class Error(BaseModel):
    """Every rejected request: a message naming the problem and what to do."""

    error: str


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


class Heatmap(BaseModel):
    label: str
    grid: list[list[float]] = Field(description="the map on the tower's patch grid (g rows of g values, row-major from "
                                                "the top left): each patch's direct contribution to cos(image "
                                                "feature, the label's text row) through the last attention layer; "
                                                "negative values pull away from the label")
    png: str = Field(description="base64 PNG: a thumbnail of the image with the map's positive part tinted over the "
                                 "part the tower saw (`crop`)")


class ExplainResult(Result):
    """One image's answer with its heatmaps."""

    crop: list[float] = Field(description="x0, y0, x1, y1 of the image part the tower saw (the centre crop), as "
                                          "fractions of its width and height; the grid covers exactly this box")
    heatmaps: list[Heatmap] = Field(description="one per target: the top label, or each of `targets`")


class ExplainResponse(BaseModel):
    """POST /explain: one result per image, in request order."""

    results: list[ExplainResult]
    explain_graph: str = Field(description="the id of the explain graph that ran")
    precision: str


class ModelRecord(BaseModel):
    name: str
    version: str
    default: bool = Field(description="the version a request naming only the classifier gets")
    state: Literal["loading", "ready", "failed"]
    reason: str | None = Field(description="why a failed version is not served")
    kind: KINDS | None
    model_id: str | None
    tower_id: str | None
    towers: dict[str, str] | None = Field(
        default=None, description="tower role → the id of the tower it runs; classifiers listing the same id share "
                                  "that tower, which runs once per image for all of them (PromptSRC: CLIP's tower "
                                  "`image` and its own `promptsrc`; MMRL: `trunk`, CLIP's branch `image`, `mmrl`)")
    runtime: str | None
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
    kind: KINDS
    classes: list[ClassRecord]


class TowerInfo(BaseModel):
    tower_id: str
    runtime: str
    provider: str
    precision: str
    threads: int | None
    images: int = Field(description="images run through this tower since the server started")


class StageFigures(BaseModel):
    calls: int
    wall_s: float
    cpu_s: float


class TowerWorker(BaseModel):
    kind: Literal["process", "thread"]
    pid: int | None
    up: bool
    restarts: int


class InfoResponse(BaseModel):
    """Server-wide facts; the classifier fields are there with ?model= or when the server has one classifier."""

    model: str | None = None
    version: str | None = None
    model_id: str | None = None
    kind: KINDS | None = None
    image_size: int | None = None
    tower: TowerInfo | None = None
    text_graph: dict[str, Any] | None = None
    source: dict[str, Any]
    classifiers: dict[str, int]
    towers: list[TowerInfo]
    tower_worker: TowerWorker
    batching: dict[str, int]
    limits: dict[str, int]
    inflight_bytes: int = Field(description="bytes the requests in flight hold now (FVGPT_MAX_INFLIGHT_BYTES caps it)")
    timeouts: dict[str, float] = Field(description="header_s, body_s (per request) and drain_s (on SIGTERM)")
    stages: dict[str, StageFigures] = Field(description="wall and CPU seconds per request stage since the start "
                                                        "(read, parse, decode, preprocess, queue, transport, tower, "
                                                        "heads, serialise)")
    batch_sizes: dict[str, int] = Field(description="tower batches run, by images in the batch")
    api_key_required: bool


class Changes(BaseModel):
    loaded: list[str]
    failed: list[str]
    removed: list[str]


class ReloadResponse(BaseModel):
    changes: Changes
    models: list[ModelRecord]


# ---- requests -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassifyRequest:
    """A validated POST /classify, whichever its encoding."""

    images: list[bytes]
    names: list[str]  # how errors refer to each image: images[0] (cat.jpg)
    labels: list[str] | None  # normalised; None: each classifier's own classes
    mode: str
    top_k: int | None
    model: str | None = None  # "name" or "name@version"
    models: list[str] | None = None  # several refs, or ["*"]: the answer has one result per classifier
    targets: list[str] | None = None  # POST /explain: the labels to draw maps for (None: each image's top label)


def check_ref(raw: object, where: str) -> str:
    """One classifier reference: "name" or "name@version" (whether it exists is the repository's question)."""
    if not isinstance(raw, str):
        raise InputError(f"{where} must be a string (\"name\" or \"name@version\"), not {type_name(raw)}")
    ref = raw.strip()
    if not ref or len(ref) > MAX_MODEL_REF_CHARS or not ref.isprintable():
        raise InputError(f"{where} {raw[:MAX_MODEL_REF_CHARS]!r} is not a classifier name: expected \"name\" or "
                         f"\"name@version\" (GET /models lists them)")
    return ref


def refused(check: Callable[..., Any], *args: Any) -> Any:
    """check(*args), its InputError as a validation error with the same message."""
    try:
        return check(*args)
    except InputError as exc:
        raise refuse(str(exc)) from None


class ClassifyModels:
    """ClassifyJSON and ClassifyForm for one server's limits; with explain=True, ExplainJSON and ExplainForm (POST
    /explain: the same fields and `targets`)."""

    def __init__(self, limits: Limits, explain: bool = False):
        self.limits = limits
        self.fields = FIELDS + (EXPLAIN_FIELDS if explain else ())
        self.json, self.form = _classify_models(limits)
        if explain:
            self.json, self.form = _explain_models(limits, self.json, self.form)

    def validate(self, fields: dict, names: list[str] | None = None) -> ClassifyRequest:
        """`fields` as sent (JSON object, or multipart fields with the images as bytes) → the request; a 400
        InputError with the first problem's message. `names`: the images' names (multipart: with their file
        names); default images[i]."""
        from pydantic import ValidationError

        model = self.json if names is None else self.form
        try:
            doc = model.model_validate(fields)
        except ValidationError as exc:
            raise InputError(exc.errors(include_url=False)[0]["msg"]) from None
        return ClassifyRequest(doc.images, names or [f"images[{i}]" for i in range(len(doc.images))], doc.labels,
                               doc.mode, doc.top_k, doc.model, [ALL_MODELS] if doc.models == ALL_MODELS else
                               doc.models, getattr(doc, "targets", None))


def label_list(raw: Any, field: str, when_empty: str, limits: Limits) -> list[str]:
    """A list of labels as sent → normalised; the message names `field` and the item."""
    if not isinstance(raw, list):
        raise refuse(f"{field} must be a list of strings, not {type_name(raw)}")
    if not raw:
        raise refuse(f"{field} is empty: {when_empty}")
    if len(raw) > limits.max_labels:
        raise refuse(f"too many {field}: {len(raw)}, at most {limits.max_labels} (FVGPT_MAX_LABELS)")
    labels = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise refuse(f"{field}[{i}] must be a string, not {type_name(item)}")
        labels.append(refused(normalize, item, f"{field}[{i}]", limits.max_label_chars))
    return labels


def _explain_models(limits: Limits, json_model: type[BaseModel], form_model: type[BaseModel]
                    ) -> tuple[type[BaseModel], type[BaseModel]]:
    label = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_label_chars)]

    class ExplainOptions(BaseModel):
        targets: list[label] | None = Field(
            None, min_length=1, max_length=limits.max_labels,
            description="the labels to draw a heatmap for, each among the labels scored (default: each image's top "
                        "label)")

        @field_validator("targets", mode="before")
        @classmethod
        def _targets(cls, raw: Any) -> list[str]:
            return label_list(raw, "targets", "omit it for the top label's map", limits)

    class ExplainJSON(json_model, ExplainOptions):  # type: ignore[misc, valid-type]
        """POST /explain as application/json: /classify's fields and `targets`."""

    class ExplainForm(form_model, ExplainOptions):  # type: ignore[misc, valid-type]
        """POST /explain as multipart/form-data: /classify's fields and `targets` (repeated, like labels)."""

    return ExplainJSON, ExplainForm


def _classify_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    label = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_label_chars)]
    ModelRefs = Annotated[list[ModelRef], Field(min_length=1, max_length=limits.max_models)]  # noqa: N806

    class ClassifyOptions(BaseModel):
        """What to score, and which classifiers answer; labels, top_k and mode apply to each classifier named."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={"not": {"required": ["model", "models"]}})

        images: list[bytes]  # each encoding's own (below); declared first, so it is validated first
        labels: list[label] | None = Field(
            None, min_length=1, max_length=limits.max_labels,
            description="the label set to score, for each classifier (default: each classifier's classes). A "
                        "bundled class name or its display form (underscores as spaces) is that class; any other "
                        "label is a new label. Trimmed, whitespace runs made one space; no control characters; no "
                        "repeats")
        top_k: int | None = Field(None, ge=1, description="ranked labels per image and classifier; at most the "
                                                           "number of labels scored (default: min(5, that number))")
        mode: Literal["open", "subset"] = Field("open", description="subset: only bundled classes are accepted")
        model: ModelRef | None = Field(None, description="one classifier, \"name\" or \"name@version\"; the answer "
                                                         "has one result per image. Optional when the server holds "
                                                         "one classifier. Not together with `models`.")
        models: ModelRefs | Literal["*"] | None = Field(
            None, description="several classifiers, or \"*\" for every one served; each image gets one result per "
                              "classifier. Not together with `model`.")

        @model_validator(mode="before")
        @classmethod
        def _known_fields(cls, doc: Any) -> Any:
            if not isinstance(doc, dict):
                raise refuse(f"the JSON body must be an object: {USAGE}")
            if unknown := [k for k in doc if k not in cls.model_fields]:
                raise refuse(f"unknown JSON field(s) {', '.join(map(repr, unknown))}: expected "
                             f"{', '.join(cls.model_fields)}")
            doc = {k: v for k, v in doc.items() if v is not None}
            if "images" not in doc:
                raise refuse(f"'images' must be a non-empty list of base64 strings: {USAGE}")
            if "model" in doc and "models" in doc:
                raise refuse("send either 'model' (one classifier) or 'models' (several, or \"*\"), not both")
            return doc

        @field_validator("labels", mode="before")
        @classmethod
        def _labels(cls, raw: Any) -> list[str]:
            return label_list(raw, "labels", "omit it to score every bundled class", limits)

        @field_validator("top_k", mode="before")
        @classmethod
        def _top_k(cls, raw: Any) -> int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise refuse(f"top_k must be an integer, not {raw!r}")
            if raw < 1:
                raise refuse(f"top_k must be between 1 and the number of labels scored, not {raw}")
            return raw

        @field_validator("mode", mode="before")
        @classmethod
        def _mode(cls, raw: Any) -> str:
            if raw not in MODES:
                raise refuse(f"mode must be one of {', '.join(MODES)}, not {raw!r}")
            return raw

        @field_validator("model", mode="before")
        @classmethod
        def _model(cls, raw: Any) -> str:
            return refused(check_ref, raw, "model")

        @field_validator("models", mode="before")
        @classmethod
        def _models(cls, raw: Any) -> list[str] | str:
            if raw == ALL_MODELS:
                return raw
            if not isinstance(raw, list) or not raw:
                raise refuse("models must be a non-empty list of classifier names (\"name\" or \"name@version\") "
                             "or \"*\" for every classifier")
            if len(raw) > limits.max_models:
                raise refuse(f"too many models: {len(raw)}, at most {limits.max_models} (FVGPT_MAX_MODELS)")
            refs = [refused(check_ref, item, f"models[{i}]") for i, item in enumerate(raw)]
            if ALL_MODELS in refs:
                raise refuse("\"*\" stands alone: send \"models\": \"*\" (or one form field models=*)")
            if len(set(refs)) != len(refs):
                raise refuse(f"models repeats a classifier: {sorted({r for r in refs if refs.count(r) > 1})}")
            return refs

    def check_images(raw: Any, kind: str) -> list:
        if not isinstance(raw, list) or not raw:
            raise refuse(f"'images' must be a non-empty list of {kind}: {USAGE}")
        if len(raw) > limits.max_images:
            raise refuse(f"too many images: {len(raw)}, at most {limits.max_images} per request (FVGPT_MAX_IMAGES)")
        return raw

    def images_schema(item: type) -> Any:
        return Annotated[list[item], Field(min_length=1, max_length=limits.max_images)]

    class ClassifyJSON(ClassifyOptions):
        """POST /classify as application/json."""

        images: list[bytes] = Field(description="base64 images or data URIs (data:image/jpeg;base64,...): JPEG, PNG, "
                                                "WebP, GIF, BMP, TIFF. URLs are not fetched.")

        @field_validator("images", mode="plain", json_schema_input_type=images_schema(str))
        @classmethod
        def _images(cls, raw: Any) -> list[bytes]:
            names = [f"images[{i}]" for i in range(len(check_images(raw, "base64 strings")))]
            for name, item in zip(names, raw):
                if not isinstance(item, str):
                    raise refuse(f"{name} must be a base64 string, not {type_name(item)}")
            return [refused(decode_base64, item, name) for name, item in zip(names, raw)]

    class ClassifyForm(ClassifyOptions):
        """POST /classify as multipart/form-data: the same fields; `images`, `labels` and `models` repeat (or one
        part holds a JSON list, as BentoML's client sends it), `models` may be one part "*"."""

        images: list[bytes] = Field(description="image files (a text part is refused)")

        @field_validator("images", mode="plain", json_schema_input_type=images_schema(bytes))
        @classmethod
        def _images(cls, raw: Any) -> list[bytes]:
            return check_images(raw, "image files")

    return ClassifyJSON, ClassifyForm
