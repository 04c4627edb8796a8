"""The HTTP server's application factory. State lives on ``app.state``; nothing here is a module global.

Middlewares, outermost first: the audit recorder, header checks (DNS rebinding, encoding), origin check and CORS,
access (keys, roles, rate limits), body checks (size, JSON), metrics. Every error, from any layer, is mapped once
here into Ollama's or OpenAI's error shape by path.
"""

from __future__ import annotations

import asyncio

import ipaddress
import json
import logging
import re
import socket
import time
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import slmops
from slmops.server import errors, ollama, openai
from slmops.server.access import Access, AccessPolicy, Recorder, authorize
from slmops.server.metrics import Metrics
from slmops.server.runtime import ModelRuntime
from slmops.store.store import Store
from slmops.types.errors import SlmopsError

log = logging.getLogger("slmops.server")

LOCAL_ORIGINS = r"(https?|app|file|tauri|vscode-webview)://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:\d+)?|" \
                r"(app|file|tauri|vscode-webview)://.*"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    origins: tuple[str, ...] = ()
    max_request_bytes: int = 16 << 20
    max_blob_bytes: int = 64 << 30  # /api/blobs uploads (model weights)
    extra_hosts: tuple[str, ...] = field(default_factory=tuple)
    openai: bool = True  # mount /v1 (SLMOPS_OPENAI_COMPATIBLE)
    preload: str | None = None  # a model to load at start (SLMOPS_MODEL)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_allowed(header: str, extra: tuple[str, ...]) -> bool:
    """Names a browser may legitimately use for a loopback server; anything else is a rebinding attempt."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    if not host or is_loopback(host) or host.endswith(".localhost"):
        return True
    return host in extra or host == socket.gethostname().lower()


def _one_line_validation(err: RequestValidationError) -> str:
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return "invalid JSON in request body"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid request")
    return f"{loc}: {msg}" if loc else msg


class HeaderCheck:
    """What the headers alone condemn. Bound to loopback, answer only loopback names: a page on another site
    cannot rebind its name to us. Header values must be UTF-8: every layer after this one may decode them."""

    def __init__(self, app: ASGIApp, config: ServerConfig):
        self.app = app
        self.config = config
        self.check_host = is_loopback(config.host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                try:
                    value.decode()
                except UnicodeDecodeError:
                    header = name.decode("latin-1")[:40]
                    return await _reject(scope, receive, send, 400, f"header {header} is not valid UTF-8; send "
                                         "its value as UTF-8 text")
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            if self.check_host and not _host_allowed(host, self.config.extra_hosts):
                return await _reject(scope, receive, send, 403, "host not allowed: this server answers only "
                                     "loopback names (DNS rebinding protection)")
        await self.app(scope, receive, send)


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class OriginCheck(CORSMiddleware):
    """CORS that refuses, not only hides. A browser sends a "simple" cross-site request (a ``text/plain`` POST)
    without asking first, and CORS alone would only keep the answer from the page after the request ran: any web
    page could create, copy, pull or delete models. A request from an origin that is not allowed is a 403 before
    any handler runs (as Ollama does), and a browser's request with a body must be ``application/json`` (which a
    browser cannot send cross-site without the preflight this refuses). Clients that are not browsers send no
    ``Origin``, and keep Ollama's leniency: ``curl -d`` posts JSON with a form type."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers", []))
            origin = headers.get(b"origin")
            if origin is not None:
                shown = origin.decode()
                if not self.is_allowed_origin(shown):
                    return await _reject(scope, receive, send, 403, f'origin "{shown[:100]}" is not allowed; add it '
                                         "to SLMOPS_ORIGINS to let pages from it call this server")
            browser = origin is not None or b"sec-fetch-site" in headers
            if browser and scope["method"] in _BODY_METHODS and not scope.get("path", "").startswith("/api/blobs/"):
                kind = headers.get(b"content-type", b"").decode().split(";")[0].strip().lower()
                if kind != "application/json":
                    return await _reject(scope, receive, send, 415, "a request from a browser must send "
                                         "Content-Type: application/json")
        await super().__call__(scope, receive, send)


# A UTF-16 surrogate escape without its partner, or a surrogate encoded in UTF-8 bytes (which Python's JSON decoder
# passes through): either makes a string that cannot be encoded again, so every later layer would fail on it.
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|"
                             rb"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")


