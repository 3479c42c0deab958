"""POST /classify request parsing: raw body (size-limited while it streams in) → a validated ClassifyRequest.

Two encodings, the same fields:
  multipart/form-data  images (repeated file field), labels (repeated text field), top_k, mode, model, models
                       (repeated text field, or one "*")
  application/json     {"images": ["<base64 or data URI>", ...], "labels": [...], "top_k": 5, "mode": "open",
                        "model": "name[@version]" | "models": ["name[@version]", ...] or "*"}

model/models say which classifiers answer (serving/repository.py resolves them). labels, top_k and mode apply to each
of them (`for_classifier`): labels omitted → every class of that classifier. Given → exactly that set, scored by the
head Bundle.scores routes it to. A label equal to a bundled class name, or to its display form (underscores as
spaces), is that class; any other label is a new label (text features through the bundle's text graph). mode "subset"
instead rejects labels that are not bundled classes — for clients that only ever mean to narrow the bundle's own
class list.
"""
from __future__ import annotations

import json
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from fvgpt.classes import ClassSplit

from .admission import PARSE_COPIES, InflightBudget, Reservation
from .decode import decode_base64
from .errors import ApiError
from .limits import Limits

FIELDS = ("images", "labels", "top_k", "mode", "model", "models")
MODES = ("open", "subset")
ALL_MODELS = "*"
MAX_MODEL_REF_CHARS = 200
USAGE = ("send images as multipart/form-data (repeated file field 'images') or as JSON "
         "{\"images\": [\"<base64>\", ...]}")
NOT_TEXT = ("Cc", "Cs", "Cn")  # control characters, lone surrogates, unassigned code points


@dataclass(frozen=True)
class ClassifyRequest:
    images: list[bytes]
    names: list[str]  # how error messages refer to each image: images[0] (cat.jpg)
    labels: object  # as sent (validated per classifier by for_classifier); None: every class
    mode: object
    top_k: int | None
    model: str | None = None  # "name" or "name@version"
    models: list[str] | None = None  # several refs, or ["*"]: the response has one result per classifier

    def for_classifier(self, classes: ClassSplit, limits: Limits) -> tuple[list[str] | None, int]:
        """(labels, top_k) for one classifier: this request's labels resolved against its classes."""
        labels = resolve_labels(self.labels, self.mode, classes, limits)
        return labels, resolve_top_k(self.top_k, len(labels or classes.names), limits)


async def read_body(request: Request, limit: int, budget: InflightBudget) -> tuple[bytes, Reservation]:
    """The whole body, refusing more than limit bytes whatever Content-Length claims, and its reservation in the
    admission budget: taken from Content-Length before anything is read, or grown as the chunks of a body without
    one arrive (503 when it does not fit)."""
    declared = request.headers.get("content-length")
    size = 0
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes; the limit is {limit} (FVGPT_MAX_REQUEST_BYTES)")
    reservation = budget.admit(PARSE_COPIES * max(size, 0))
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes (FVGPT_MAX_REQUEST_BYTES)")
            if PARSE_COPIES * size > reservation.size:
                reservation.grow(PARSE_COPIES * size)
            chunks.append(chunk)
    except ClientDisconnect:
        reservation.release()
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    except BaseException:
        reservation.release()
        raise
    return b"".join(chunks), reservation


