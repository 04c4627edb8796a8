"""The HTTP server's application factory. State lives on ``app.state``; nothing here is a module global.

Middlewares, outermost first: the audit recorder, the model request's trace span (with traces on), header checks
(DNS rebinding, encoding), origin check and CORS, access (keys, roles, rate limits), body checks (size, JSON),
metrics. Every error, from any layer, is mapped once here into Ollama's or OpenAI's error shape by path.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import slmops
from slmops.config.settings import default
from slmops.server import access as request_access
from slmops.server import errors, feedback, ollama, openai, responses, slots
from slmops.server import tracing as request_tracing
from slmops.server.access import Access, AccessPolicy, Recorder, authorize
from slmops.server.guards import LOCAL_ORIGINS, BodyLimit, HeaderCheck, OriginCheck, is_loopback
from slmops.server.metrics import Metrics, Observed
from slmops.server.runtime import ModelRuntime
from slmops.server.tracing import Traced, Tracing
from slmops.store.store import Store
from slmops.types.errors import EngineError, IntegrityError, SlmopsError

log = logging.getLogger("slmops.server")
__all__ = ["ServerConfig", "create_app", "is_loopback"]


@dataclass
class ServerConfig:
    """What the app is built with; :func:`slmops.wiring.server_config` fills it from the settings, whose table
    defines the defaults."""

    host: str = default("SLMOPS_HOST")[0]
    origins: tuple[str, ...] = default("SLMOPS_ORIGINS")
    max_request_bytes: int = default("SLMOPS_MAX_REQUEST_BYTES")
    max_blob_bytes: int = default("SLMOPS_MAX_BLOB_SIZE")  # /api/blobs uploads (model weights)
    extra_hosts: tuple[str, ...] = field(default_factory=tuple)
    openai: bool = default("SLMOPS_OPENAI_COMPATIBLE")  # mount /v1
    preload: str | None = None  # a model to load at start (SLMOPS_MODEL)
    home: Path | None = None  # SLMOPS_HOME (the feedback log, the fleet's privacy file); None: the store's parent
    feedback: bool = default("SLMOPS_FEEDBACK")  # collect rated feedback without a fleet's say
    ca_bundle: Path | None = None  # SLMOPS_CA_BUNDLE: more CAs for registries (/api/pull, /api/push)


def create_app(store: Store, runtime: ModelRuntime, config: ServerConfig | None = None,
               access: AccessPolicy | None = None, tracing: Tracing | None = None) -> FastAPI:
    """``access``: keys, rate limits and audit; without one, no auth (in-process tests of other layers). The
    runtime brings the metrics (``/metrics``) and the slot table (``/api/slots``). ``tracing``: OpenTelemetry
    traces of model requests (:mod:`slmops.server.tracing`), shut down (flushed) with the app; None: none."""
    config = config or ServerConfig()
    metrics = runtime.metrics

    async def lifespan(app: FastAPI):
        runtime.start()
        if config.preload:
            try:
                await runtime.preload(config.preload)
            except SlmopsError as err:  # the server still serves everything else; say why the model is not there
                log.warning("could not load %s at start: %s", config.preload, err)
        yield
        try:
            await runtime.stop()
        finally:
            if tracing is not None:  # after the runtime: generations that end while it stops are in their spans
                await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(title="slmops", version=slmops.__version__, lifespan=lifespan, dependencies=[Depends(authorize)],
                  description="Ollama-compatible /api and OpenAI-compatible /v1 API for local small language models.")
    app.state.store = store
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.slots = runtime.resolver.slots
    app.state.config = config
    app.state.tracing = tracing
    app.include_router(ollama.router)
    if config.openai:
        app.include_router(openai.router)
        app.include_router(responses.router)
    feedback.install(app, config.home or store.root.parent, config.feedback)
    app.include_router(slots.router)
    _add_ops_routes(app)
    _add_error_handlers(app)

    # Outermost last: recorder, trace span, header checks, origin check + CORS (answers preflights, decorates
    # refusals), access, body checks, metrics. The span sits inside the recorder, whose request context names the
    # model a refused request asked for.
    app.add_middleware(Observed, metrics=metrics, version=slmops.__version__)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    if access is not None:
        app.add_middleware(Access, policy=access)
    app.add_middleware(OriginCheck, allow_origins=list(config.origins), allow_origin_regex=LOCAL_ORIGINS,
                       allow_methods=["*"], allow_headers=["*"], expose_headers=["Retry-After", "X-Request-Id"])
    app.add_middleware(HeaderCheck, bound_to=config.host, extra_hosts=config.extra_hosts)
    if tracing is not None:
        app.add_middleware(Traced, tracing=tracing)
    if access is not None:
        app.add_middleware(Recorder, policy=access)
    return app


def _add_ops_routes(app: FastAPI) -> None:
    @app.get("/", response_class=PlainTextResponse)
    @app.head("/", include_in_schema=False)
    async def root() -> str:
        return "slmops is running"

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        store: Store = request.app.state.store
        try:
            store.list()
            store.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return JSONResponse({"status": "not ready", "reason": "model store unreadable"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint(request: Request) -> Response:
        m: Metrics = request.app.state.metrics
        rt: ModelRuntime = request.app.state.runtime
        models = await asyncio.get_running_loop().run_in_executor(None, rt.engine.loaded)
        m.loaded_models.set(len(rt.models.loaded(models)))
        m.queue_depth.set(rt.models.queue_depth(models))
        m.in_flight.set(rt.models.in_flight())
        for model in models:
            m.batch_max.labels(model.name).set(model.max_batch)
            m.parallel.labels(model.name).set(model.n_parallel)
            m.fallbacks.labels(model.name).set(1 if model.fallback else 0)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


async def _count_failure(request: Request, err: SlmopsError) -> None:
    """A request's model failed on the server's side: counted per stored model (a served name through the slot
    table) for the fleet agent's health window. Needs the request's context, which the access layer opens."""
    ctx = request_access.current()
    if ctx is None or not ctx.model or ctx.failure_counted or not isinstance(err, (EngineError, IntegrityError)):
        return  # (a generation's failure is counted where it happened: server/inference.py)
    rt: ModelRuntime = request.app.state.runtime
    await rt.inference.count_failure(rt.resolver.stored_as(ctx.model), err)


def _add_error_handlers(app: FastAPI) -> None:
    def reply(request: Request, status: int, message: str, code: str | None = None,
              headers: list[tuple[bytes, bytes]] | None = None) -> JSONResponse:
        return errors.response(request.url.path, status, message, code, headers)

    @app.exception_handler(SlmopsError)
    async def slmops_error(request: Request, err: SlmopsError):
        await _count_failure(request, err)
        span = request_tracing.current()
        if span is not None:
            span.failed(err)
        return reply(request, errors.status_for(err), str(err), errors.openai_code(err), errors.headers_for(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return reply(request, 400, errors.validation_message(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        route = f"{request.method} {request.url.path}"[:200]
        message = {404: f"{route} is not a route of this server; see /docs for the API",
                   405: f"{route}: method not allowed on this route"}.get(err.status_code, str(err.detail))
        return reply(request, err.status_code, message)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, err: RecursionError):
        return reply(request, 400, "request JSON is nested too deeply")

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path, exc_info=err)
        return reply(request, 500, "internal server error; see the server log")
