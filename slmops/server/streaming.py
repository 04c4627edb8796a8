"""Streaming bodies: NDJSON for ``/api``, server-sent events for ``/v1``.

Errors before the first piece become ordinary error responses (the status still means something then); an error
after the first piece can only be reported in the stream itself, as Ollama and OpenAI do.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

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


async def amap(fn: Callable[[Any], Any], items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in items:
        yield fn(item)
