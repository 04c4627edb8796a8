"""The control plane's ASGI app: ``/fleet/v1`` for operators and devices, an OpenAPI document, one error table.

Stateless between requests: everything lives in the database, and what a replica caches (operator keys, device
keys, desired-state ETags) is dropped when the database's change version moves (``ControlPlane.watch``), so
replicas behind one load balancer agree within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

import slmops
from slmops.fleet.control.changes import OnChange
from slmops.fleet.control.db import Database
from slmops.fleet.control.metrics import ControlMetrics, RequestMetrics
from slmops.server import errors
from slmops.types.errors import SlmopsError

log = logging.getLogger("slmops.fleet")
READY_TIMEOUT_S = 2.0  # a database slower than this to answer SELECT 1 leaves the replica not ready


@dataclass
class ControlPlane:
    """What the routes share; side effects (clock, database, trust) come in here, never from globals."""

    db: Database
    trusted_keys: tuple[Path, ...] = ()  # release variant signatures must verify against one of these
    allow_private_registries: bool = False
    registry_insecure: bool = False
    poll_interval_s: float = 30.0
    root_key: Path | None = None  # the fleet root key's file (made if absent); None: in memory only (embedding, tests)
    metadata_ttl_s: float = 3600.0  # signed desired state expires this long after it is issued
    rollout_tick_s: float = 1.0  # rollouts are judged this often (SLMOPS_FLEET_TICK); 0: never (tests tick by hand)
    clock: Callable[[], float] = time.time
    extras: dict = field(default_factory=dict)  # per-module state (caches, batchers), keyed by module
    watchers: list[OnChange] = field(default_factory=list)  # told of every change version seen
    metrics: ControlMetrics = field(default_factory=ControlMetrics)  # this replica's /metrics

    def watch(self, on_change: OnChange) -> None:
        """Have ``on_change(version, devices)`` called when the database's change version moves (a mutation here
        or on another replica; ``devices``: what it concerns, None for everything: ``changes.ChangeFeed``). One
        feed per replica serves every watcher: one poll loop, one LISTEN connection."""
        self.watchers.append(on_change)

    def changed(self, version: int, devices: frozenset[str] | None = None) -> None:
        for on_change in list(self.watchers):
            try:
                on_change(version, devices)
            except Exception:  # noqa: BLE001 - one cache's failure must not keep the others stale
                log.exception("change watcher %r failed on version %d", on_change, version)


def create_app(plane: ControlPlane) -> FastAPI:
    from slmops.fleet.control import changes, routes_admin, routes_device, routes_releases, routes_rollouts, trust

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await plane.db.migrate()
        async with contextlib.AsyncExitStack() as stack:
            for hook in (routes_admin.lifespan, routes_releases.lifespan, trust.lifespan, routes_device.lifespan,
                         routes_rollouts.lifespan):
                await stack.enter_async_context(hook(plane))
            await stack.enter_async_context(changes.ChangeFeed(plane.db, on_change=plane.changed))  # stops first
            yield
        plane.watchers.clear()
        await plane.db.close()

    app = FastAPI(title="slmops fleet control plane", version=slmops.__version__, lifespan=lifespan,
                  openapi_url="/fleet/v1/openapi.json", docs_url="/fleet/v1/docs", redoc_url=None,
                  # FastAPI's OpenTelemetry hooks read the environment on every request (~7 µs a poll)
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.plane = plane
    app.include_router(routes_device.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_releases.router)
    from slmops.fleet.control import routes_feedback
    app.include_router(routes_feedback.router)
    app.include_router(routes_rollouts.router)
    app.add_middleware(routes_device.DeviceFastPath)  # polls and reports: answered before FastAPI's routing
    app.add_middleware(RequestMetrics, metrics=plane.metrics)  # outermost: counts the fast path's answers too

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        # Liveness (/health) says the process answers; readiness says it can do its work, which needs the
        # database: a replica that cannot reach it is taken out of the load balancer, not restarted.
        try:
            await asyncio.wait_for(_ping(plane.db), READY_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - any failure to answer means not ready; the reason is logged
            log.warning("not ready: the database does not answer (%s)", type(err).__name__)
            return JSONResponse({"status": "not ready", "reason": "the database does not answer"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        await plane.metrics.refresh(plane)
        return Response(generate_latest(plane.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def reply(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(SlmopsError)
    async def slmops_error(request: Request, err: SlmopsError) -> JSONResponse:
        status = errors.status_for(err)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return reply(status, str(err), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return reply(400, errors.validation_message(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        route = f"{request.method} {request.url.path}"[:200]
        message = {404: f"{route} is not a route of the control plane; see /fleet/v1/docs",
                   405: f"{route}: method not allowed on this route"}.get(err.status_code, str(err.detail))
        return reply(err.status_code, message)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=err)
        return reply(500, "internal error; see the control plane's log")

    return app


async def _ping(db: Database) -> None:
    async with db.read() as s:
        await s.execute(text("SELECT 1"))
