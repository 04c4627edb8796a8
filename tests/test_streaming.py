"""Stream bodies: an error after the first piece is reported in the stream itself (no live server needed)."""

import asyncio
import json

from slmops.server.streaming import ndjson, sse
from slmops.types.errors import ContextOverflow


async def pieces():
    yield {"response": "a", "done": False}
    raise ContextOverflow("context is full")


def body_of(response) -> bytes:
    async def read():
        return b"".join([chunk async for chunk in response.body_iterator])
    return asyncio.run(read())


def test_ndjson_error_mid_stream_is_a_final_error_line():
    lines = body_of(ndjson(pieces())).decode().splitlines()
    assert json.loads(lines[0]) == {"response": "a", "done": False}
    assert json.loads(lines[-1]) == {"error": "context is full"}


def test_sse_error_mid_stream_then_done():
    events = [e for e in body_of(sse(pieces())).decode().split("\n\n") if e]
    assert json.loads(events[1].removeprefix("data: "))["error"]["message"] == "context is full"
    assert events[-1] == "data: [DONE]"