def _has_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _surrogate_in(body: bytes) -> bool:
    """Exact, but parses only bodies the pattern flags (an escaped backslash can make it flag valid text)."""
    if not _LONE_SURROGATE.search(body):
        return False
    try:
        return _has_surrogate(json.loads(body))
    except (ValueError, RecursionError):
        return False  # not JSON: the route's own parsing answers it


class BodyLimit:
    """Request-size limit, as raw ASGI so oversized bodies are refused before buffering; and text that is not
    Unicode (a lone surrogate) is refused here, once, rather than failing wherever it is encoded later."""

    def __init__(self, app: ASGIApp, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path.startswith("/api/blobs/"):
            return await self.app(scope, receive, send)
        if headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # Ollama reads every body as JSON whatever its Content-Type (curl -d sends a form type)
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        limit = self.config.max_request_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reject(scope, receive, send, 413, f"request body is larger than {limit} bytes")
        body = bytearray()
        while True:  # JSON bodies are read whole anyway; reading them here lets a chunked one be cut off at the limit
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                return await _reject(scope, receive, send, 413, f"request body is larger than {limit} bytes")
            if not message.get("more_body", False):
                break
        if _surrogate_in(bytes(body)):
            return await _reject(scope, receive, send, 400, "request text holds an unpaired UTF-16 surrogate (such "
                                 "as \\ud800), which is not Unicode; send valid text")
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reject(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    await errors.response(scope.get("path", ""), status, message)(scope, receive, send)


def create_app(store: Store, runtime: ModelRuntime, config: ServerConfig | None = None,
               metrics: Metrics | None = None, access: AccessPolicy | None = None) -> FastAPI:
    """``access``: keys, rate limits and audit; without one, no auth (in-process tests of other layers)."""
    config = config or ServerConfig()
    metrics = metrics or Metrics()
    runtime.on_generation = metrics.generation
    runtime.on_cancel = lambda model: metrics.cancelled.labels(model).inc()

    async def lifespan(app: FastAPI):
        runtime.start()
        if config.preload:
            try:
                await runtime.preload(config.preload)
            except SlmopsError as err:  # the server still serves everything else; say why the model is not there
                log.warning("could not load %s at start: %s", config.preload, err)
        yield
        await runtime.stop()

    app = FastAPI(title="slmops", version=slmops.__version__, lifespan=lifespan, dependencies=[Depends(authorize)],
                  description="Ollama-compatible /api and OpenAI-compatible /v1 API for local small language models.")
    app.state.store = store
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.config = config
    app.include_router(ollama.router)
    if config.openai:
        app.include_router(openai.router)
    _add_ops_routes(app)
    _add_error_handlers(app)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        label = getattr(route, "path", "unmatched")
        metrics.requests.labels(label, request.method, str(response.status_code)).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - t0)
        return response

    # Outermost last: recorder, header checks, origin check + CORS (answers preflights, decorates refusals),
    # access, body checks, metrics.
    app.add_middleware(BodyLimit, config=config)
    if access is not None:
        app.add_middleware(Access, policy=access)
    app.add_middleware(OriginCheck, allow_origins=list(config.origins), allow_origin_regex=LOCAL_ORIGINS,
                       allow_methods=["*"], allow_headers=["*"], expose_headers=["Retry-After", "X-Request-Id"])
    app.add_middleware(HeaderCheck, config=config)
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
        m.loaded_models.set(len(rt.loaded(models)))
        m.queue_depth.set(rt.queue_depth(models))
        m.in_flight.set(rt.in_flight())
        for model in models:
            m.batch_max.labels(model.name).set(model.max_batch)
            m.parallel.labels(model.name).set(model.n_parallel)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


def _add_error_handlers(app: FastAPI) -> None:
    def reply(request: Request, status: int, message: str, code: str | None = None,
              headers: list[tuple[bytes, bytes]] | None = None) -> JSONResponse:
        return errors.response(request.url.path, status, message, code, headers)

    @app.exception_handler(SlmopsError)
    async def slmops_error(request: Request, err: SlmopsError):
        return reply(request, errors.status_for(err), str(err), errors.openai_code(err), errors.headers_for(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return reply(request, 400, _one_line_validation(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(err.status_code, str(err.detail))
        return reply(request, err.status_code, message)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, err: RecursionError):
        return reply(request, 400, "request JSON is nested too deeply")

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path, exc_info=err)
        return reply(request, 500, "internal server error; see the server log")
