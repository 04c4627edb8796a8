"""Streaming bodies: NDJSON for ``/api``, server-sent events for ``/v1``.

Errors before the first piece become ordinary error responses (the status still means something then); an error
after the first piece can only be reported in the stream itself, as Ollama and OpenAI do.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from slmops.server import errors
from slmops.types.errors import SlmopsError

log = logging.getLogger("slmops.server")


async def prime(agen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Pull the first item now (raising request errors here) and return an iterator that replays it."""
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = None
        empty = True
    else:
        empty = False

    async def replay() -> AsyncIterator[Any]:
        if not empty:
            yield first
        async for item in agen:
            yield item

    return replay()


def error_message(err: BaseException) -> str:
    """What a client is told of an error raised after its stream began: ours as they are, others only logged."""
    if isinstance(err, SlmopsError):
        return str(err)
    log.exception("error while streaming", exc_info=err)
    return "internal error while generating; see the server log"


def ndjson(items: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        except Exception as err:  # noqa: BLE001 - reported in-stream, the status line is already sent
            yield (json.dumps({"error": error_message(err)}) + "\n").encode()
    return StreamingResponse(body(), media_type="application/x-ndjson")


def sse(items: AsyncIterator[dict], path: str = "/v1/") -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield f"data: {json.dumps(item, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
        except Exception as err:  # noqa: BLE001
            status = errors.status_for(err) if isinstance(err, SlmopsError) else 500
            yield f"data: {json.dumps(errors.body(path, status, error_message(err)))}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


CLIENT_GONE = 499  # nginx's "client closed request": what the access log shows for it


def stops_when_gone(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A generating route whose work is cancelled when its client disconnects, as Ollama's handlers are. A stream
    notices by itself (its next write fails), but a request that is not streamed writes nothing until its answer
    is whole, so without this it would decode to its end for no one. The route's body must be a parameter (read
    before the handler runs): the watch reads what the client sends next, and only a disconnect can come."""

    @functools.wraps(handler)
    async def run(*args: Any, request: Request, **kwargs: Any) -> Any:
        work = asyncio.ensure_future(handler(*args, request=request, **kwargs))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            gone.cancel()
        if not work.done() and gone.exception() is None:  # the watch ended first: a disconnect
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)  # its generation is cancelled before the reply
            return Response(status_code=CLIENT_GONE)
        return await work
    return run


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def amap(fn: Callable[[Any], Any], items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in items:
        yield fn(item)
