"""POST /classify bodies → a validated ClassifyRequest: the body read with its size limit and admission reservation,
then parsed as multipart/form-data or JSON and validated by the request models (engine/models.py).

    multipart/form-data  images (repeated file part), labels (repeated text part), top_k, mode, model, models
                         (repeated text part, or one "*")
    application/json     {"images": ["<base64 or data URI>", ...], "labels": [...], "top_k": 5, "mode": "open",
                          "model": "name[@version]" | "models": ["name[@version]", ...] or "*"}

BentoML's client sends a multipart form's text fields JSON-encoded (`"open"`, `["a cat", "a dog"]`, `3`): a text
part that is the JSON form of its field's value is read as that value (a mode, model or models part holding a JSON
string or list of strings; a single labels part holding a JSON list of strings), any other text as it is. A
multipart body must end with its closing boundary: a truncated one is refused, never read as its complete parts.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from fvgpt_runtime.images import InputError

from .admission import InflightBudget, Reservation
from .errors import ApiError
from .metrics import Metrics
from .models import ALL_MODELS, FIELDS, USAGE, ClassifyModels, ClassifyRequest
from .settings import PARSE_COPIES, Limits

MAX_TEXT_PART = 64 << 10  # a label, a model name, top_k: nothing legitimate comes near
THREAD_PARSE_BYTES = 256 << 10  # bodies larger than this are parsed in a worker thread, off the event loop


class Disconnected(Exception):
    """The client went away before its whole body arrived (raised by the body's chunk iterator)."""


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int, budget: InflightBudget
                    ) -> tuple[bytes, Reservation]:
    """The whole body, refusing more than `limit` bytes whatever Content-Length claims, and its reservation in the
    admission budget: taken from Content-Length before anything is read, or grown as the chunks of a body without
    one arrive."""
    size = 0
    if content_length is not None:
        try:
            size = int(content_length)
        except ValueError:
            raise ApiError(400, f"Content-Length {content_length!r} is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes; the limit is {limit} (FVGPT_MAX_REQUEST_BYTES)")
    reservation = budget.admit(PARSE_COPIES * max(size, 0))
    parts, size = [], 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes (FVGPT_MAX_REQUEST_BYTES)")
            if PARSE_COPIES * size > reservation.size:
                reservation.grow(PARSE_COPIES * size)
            parts.append(chunk)
    except Disconnected:
        reservation.release()
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    except BaseException:
        reservation.release()
        raise
    return b"".join(parts), reservation


async def parse_classify(content_type: str | None, chunks: AsyncIterator[bytes], content_length: str | None,
                         models: ClassifyModels, budget: InflightBudget, metrics: Metrics
                         ) -> tuple[ClassifyRequest, Reservation]:
    """The validated request and its reservation in the admission budget (the caller releases it when done)."""
    media = media_type(content_type)
    if media and media != "multipart/form-data" and not is_json(media):
        raise ApiError(415, f"unsupported Content-Type {media!r}: {USAGE}")
    t0 = time.perf_counter()
    body, reservation = await read_body(chunks, content_length, models.limits.max_request_bytes, budget)
    metrics.add("read", time.perf_counter() - t0, 0.0)
    try:
        if not body:
            raise ApiError(400, f"empty request body: {USAGE}")
        if not media:
            raise ApiError(415, f"missing Content-Type: {USAGE}")
        args = (parse_multipart, body, content_type or "", models) if media == "multipart/form-data" else \
            (parse_json, body, models)
        request = await asyncio.to_thread(timed, metrics, *args) if len(body) > THREAD_PARSE_BYTES else \
            timed(metrics, *args)
        del body, args
        reservation.resize(sum(map(len, request.images)))  # the parse copies are gone; the images stay
    except BaseException:
        reservation.release()
        raise
    return request, reservation


def timed(metrics: Metrics, parse: Callable[..., ClassifyRequest], *args: object) -> ClassifyRequest:
    with metrics.timed("parse"):
        return parse(*args)


def parse_json(body: bytes, models: ClassifyModels) -> ClassifyRequest:
    try:
        doc = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply: /classify takes an object of flat fields") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON ({exc})") from None
    try:
        return models.validate(doc)
    except InputError as exc:
        raise ApiError.of_input(exc) from None


