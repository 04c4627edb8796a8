"""One stream-to-answer collector and one tool-call parse, in the engine, for every route: pure tests of
:mod:`slmops.engine.answers`, then the real app (in process, a scripted fake engine, no model) showing that the
Ollama, OpenAI and Responses routes only shape the same parsed calls into their wire types."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from registry import tiny_gguf
from slot_server import FakeEngine, stored
from slmops.engine import answers
from slmops.engine.client import Request
from slmops.engine.outputs import Output, Stats, TokenLogprob, ToolCall
from slmops.server.app import ServerConfig, create_app
from slmops.server.runtime import ModelRuntime
from slmops.types.errors import EngineError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
STATS = Stats(5, 1_000_000, 3, 30_000_000, 0, 40_000_000)
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def lp(token: str, logprob: float) -> TokenLogprob:
    return TokenLogprob(token, logprob, token.encode())


def outputs(pieces: list[str], done_reason: str = "stop") -> list[Output]:
    outs = [Output(text=p, logprobs=(lp(p, -1.0 - i),), eval_count=i + 1) for i, p in enumerate(pieces[:-1])]
    return outs + [Output(text=pieces[-1], done=True, done_reason=done_reason, stats=STATS, context=(1, 2))]


async def _aiter(items: list[Output]):
    for item in items:
        yield item


async def _alist(items) -> list[Output]:
    return [item async for item in items]


# -- pure: the collector ----------------------------------------------------------------------------------------
def test_collect_gives_the_final_record_with_everything_in_it():
    whole = answers.collect(outputs(["Hel", "lo", "!"], "length"))
    assert whole.text == "Hello!" and whole.done and whole.done_reason == "length" and whole.stats == STATS
    assert [t.token for t in whole.logprobs] == ["Hel", "lo"] and whole.context == (1, 2)
    assert whole.tool_calls == ()
    assert asyncio.run(answers.acollect(_aiter(outputs(["Hel", "lo", "!"], "length")))) == whole


def test_collect_without_a_final_record_is_an_engine_error():
    with pytest.raises(EngineError, match="without a final record"):
        answers.collect([Output(text="cut")])
    with pytest.raises(EngineError):
        asyncio.run(answers.acollect(_aiter([])))


def test_collected_calls_strip_the_text_around_them():
    calls = (ToolCall("get_weather", {"city": "Paris"}),)
    pieces = [Output(text=" Sure. "), Output(tool_calls=calls), Output(text="\n", done=True, done_reason="stop")]
    whole = answers.collect(pieces)
    assert whole.text == "Sure." and whole.tool_calls == calls


# -- pure: tool calls parsed in the engine ----------------------------------------------------------------------
def test_split_calls_parses_only_the_tools_in_play():
    outs = outputs([CALL[:15], CALL[15:], ""])
    source = _aiter(outs)
    assert answers.split_calls(source, Request(messages=[])) is source  # no tools: the stream as it is
    none = Request(messages=[], tools=TOOLS, tool_choice="none")
    assert answers.offered_tools(none) is None  # described to no one, so not parsed either
    got = asyncio.run(_alist(answers.split_calls(_aiter(outs), Request(messages=[], tools=TOOLS))))
    assert len(got) == len(outs) and [o.eval_count for o in got] == [o.eval_count for o in outs]
    assert [o.text for o in got] == ["", "", ""] and got[1].tool_calls == (ToolCall("get_weather", {"city": "Paris"}),)
    assert got[0].logprobs == outs[0].logprobs  # a held-back piece still carries its tokens' logprobs


# -- the routes shape what the engine parsed -------------------------------------------------------------------
class ScriptedEngine(FakeEngine):
    """Answers every generation with ``pieces``, whatever it was asked."""

    def __init__(self, pieces: list[str]):
        super().__init__()
        self.pieces = pieces

    def start(self, spec: Any, req: Any, emit: Any) -> Any:
        self.load(spec)

        def produce() -> None:
            for out in outputs(self.pieces):
                emit(out)
        threading.Thread(target=produce, daemon=True).start()
        return lambda: None


@pytest.fixture(scope="module")
def app_client(tmp_path_factory) -> TestClient:
    home = tmp_path_factory.mktemp("answers")
    store = stored(home, tiny_gguf(home / "tiny.gguf"), "m:1")
    engine = ScriptedEngine(["Let me check. <tool_", "call>" + CALL[11:40], CALL[40:], "\n"])
    app = create_app(store, ModelRuntime(store, engine, keep_alive=300),  # type: ignore[arg-type]
                     ServerConfig(home=Path(home)))
    return TestClient(app, base_url="http://127.0.0.1")


def chat_body(**kw: Any) -> dict:
    return {"model": "m:1", "messages": [{"role": "user", "content": "Paris?"}], "tools": TOOLS, **kw}


def test_ollama_chat_gives_arguments_as_an_object(app_client):
    r = app_client.post("/api/chat", json=chat_body(stream=False)).json()
    assert r["message"]["content"] == "Let me check." and r["done_reason"] == "stop"
    assert r["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"},
                                                        "index": 0}}]
    lines = [json.loads(x) for x in app_client.post("/api/chat", json=chat_body()).text.splitlines()]
    assert "".join(x["message"]["content"] for x in lines) == "Let me check. \n"
    assert [x["message"].get("tool_calls") for x in lines if x["message"].get("tool_calls")] == [
        r["message"]["tool_calls"]] and lines[-1]["done"]


def test_openai_chat_gives_arguments_as_json_with_an_id(app_client):
    r = app_client.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]
    assert r["finish_reason"] == "tool_calls" and r["message"]["content"] == "Let me check."
    (call,) = r["message"]["tool_calls"]
    assert call["id"].startswith("call-") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    events = app_client.post("/v1/chat/completions", json=chat_body(stream=True)).text.split("\n\n")
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    deltas = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and deltas[0]["id"].startswith("call-")
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = app_client.post("/v1/chat/completions", json=chat_body(tool_choice="none")).json()["choices"][0]
    assert plain["finish_reason"] == "stop" and plain["message"]["tool_calls"] is None  # not offered: only text
    assert CALL[11:] in plain["message"]["content"]


def test_responses_give_a_function_call_item(app_client):
    r = app_client.post("/v1/responses", json={"model": "m:1", "input": "Paris?", "tools": [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}).json()
    message, call = r["output"]
    assert message["content"][0]["text"] == "Let me check." and call["type"] == "function_call"
    assert call["call_id"].startswith("call_") and json.loads(call["arguments"]) == {"city": "Paris"}
