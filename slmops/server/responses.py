"""OpenAI's Responses API (``POST /v1/responses``), stateless: the same engine chat request as ``/v1/chat``.

Streams are server-sent events with an ``event:`` line naming each event's ``type`` and no ``[DONE]`` marker,
as OpenAI sends them. Text goes out as it is generated; with tools, ``CallStream`` holds back only what may
still become a call, and each call goes out as its own ``function_call`` item once complete.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from slmops.api import responses as rsp
from slmops.engine import answers
from slmops.engine.outputs import Output, ToolCall
from slmops.server import errors, knowledge, streaming
from slmops.server import responses_convert as rc
from slmops.server.runtime import ModelRuntime
from slmops.types.errors import EngineError, SlmopsError

router = APIRouter(prefix="/v1")


@router.post("/responses")
@streaming.stops_when_gone
async def create_response(body: rsp.ResponseRequest, request: Request, response: Response):
    """With knowledge, the chunks given to the model are named in the :data:`knowledge.HEADER` header."""
    rt: ModelRuntime = request.app.state.runtime
    req = rc.from_request(body)
    name, spec = rt.resolver.resolve(body.model)
    req, _ = await knowledge.look_up(request.app.state, name, spec, req, rt.admission.default_keep_alive, response)
    base = {"id": rc.new_id("resp"), "created_at": int(time.time()), **rc.echo(body, req)}
    outputs = answers.split_calls(rt.inference.stream(spec, req, rt.admission.default_keep_alive), req)
    if body.stream:
        events = _Events(base, hold_blanks=answers.offered_tools(req) is not None)
        return knowledge.headed(_sse(_stream(await streaming.prime(outputs), events)), response)
    answer = await answers.acollect(outputs)
    incomplete = answer.done_reason == "length"
    return rsp.Response(**base, completed_at=int(time.time()), status="incomplete" if incomplete else "completed",
                        incomplete_details=rsp.IncompleteDetails() if incomplete else None,
                        output=rc.output_items(answer.text, answer.tool_calls, incomplete),
                        usage=rc.usage(answer.stats))


class _Events:
    """The event sequence of one streamed response: numbered events, output items opened and closed in order.

    Text opens a message item; a function call closes it first, so items never interleave. With tools, blank
    text is held until something visible follows, so whitespace around calls does not open empty messages.
    """

    def __init__(self, base: dict[str, Any], hold_blanks: bool):
        self.base = base
        self.hold_blanks = hold_blanks
        self.seq = 0
        self.output: list[rsp.OutputItem] = []  # finished items, in output order
        self.msg_id: str | None = None  # the open message item, if any
        self.msg_text: list[str] = []
        self.blank = ""  # held whitespace (with tools)

    def _ev(self, cls: type[BaseModel], **fields: Any) -> dict:
        event = cls(sequence_number=self.seq, **fields).model_dump(exclude_none=False)
        self.seq += 1
        return event

    def response(self, status: str, final: Output | None = None, error: rsp.ResponseError | None = None
                 ) -> rsp.Response:
        output = list(self.output) if status != "in_progress" else []
        if status == "failed" and self.msg_id is not None:  # what was said before the failure, marked cut off
            output.append(rc.message(self.msg_id, "".join(self.msg_text), "incomplete"))
        return rsp.Response(**self.base, status=status, output=output,
                            completed_at=int(time.time()) if status in ("completed", "incomplete") else None,
                            incomplete_details=rsp.IncompleteDetails() if status == "incomplete" else None,
                            usage=rc.usage(final.stats) if final is not None else None, error=error)

    def start(self) -> list[dict]:
        r = self.response("in_progress")
        return [self._ev(rsp.ResponseEvent, type="response.created", response=r),
                self._ev(rsp.ResponseEvent, type="response.in_progress", response=r)]

    def text(self, piece: str) -> list[dict]:
        if not piece:
            return []
        if self.msg_id is None and self.hold_blanks and not (self.blank + piece).strip():
            self.blank += piece
            return []
        events = self._open_message() if self.msg_id is None else []
        piece, self.blank = self.blank + piece, ""
        self.msg_text.append(piece)
        return events + [self._ev(rsp.TextDeltaEvent, item_id=self.msg_id, output_index=len(self.output),
                                  delta=piece)]

    def _open_message(self) -> list[dict]:
        self.msg_id, self.msg_text = rc.new_id("msg"), []
        index = len(self.output)
        return [self._ev(rsp.OutputItemEvent, type="response.output_item.added", output_index=index,
                         item=rc.message(self.msg_id, "", "in_progress").model_copy(update={"content": []})),
                self._ev(rsp.ContentPartEvent, type="response.content_part.added", item_id=self.msg_id,
                         output_index=index, part=rsp.OutputText(text=""))]

    def _close_message(self, status: str = "completed") -> list[dict]:
        if self.msg_id is None:
            return []
        item, index = rc.message(self.msg_id, "".join(self.msg_text), status), len(self.output)
        self.output.append(item)
        self.msg_id = None
        return [self._ev(rsp.TextDoneEvent, item_id=item.id, output_index=index, text=item.content[0].text),
                self._ev(rsp.ContentPartEvent, type="response.content_part.done", item_id=item.id,
                         output_index=index, part=item.content[0]),
                self._ev(rsp.OutputItemEvent, type="response.output_item.done", output_index=index, item=item)]

    def call(self, call: ToolCall) -> list[dict]:
        events = self._close_message()
        self.blank = ""
        item, index = rc.function_call(call), len(self.output)
        self.output.append(item)
        added = item.model_copy(update={"status": "in_progress", "arguments": ""})
        return events + [
            self._ev(rsp.OutputItemEvent, type="response.output_item.added", output_index=index, item=added),
            self._ev(rsp.ArgumentsDeltaEvent, item_id=item.id, output_index=index, delta=item.arguments),
            self._ev(rsp.ArgumentsDoneEvent, item_id=item.id, output_index=index, name=item.name,
                     arguments=item.arguments),
            self._ev(rsp.OutputItemEvent, type="response.output_item.done", output_index=index, item=item)]

    def finish(self, final: Output) -> list[dict]:
        """Close what is open; a response with no item at all still gets its (empty) message, as unstreamed."""
        incomplete = final.done_reason == "length"
        events = self._open_message() if self.msg_id is None and not self.output else []
        if self.blank and self.msg_id is not None:  # an all-blank answer; after calls, blanks are dropped
            self.msg_text.append(self.blank)
            events.append(self._ev(rsp.TextDeltaEvent, item_id=self.msg_id, output_index=len(self.output),
                                   delta=self.blank))
        self.blank = ""
        events += self._close_message("incomplete" if incomplete else "completed")
        status = "incomplete" if incomplete else "completed"
        return events + [self._ev(rsp.ResponseEvent, type=f"response.{status}",
                                  response=self.response(status, final))]

    def fail(self, err: Exception) -> list[dict]:
        """An error after the stream began: OpenAI's ``error`` event, then ``response.failed``."""
        message, code = streaming.error_message(err), _code(err)
        return [self._ev(rsp.ErrorEvent, code=code, message=message),
                self._ev(rsp.ResponseEvent, type="response.failed", response=self.response(
                    "failed", error=rsp.ResponseError(code=code, message=message)))]


def _code(err: Exception) -> str:
    status = errors.status_for(err) if isinstance(err, SlmopsError) else 500
    return {400: "invalid_prompt", 429: "rate_limit_exceeded"}.get(status, "server_error")


async def _stream(outputs: AsyncIterator[Output], ev: _Events) -> AsyncIterator[dict]:
    """Events for each piece of :func:`answers.split_calls`: text, then the calls it completed."""
    for event in ev.start():
        yield event
    final: Output | None = None
    try:
        async for out in outputs:
            final = out if out.done else final
            for event in ev.text(out.text) + [e for c in out.tool_calls for e in ev.call(c)]:
                yield event
        if final is None:
            raise EngineError("generation ended without a final record; try again")
        for event in ev.finish(final):
            yield event
    except Exception as err:  # noqa: BLE001 - reported in-stream, the status line is already sent
        for event in ev.fail(err):
            yield event


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """``streaming.sse`` writes ``data:`` lines only; the Responses API names each event too."""
    async def body() -> AsyncIterator[bytes]:
        async for event in events:
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            yield f"event: {event['type']}\ndata: {data}\n\n".encode()
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