class _Part:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []
        self.size = 0


def multipart_parts(body: bytes, content_type: str, max_files: int, max_fields: int, limits: Limits
                    ) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name or None for a text part, bytes) of every part, in order."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "malformed multipart body: the Content-Type has no boundary")
    parts: list[_Part] = []
    header = [b"", b""]
    files = fields = 0
    ended = False

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1].headers[header[0].lower()] = header[1]
        header[0] = header[1] = b""

    def on_headers_finished() -> None:
        nonlocal files, fields
        _, options = parse_options_header(parts[-1].headers.get(b"content-disposition", b""))
        if b"filename" in options:
            files += 1
            if files > max_files:
                raise ApiError(400, f"too many images: at most {limits.max_images} per request (FVGPT_MAX_IMAGES)")
        else:
            fields += 1
            if fields > max_fields:
                raise ApiError(400, f"too many form fields: at most {limits.max_labels} labels (FVGPT_MAX_LABELS) "
                                    f"and {limits.max_models} models (FVGPT_MAX_MODELS) plus top_k, mode and model")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.chunks.append(data[start:end])
        part.size += end - start

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                                        "on_end": on_end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    if not ended:
        raise ApiError(400, f"the multipart body is truncated: it ends before its closing boundary "
                            f"(--{boundary.decode('latin-1')}--); {len(parts)} part(s) began, the last one cut off. "
                            f"Send the whole body")
    out = []
    for part in parts:
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        data = b"".join(part.chunks)
        if filename is None and part.size > MAX_TEXT_PART:
            raise ApiError(400, f"form field {name!r} is {part.size} bytes; text fields are at most {MAX_TEXT_PART}")
        out.append((name, None if filename is None else filename.decode("utf-8", "replace"), data))
    return out


def _as_json(text: str, kinds: tuple[type, ...]) -> object:
    """`text` as the JSON value it encodes, when it is one of `kinds` (a string, a list of strings); else None."""
    if text[:1] not in ('"', "["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        return None
    return value if isinstance(value, kinds) else None


def parse_multipart(body: bytes, content_type: str, models: ClassifyModels) -> ClassifyRequest:
    limits = models.limits
    parts = multipart_parts(body, content_type, limits.max_images, limits.max_labels + limits.max_models + 3, limits)
    images: list[bytes] = []
    names: list[str] = []
    labels: list[str] = []
    refs: list[str] = []
    fields: dict = {}
    for key, filename, data in parts:
        if key not in FIELDS:
            raise ApiError(400, f"unknown form field {key!r}: expected {', '.join(FIELDS)}; {USAGE}")
        if key == "images":
            if filename is None:
                raise ApiError(400, "form field 'images' must be a file upload, not text (URLs are not fetched)")
            names.append(f"images[{len(images)}] ({filename})")
            images.append(data)
            continue
        if filename is not None:
            raise ApiError(400, f"form field {key!r} must be text, not a file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"form field {key!r} is not UTF-8 text") from None
        if key == "labels":
            labels.append(text)
        elif key == "models":
            refs.append(text)
        elif key in fields:
            raise ApiError(400, f"form field {key!r} is given more than once")
        elif text != "null":  # what BentoML's client sends for None
            fields[key] = text
    if not images:
        raise ApiError(400, f"no images: {USAGE}")
    if labels:
        fields["labels"] = _as_json(labels[0], (list,)) if len(labels) == 1 and _as_json(labels[0], (list,)) \
            is not None else labels
    if refs:
        one = _as_json(refs[0], (str, list)) if len(refs) == 1 else None
        fields["models"] = one if one is not None else ALL_MODELS if refs == [ALL_MODELS] else refs
    for key in ("mode", "model"):
        if key in fields and isinstance(decoded := _as_json(fields[key], (str,)), str):
            fields[key] = decoded
    if "top_k" in fields:
        try:
            fields["top_k"] = int(fields["top_k"])
        except ValueError:
            raise ApiError(400, f"top_k {fields['top_k']!r} is not an integer") from None
    try:
        return models.validate(fields | {"images": images}, names)
    except InputError as exc:
        raise ApiError.of_input(exc) from None
