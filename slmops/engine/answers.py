"""A generation's outputs made into answers: tool calls parsed out as they complete, and a stream gathered into
one final record.

Each is done here once, for every caller: the Ollama, OpenAI and Responses routes and the Python API only shape
what comes out into their own types. Parsing needs the request (its tools and tool choice) but not the model, so
it runs on the outputs an ``EngineClient`` hands back, in whichever process holds them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, AsyncIterable, AsyncIterator, Iterable

from slmops.engine.client import Request
from slmops.engine.outputs import Output, TokenLogprob, ToolCall
from slmops.engine.tools import CallStream
from slmops.types.errors import EngineError


def offered_tools(req: Request) -> list[dict[str, Any]] | None:
    """The tools a generation may call. With ``tool_choice`` "none" the prompt describes none, so text that
    looks like a call is only text."""
    return req.tools if req.tools and req.tool_choice != "none" else None


def split_calls(outputs: AsyncIterator[Output], req: Request) -> AsyncIterator[Output]:
    """``outputs`` with the request's tool calls parsed out (see :meth:`CallStream.split`): text still streams
    as it comes, and a call goes out as soon as it is whole. Without tools, ``outputs`` as they are."""
    tools = offered_tools(req)
    if tools is None:
        return outputs
    return _split(outputs, CallStream(tools))


async def _split(outputs: AsyncIterator[Output], stream: CallStream) -> AsyncIterator[Output]:
    async for out in outputs:
        yield stream.split(out)


class Gatherer:
    """Adds up the outputs of one generation into the whole answer.

    The answer is the final record as if everything had come in one piece: all the text, every token's
    logprobs and every tool call. With calls, the text around them is stripped: it is mostly the blanks
    between calls, which a client would otherwise show as an empty message.
    """

    def __init__(self) -> None:
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._calls: list[ToolCall] = []
        self._final: Output | None = None

    def add(self, out: Output) -> None:
        self._text.append(out.text)
        self._logprobs.extend(out.logprobs)
        self._calls.extend(out.tool_calls)
        if out.done:
            self._final = out

    def answer(self) -> Output:
        if self._final is None:
            raise EngineError("generation ended without a final record; try again")
        text = "".join(self._text)
        return replace(self._final, text=text.strip() if self._calls else text, logprobs=tuple(self._logprobs),
                       tool_calls=tuple(self._calls))


def collect(outputs: Iterable[Output]) -> Output:
    """The whole answer of a stream (the Python API's non-streamed calls)."""
    gathered = Gatherer()
    for out in outputs:
        gathered.add(out)
    return gathered.answer()


async def acollect(outputs: AsyncIterable[Output]) -> Output:
    """The whole answer of an async stream (the server's non-streamed requests)."""
    gathered = Gatherer()
    async for out in outputs:
        gathered.add(out)
    return gathered.answer()
