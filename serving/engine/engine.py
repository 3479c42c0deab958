"""The serving engine: a model repository, a tower pool, admission, fair decoding, the pipeline and readiness, wired
together and answering the HTTP API's routes as plain values (status, JSON body, headers). No web framework: the
BentoML shell (serving/shell/) hands it request bodies and writes its replies; tests drive it directly.

    engine = Engine(Settings.from_env())
    await engine.start()            # the tower worker, the first repository scan, then one every FVGPT_POLL_S
    reply = await engine.classify_http(headers, body_chunks)   # lower-case header names, the body as it arrives
    await engine.stop()

Every route answers {"error": "<message>"} with its status for a bad request (ApiError), and a logged 500 for
anything unexpected; the engine keeps serving either way.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel

from fvgpt_runtime.images import InputError, configure_pil

from .admission import InflightBudget, Reservation, tune_malloc
from .decode import DecodeScheduler
from .errors import ApiError
from .explain import Explainer
from .metrics import Metrics
from .models import (Changes, ClassifyModels, ClassifyRequest, ClassifyResponse, ClassRecord, Error, ExplainResponse,
                     InfoResponse, LabelsResponse, ModelsResponse, MultiClassifyResponse, ReloadResponse, StageFigures,
                     TowerInfo, TowerWorker, check_ref)
from .parse import parse_classify
from .pipeline import Pipeline
from .readiness import Readiness
from .repository import Classifier, Repository
from .settings import Settings
from .towers import TowerPool

logger = logging.getLogger("fvgpt.engine")

JSON = {"content-type": "application/json"}
AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    """The answer as JSON; fields it was not given are left out (GET /info's classifier fields without one)."""
    return Reply(status, model.model_dump_json(exclude_unset=True).encode(), JSON | (headers or {}))


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(Error(error=message), status, headers)


class Engine:
    def __init__(self, settings: Settings):
        self.settings, self.limits = settings, settings.limits
        self.metrics = Metrics()
        self.models = ClassifyModels(self.limits)
        self.repo = Repository(settings.source, settings.single, settings.runtime, settings.precision,
                               settings.max_batch_size)
        self.pool = TowerPool(settings, self.metrics)
        self.budget = InflightBudget(self.limits.max_inflight_bytes)
        self.decoder = DecodeScheduler(settings.decode_threads)
        self.pipeline = Pipeline(settings, self.pool, self.decoder, self.metrics)
        self.explain_models = ClassifyModels(self.limits, explain=True)
        self.explainer = Explainer(self.pipeline, settings.threads)
        self.readiness = Readiness(settings.ready_ttl_s)
        self.draining = False  # set by the shell on SIGTERM: readiness is false from then on
        self._sync_lock: asyncio.Lock | None = None
        self._watcher: asyncio.Task | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        configure_pil(self.limits.max_image_pixels)
        tune_malloc()  # before the decode threads exist: memory returns to the OS after bursts
        self.pool.start()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        logger.info("fvgpt engine: %s %s, towers in a %s, limits %s, API key %s, poll every %s s",
                    "bundle" if self.settings.single else "repository", self.settings.source,
                    self.settings.tower_worker, self.limits.as_dict(),
                    "required" if self.settings.api_key else "not set", self.settings.poll_s or "never")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.decoder.shutdown()
        await asyncio.to_thread(self.pool.shutdown)

    async def ready(self) -> bool:
        return await self.readiness.check(self)

    # ---- the repository -------------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        """The first sync at start, then one every FVGPT_POLL_S seconds (never with 0; reload syncs at once)."""
        while True:
            try:
                await self.sync()
            except Exception:  # a failed scan must not end the watcher; the next one retries
                logger.exception("fvgpt repository: sync failed")
            if not self.settings.poll_s:
                return
            await asyncio.sleep(self.settings.poll_s)

    async def sync(self, retry_failed: bool = False) -> Changes:
        """Bring the repository in line with its folder: load new and changed versions (one at a time, in a worker
        thread), open their towers, drop removed versions and close the towers nothing uses any more."""
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            to_load, removed = await asyncio.to_thread(self.repo.plan, retry_failed)
            changes = Changes(loaded=[], failed=[], removed=[f"{n}@{v}" for n, v in removed])
            self.repo.apply(removed=removed)
            for found in to_load:
                classifier = await asyncio.to_thread(self.repo.load, found)
                if classifier.ready:
                    try:
                        for tower in classifier.towers:  # each after the tower it reads
                            await self.pool.open(tower)
                    except Exception as exc:  # noqa: BLE001 - the classifier is refused with the reason
                        classifier = classifier.failed(f"its tower cannot be opened: {exc}")
                self.repo.apply([classifier])
                (changes.loaded if classifier.ready else changes.failed).append(classifier.ref)
            if not self.repo.snapshot.scanned:
                self.repo.apply(scanned=True)
                logger.info("fvgpt repository: %d classifier versions ready, %d refused, %d towers",
                            len(self.repo.snapshot.ready), len(changes.failed), len(self.pool.specs))
            used = self.repo.snapshot.towers()
            for tower_id in [t for t in self.pool.specs if t not in used and not self.pipeline.in_use[t]]:
                await self.pool.close(tower_id)
            return changes

    # ---- routes ---------------------------------------------------------------------------------------------------
    def authorize(self, headers: Mapping[str, str]) -> None:
        """With FVGPT_API_KEY set, require it as `Authorization: Bearer <key>` or `X-API-Key: <key>` (header names
        in lower case, as ASGI gives them)."""
        key = self.settings.api_key
        if key is None:
            return
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                           AUTH_HEADERS)

    async def answer(self, route: str, handler: Callable[[], Awaitable[BaseModel]],
                     headers: Mapping[str, str] | None = None, serialise: bool = False) -> Reply:
        """A route's answer as JSON, after the key check when given the request's headers: ApiError → its status and
        message, anything else → a logged 500. serialise=True times the answer's serialisation (a classify stage)."""
        try:
            if headers is not None:
                self.authorize(headers)
            answer = await handler()
        except ApiError as exc:
            return error_reply(exc.status, exc.message, exc.headers)
        except Exception:  # the client gets a JSON 500, the log gets the traceback
            logger.exception("%s failed", route)
            return error_reply(500, "internal server error; the server log has the details")
        if not serialise:
            return json_reply(answer)
        with self.metrics.timed("serialise"):
            return json_reply(answer)

    async def classify_http(self, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> Reply:
        """POST /classify: `headers` (lower-case names) and the body's chunks as they arrive."""

        async def handle() -> ClassifyResponse | MultiClassifyResponse:
            request, reservation = await parse_classify(headers.get("content-type"), body,
                                                        headers.get("content-length"), self.models, self.budget,
                                                        self.metrics)
            with reservation:  # the request's bytes count against FVGPT_MAX_INFLIGHT_BYTES until it is answered
                return await self.classify(request, reservation)

        return await self.answer("POST /classify", handle, headers, serialise=True)

    async def classify(self, request: ClassifyRequest, reservation: Reservation
                       ) -> ClassifyResponse | MultiClassifyResponse:
        """A validated request (with its admission reservation) → its answer."""
        answer = await self.pipeline.classify(request, self.repo.snapshot, reservation)
        self.readiness.succeeded()
        return answer

    async def explain_http(self, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> Reply:
        """POST /explain: like classify_http, answered with heatmaps (engine/explain.py)."""

        async def handle() -> ExplainResponse:
            request, reservation = await parse_classify(headers.get("content-type"), body,
                                                        headers.get("content-length"), self.explain_models,
                                                        self.budget, self.metrics)
            with reservation:
                return await self.explain(request, reservation)

        return await self.answer("POST /explain", handle, headers)

    async def explain(self, request: ClassifyRequest, reservation: Reservation) -> ExplainResponse:
        return await self.explainer.explain(request, self.repo.snapshot, reservation)

    async def labels_http(self, headers: Mapping[str, str], model: str | None) -> Reply:
        return await self.answer("GET /labels", lambda: self.labels(model), headers)

    async def models_http(self, headers: Mapping[str, str]) -> Reply:
        return await self.answer("GET /models", self.list_models, headers)

    async def info_http(self, headers: Mapping[str, str], model: str | None) -> Reply:
        return await self.answer("GET /info", lambda: self.info(model), headers)

    async def reload_http(self, headers: Mapping[str, str]) -> Reply:
        return await self.answer("POST /admin/reload", self.reload, headers)

    def selected(self, model: str | None) -> Classifier:
        """The classifier a GET route's ?model= names, or the only one."""
        try:
            ref = None if model is None else check_ref(model, "model")
        except InputError as exc:
            raise ApiError.of_input(exc) from None
        return self.repo.snapshot.resolve(ref, None, 1)[0]

    async def labels(self, model: str | None) -> LabelsResponse:
        c = self.selected(model)
        return LabelsResponse.model_construct(
            model=c.name, version=c.version, model_id=c.bundle.model_id, kind=c.bundle.kind,
            classes=[ClassRecord.model_construct(**r) for r in c.bundle.classes.records()])

    async def list_models(self) -> ModelsResponse:
        snap = self.repo.snapshot
        return ModelsResponse.model_construct(models=snap.records(), loaded=snap.scanned)

    async def info(self, model: str | None) -> InfoResponse:
        """Server-wide facts; with ?model= (or when the server has one classifier) also that classifier's."""
        snap, s = self.repo.snapshot, self.settings
        figures = self.metrics.snapshot()
        towers = {t: TowerInfo.model_construct(**info, threads=s.threads, images=self.metrics.tower_images[t])
                  for t, info in dict(self.pool.info).items()}
        doc = dict(
            source={"path": str(s.source), "single_bundle": s.single, "poll_s": s.poll_s},
            classifiers={"versions": len(snap.classifiers), "ready": len(snap.ready)},
            towers=list(towers.values()),
            tower_worker=TowerWorker.model_construct(kind=s.tower_worker, pid=self.pool.pid, up=self.pool.up,
                                                     restarts=self.pool.restarts),
            batching={"max_batch_size": s.max_batch_size, "max_latency_ms": s.max_latency_ms},
            limits=self.limits.as_dict(), inflight_bytes=self.budget.held,
            timeouts={"header_s": s.header_timeout_s, "body_s": s.body_timeout_s, "drain_s": s.drain_s},
            stages={k: StageFigures.model_construct(**v) for k, v in figures["stages"].items()},
            batch_sizes=figures["batch_sizes"], api_key_required=s.api_key is not None)
        if model is not None or len(snap.names) == 1:
            c = self.selected(model)
            doc |= dict(model=c.name, version=c.version, model_id=c.bundle.model_id, kind=c.bundle.kind,
                        image_size=c.bundle.preprocess.size, tower=towers.get(c.tower_id),
                        text_graph={"provider": "CPUExecutionProvider", "threads": 1})
        return InfoResponse.model_construct(**doc)

    async def reload(self) -> ReloadResponse:
        """Scan the repository now (failed versions are tried again); answer when it is in line with the folder."""
        changes = await self.sync(retry_failed=True)
        return ReloadResponse.model_construct(changes=changes, models=self.repo.snapshot.records())