async def parse_classify(request: Request, limits: Limits, budget: InflightBudget
                         ) -> tuple[ClassifyRequest, Reservation]:
    """The validated request and its reservation in the admission budget (the caller releases it when done)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media != "multipart/form-data" and media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"unsupported Content-Type {media!r}: {USAGE}")
    body, reservation = await read_body(request, limits.max_request_bytes, budget)
    try:
        if not body:
            raise ApiError(400, f"empty request body: {USAGE}")
        if not media:
            raise ApiError(415, f"missing Content-Type: {USAGE}")
        if media == "multipart/form-data":
            fields = await _multipart_fields(request, body, limits)
        else:  # json.loads and base64 of a large body would hold the event loop for a while
            fields = await anyio.to_thread.run_sync(_json_fields, body, limits)
        del body
        reservation.resize(sum(map(len, fields["images"])))  # the parse copies are gone; the images stay
        if "model" in fields and "models" in fields:
            raise ApiError(400, "send either 'model' (one classifier) or 'models' (several, or \"*\"), not both")
        model = resolve_model(fields["model"]) if "model" in fields else None
        models = resolve_models(fields["models"], limits) if "models" in fields else None
    except BaseException:
        reservation.release()
        raise
    return ClassifyRequest(fields["images"], fields["names"], fields.get("labels"), fields.get("mode", "open"),
                           fields.get("top_k"), model, models), reservation


async def _single_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _multipart_fields(request: Request, body: bytes, limits: Limits) -> dict:
    parser = MultiPartParser(request.headers, _single_chunk(body), max_files=limits.max_images,
                             max_fields=limits.max_labels + limits.max_models + 3, max_part_size=64 << 10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise ApiError(400, f"too many images: at most {limits.max_images} per request "
                                f"(FVGPT_MAX_IMAGES)") from None
        if "Too many fields" in exc.message:
            raise ApiError(400, f"too many form fields: at most {limits.max_labels} labels (FVGPT_MAX_LABELS) and "
                                f"{limits.max_models} models (FVGPT_MAX_MODELS) plus top_k, mode and model") from None
        raise ApiError(400, f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the parser trips over in untrusted bytes is a bad request
        raise ApiError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None
    fields: dict = {"images": [], "names": []}
    labels: list[str] = []
    models: list[str] = []
    try:
        for key, value in form.multi_items():
            if key not in FIELDS:
                raise ApiError(400, f"unknown form field {key!r}: expected {', '.join(FIELDS)}; {USAGE}")
            if key == "images":
                if not isinstance(value, UploadFile):
                    raise ApiError(400, "form field 'images' must be a file upload, not text "
                                        "(URLs are not fetched)")
                fields["names"].append(f"images[{len(fields['images'])}] ({value.filename})")
                fields["images"].append(await value.read())
            elif isinstance(value, UploadFile):
                raise ApiError(400, f"form field {key!r} must be text, not a file")
            elif key == "labels":
                labels.append(value)
            elif key == "models":
                models.append(value)
            elif key in fields:
                raise ApiError(400, f"form field {key!r} is given more than once")
            else:
                fields[key] = value
    finally:
        await form.close()
    if not fields["images"]:
        raise ApiError(400, f"no images: {USAGE}")
    if labels:
        fields["labels"] = labels
    if models:
        fields["models"] = models[0] if models == [ALL_MODELS] else models
    if "top_k" in fields:
        try:
            fields["top_k"] = int(fields["top_k"])
        except ValueError:
            raise ApiError(400, f"top_k {fields['top_k']!r} is not an integer") from None
    return fields


def _json_fields(body: bytes, limits: Limits) -> dict:
    try:
        doc = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply: /classify takes an object of flat fields") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ApiError(400, f"the JSON body must be an object: {USAGE}")
    if unknown := [k for k in doc if k not in FIELDS]:
        raise ApiError(400, f"unknown JSON field(s) {', '.join(map(repr, unknown))}: expected "
                            f"{', '.join(FIELDS)}")
    images = doc.get("images")
    if not isinstance(images, list) or not images:
        raise ApiError(400, f"'images' must be a non-empty list of base64 strings: {USAGE}")
    if len(images) > limits.max_images:
        raise ApiError(400, f"too many images: {len(images)}, at most {limits.max_images} per request "
                            f"(FVGPT_MAX_IMAGES)")
    names = [f"images[{i}]" for i in range(len(images))]
    for name, item in zip(names, images):
        if not isinstance(item, str):
            raise ApiError(400, f"{name} must be a base64 string, not {type(item).__name__}")
    fields = {k: v for k, v in doc.items() if v is not None}
    fields["images"] = [decode_base64(item, name) for name, item in zip(names, images)]
    fields["names"] = names
    if "top_k" in fields and (isinstance(fields["top_k"], bool) or not isinstance(fields["top_k"], int)):
        raise ApiError(400, f"top_k must be an integer, not {fields['top_k']!r}")
    return fields


def resolve_model(raw: object, name: str = "model") -> str:
    """One classifier reference: "name" or "name@version" (whether it exists is the repository's question)."""
    if not isinstance(raw, str):
        raise ApiError(400, f"{name} must be a string (\"name\" or \"name@version\"), not {type(raw).__name__}")
    ref = raw.strip()
    if not ref or len(ref) > MAX_MODEL_REF_CHARS or not ref.isprintable():
        raise ApiError(400, f"{name} {raw[:MAX_MODEL_REF_CHARS]!r} is not a classifier name: expected \"name\" or "
                            f"\"name@version\" (GET /models lists them)")
    return ref


def resolve_models(raw: object, limits: Limits) -> list[str]:
    """A list of classifier references, or "*" (returned as ["*"]): every classifier served."""
    if raw == ALL_MODELS:
        return [ALL_MODELS]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "models must be a non-empty list of classifier names (\"name\" or \"name@version\") "
                            "or \"*\" for every classifier")
    if len(raw) > limits.max_models:
        raise ApiError(400, f"too many models: {len(raw)}, at most {limits.max_models} (FVGPT_MAX_MODELS)")
    refs = [resolve_model(item, f"models[{i}]") for i, item in enumerate(raw)]
    if ALL_MODELS in refs:
        raise ApiError(400, "\"*\" stands alone: send \"models\": \"*\" (or one form field models=*)")
    if len(set(refs)) != len(refs):
        raise ApiError(400, f"models repeats a classifier: {sorted({r for r in refs if refs.count(r) > 1})}")
    return refs


