"""The control plane in process, started as ``slmops fleet serve`` starts it (the app's lifespan: change feed,
caches, report batcher) and reached through httpx's ASGI transport: the shape of the fleet's route tests on SQLite
and PostgreSQL, without a server process.

    async with serving(ControlPlane(Database(url))) as transport:
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx

from slmops.fleet.control.app import ControlPlane, create_app

T = TypeVar("T")
BASE_URL = "http://fleet"


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(plane: ControlPlane) -> AsyncIterator[httpx.ASGITransport]:
    """A transport to ``plane``'s app while its lifespan runs; the lifespan ends (caches, batcher) on exit."""
    app = create_app(plane)
    async with app.router.lifespan_context(app):
        yield httpx.ASGITransport(app=app)


async def eventually(check: Callable[[], Any], what: str, within: float = 30.0) -> None:
    """Liveness, not speed: poll ``check`` (sync or async) until it holds, within a generous deadline."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)
