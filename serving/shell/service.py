"""The BentoML service: a thin shell around the serving engine (serving/engine/), one worker process.

    client ─HTTP─► uvicorn + BentoML (this worker)                          tower worker (a child process)
                   POST /classify, /admin/reload: BentoML APIs  ┐            towers behind the engine's batcher:
                   GET /models, /labels, /info, /docs.json      ├► Engine ─► pixels in shared memory, features back
                   /livez /readyz /metrics: BentoML's           ┘

POST /classify and POST /admin/reload are BentoML APIs with typed inputs and outputs, so BentoML's client
(`bentoml.SyncHTTPClient(url).classify(images=[Path("cat.jpg")], top_k=3)`) and a built Bento's apis/schema.json
see them; the engine reads their bodies (shell/io.py) and writes their answers. The GET routes are a mounted app
(shell/routes.py). /readyz asks the engine (`__is_ready__`), /metrics appends the engine's stage timers
(`__metrics__`). What needs BentoML's internals is shell/internals.py's, behind one version check.
"""
from __future__ import annotations

import logging
import os

import bentoml
from starlette.responses import Response

from fvgpt_runtime.manifest import open_manifest
from fvgpt_serving.engine.engine import Engine, Reply, error_reply
from fvgpt_serving.engine.errors import ApiError
from fvgpt_serving.engine.models import ReloadResponse
from fvgpt_serving.engine.settings import Limits, Settings, env_int

from . import internals
from .errors import JSONErrors
from .io import STATE, ClassifyOutput, classify_input, lower_headers
from .routes import response, routes

# Read when the module is imported (`bentoml serve`, `bentoml build`): BentoML's decorators take them then.
LIMITS = Limits.from_env()
TIMEOUT_S = max(60, 3 * env_int(os.environ, Settings.ENV["max_latency_ms"], Settings.max_latency_ms) // 1000)
ClassifyInput = classify_input(LIMITS)
# The Bento's image (`bentoml build`, then `bentoml containerize`): the project's source is copied in before the
# Python packages are installed, and installed from there with the `cpu` and `serve` extras (a GPU image takes `gpu`
# instead of `cpu`, never both). No torch, no training weights (bentofile.yaml leaves them out).
SOURCES = ("pyproject.toml", "README.md", "fvgpt", "runtime", "export", "serving")
IMAGE = bentoml.images.Image(python_version="3.11", lock_python_packages=False).build_include(*SOURCES) \
    .python_packages("--editable .[cpu,serve]")  # BentoML rewrites a plain ".[cpu,serve]" into an invalid line


def with_status(reply: Reply, ctx: bentoml.Context) -> Response:
    """BentoML sets an API's status from its context after the call: give both the reply's."""
    ctx.response.status_code = reply.status
    return response(reply)


@bentoml.asgi_app(routes, path="/")
@bentoml.service(name="fvgpt", image=IMAGE, workers=1, traffic={"timeout": TIMEOUT_S})
class FVGPT:
    """FVG-PT classifiers over HTTP: POST /classify, GET /models, /labels, /info, POST /admin/reload."""

    @bentoml.on_deployment
    def _check_before_workers_start() -> None:
        """Runs in the `bentoml serve` process before any worker starts: a bad setting or a bad single bundle stops
        the server with its message, instead of a worker that crashes and restarts for ever; then the drain-aware
        stop (shell/internals.py)."""
        settings = Settings.from_env()
        if settings.single:
            open_manifest(settings.source)
        internals.install("arbiter", settings.drain_s)

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.engine = Engine(self.settings)

    @bentoml.on_startup
    async def _start(self) -> None:
        logging.getLogger("fvgpt").setLevel(logging.INFO)  # BentoML's root handler shows INFO lines from here on
        s = self.settings
        internals.install("worker", s.drain_s, s.header_timeout_s, s.body_timeout_s, self._drain)
        await self.engine.start()

    def _drain(self) -> None:
        self.engine.draining = True

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        await self.engine.stop()

    @bentoml.api(route="/classify", input_spec=ClassifyInput, output_spec=ClassifyOutput)
    async def classify(self, images: list[bytes], labels: list[str] | None = None, top_k: int | None = None,
                       mode: str = "open", model: str | None = None, models: list[str] | str | None = None,
                       ctx: bentoml.Context = None) -> Response:
        """Classify images with one classifier (`model`, or the only one) or several (`models`, or "*"). The
        arguments are the request's validated fields; the engine's parse of it (with each image's name and the
        request's admission reservation), or the error to answer, is on the request's state (shell/io.py). The
        engine writes the JSON: BentoML passes a Response on as it is."""
        parsed = getattr(ctx.request.state, STATE)
        if isinstance(parsed, ApiError):
            return with_status(error_reply(parsed.status, parsed.message, parsed.headers), ctx)
        request, reservation = parsed
        with reservation:  # the request's bytes count against FVGPT_MAX_INFLIGHT_BYTES until it is answered
            reply = await self.engine.answer("POST /classify", lambda: self.engine.classify(request, reservation),
                                             serialise=True)
        return with_status(reply, ctx)

    @bentoml.api(route="/admin/reload")
    async def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Scan the model repository now (refused versions are tried again); answers when it is in line."""
        return with_status(await self.engine.reload_http(lower_headers(ctx.request)), ctx)

    async def __is_ready__(self) -> bool:
        return await self.engine.ready()

    def __metrics__(self, content: str) -> str:
        return content + self.engine.metrics.prometheus()


FVGPT.add_asgi_middleware(JSONErrors)