def resolve_labels(raw: object, mode: object, classes: ClassSplit, limits: Limits) -> list[str] | None:
    """Validated labels, bundled ones under their bundle name; None: every bundled class."""
    if mode not in MODES:
        raise ApiError(400, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if raw is None:
        if mode == "subset":
            raise ApiError(400, "mode 'subset' needs labels: the bundled classes to score")
        return None
    if not isinstance(raw, list):
        raise ApiError(400, f"labels must be a list of strings, not {type(raw).__name__}")
    if not raw:
        raise ApiError(400, "labels is empty: omit it to score every bundled class")
    if len(raw) > limits.max_labels:
        raise ApiError(400, f"too many labels: {len(raw)}, at most {limits.max_labels} (FVGPT_MAX_LABELS)")
    labels: list[str] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise ApiError(400, f"labels[{i}] must be a string, not {type(item).__name__}")
        label = " ".join(item.split())
        if not label:
            raise ApiError(400, f"labels[{i}] is empty")
        if len(label) > limits.max_label_chars:
            raise ApiError(400, f"labels[{i}] is {len(label)} characters long; the limit is "
                                f"{limits.max_label_chars} (FVGPT_MAX_LABEL_CHARS)")
        if not is_text(label):
            raise ApiError(400, f"labels[{i}] contains control characters (or lone surrogates, or unassigned code "
                                f"points)")
        found = classes.find(label)
        if found is None and mode == "subset":
            raise ApiError(400, f"labels[{i}] {label!r} is not a bundled class (mode 'subset'); the bundled "
                                f"classes are: {', '.join(classes.names)}")
        label = label if found is None else classes.names[found]
        if label in seen:
            raise ApiError(400, f"labels[{i}] {item!r} repeats labels[{seen[label]}]")
        seen[label] = i
        labels.append(label)
    return labels


def is_text(label: str) -> bool:
    """Text a label may hold: anything but control characters, lone surrogates and unassigned code points. Format
    characters (Unicode category Cf: the zero-width joiners of emoji sequences, soft hyphens, the zero-width
    non-joiner of Persian, bidi marks, emoji tag sequences) are part of normal text and are kept."""
    return not any(unicodedata.category(ch) in NOT_TEXT for ch in label)


def resolve_top_k(raw: int | None, n_labels: int, limits: Limits) -> int:
    if raw is None:
        return min(limits.default_top_k, n_labels)
    if not 1 <= raw <= n_labels:
        raise ApiError(400, f"top_k must be between 1 and {n_labels} (the number of labels scored), not {raw}")
    return raw
