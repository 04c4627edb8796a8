"""The stateless OpenAI Responses API (``/v1/responses``): pure converter and event-sequence tests, then a real
`slmops serve` process driven by the official `openai` client and by langchain-openai."""

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from slmops.api import responses as rsp
from slmops.engine import answers
from slmops.engine.client import Request
from slmops.engine.outputs import Output, Stats
from slmops.server import responses as route
from slmops.server import responses_convert as rc
from slmops.types.errors import InvalidInput

M = "smollm2:135m"
PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                           "unit": {"type": "string", "enum": ["c", "f"]}},
          "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": PARAMS, "strict": True}
TIME = {"type": "function", "name": "get_time", "description": "Time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"]}}
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
STATS = Stats(prompt_eval_count=10, prompt_eval_duration=1, eval_count=4, eval_duration=1, load_duration=0,
              total_duration=2, cached_prompt_tokens=3)


# -- pure: conversion ------------------------------------------------------------------------------------------
def body(**kw) -> rsp.ResponseRequest:
    return rsp.ResponseRequest.model_validate({"model": M, "input": "hi", **kw})


def test_input_items_become_chat_messages():
    b = body(instructions="Be brief.", input=[
        {"role": "developer", "content": "Use metric units."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "21 C"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "21 C at noon."}]}],
        tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=9,
        text={"format": {"type": "json_schema", "name": "x", "schema": PARAMS, "strict": True}})
    req = rc.from_request(b)
    assert req.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21 C", "tool_name": "get_weather"},
        {"role": "tool", "content": "noon", "tool_name": "get_time"},
        {"role": "assistant", "content": "21 C at noon."}]
    assert req.tool_choice == "get_time" and req.format == PARAMS and req.options["num_predict"] == 9
    assert req.tools[0] == {"type": "function", "function": {"name": "get_weather", "description":
                                                             "Current weather in a city", "parameters": PARAMS}}
    echo = rc.echo(b, req)
    assert echo["tools"][0] == WEATHER and echo["tool_choice"] == {"type": "function", "name": "get_time"}
    assert echo["text"] == {"format": {"type": "json_schema", "name": "x", "schema": PARAMS, "strict": True}}
    assert echo["temperature"] == 1.0 and echo["top_p"] == 1.0 and echo["truncation"] == "disabled"
    assert rc.from_request(body(text={"format": {"type": "json_object"}})).format == "json"
    assert rc.from_request(body(text={"format": {"type": "text"}})).format is None


@pytest.mark.parametrize("kw,words", [
    ({"previous_response_id": "resp_1"}, "previous_response_id is not supported"),
    ({"conversation": "conv_1"}, "conversation is not supported"),
    ({"tools": [{"type": "web_search"}, {"type": "file_search"}]}, "tool type file_search, web_search"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, 'tool_choice type "web_search_preview"'),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "support images"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 'item type "reasoning" is not supported'),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1"}]}, "not a JSON object"),
    ({"input": []}, "input is empty"),
])
def test_refusals_say_what_to_do(kw, words):
    with pytest.raises(InvalidInput) as err:
        rc.from_request(body(**kw))
    assert words in str(err.value) and "\n" not in str(err.value)


# -- pure: the event sequence ----------------------------------------------------------------------------------
def events_for(pieces: list[str], done_reason: str = "stop", tools: list | None = None) -> list[dict]:
    async def outputs():
        for p in pieces[:-1]:
            yield Output(text=p)
        yield Output(text=pieces[-1], done=True, done_reason=done_reason, stats=STATS)

    async def collect():
        ev = route._Events({"id": "resp_x", "created_at": 1, **rc.echo(body(), rc.from_request(body()))},
                           hold_blanks=bool(tools))
        return [e async for e in route._stream(answers.split_calls(outputs(), Request(messages=[], tools=tools)), ev)]
    return asyncio.run(collect())


def test_text_events_in_order_and_parsed_by_the_sdk():
    events = events_for(["Hel", "lo", " there", ""], "length")
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = openai.types.responses.ResponseIncompleteEvent.model_validate(events[-1]).response
    assert final.output_text == "Hello there" and final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens" and final.output[0].status == "incomplete"
    assert final.usage.input_tokens == 10 and final.usage.output_tokens == 4 and final.usage.total_tokens == 14
    assert final.usage.input_tokens_details.cached_tokens == 3
    for e in events:  # every event validates, strictly, as the SDK's own type of that name
        assert STREAM_EVENT.validate_python(e).type == e["type"]


def test_calls_close_the_message_and_blanks_open_nothing():
    tools = rc.to_tools(body(tools=[WEATHER]))
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    events = events_for(["Let me check. ", call[:20], call[20:], "\n", ""], tools=tools)
    types = [e["type"] for e in events]
    assert types[2:] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    final = openai.types.responses.ResponseCompletedEvent.model_validate(events[-1]).response
    message, fc = final.output
    assert message.content[0].text == "Let me check. " and fc.type == "function_call"
    assert json.loads(fc.arguments) == {"city": "Paris", "unit": "c"} and fc.call_id.startswith("call_")
    assert all(STREAM_EVENT.validate_python(e).type == e["type"] for e in events)
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert added[1]["id"] == fc.id and added[1]["arguments"] == "" and added[1]["status"] == "in_progress"
    blank = events_for([" ", "\n", ""], tools=tools)  # nothing but blanks: still one (blank) message
    assert [e["type"] for e in blank].count("response.output_item.added") == 1


def test_an_error_mid_stream_fails_the_response():
    async def outputs():
        yield Output(text="Hi")
        raise InvalidInput("prompt too long; shorten it")

    async def collect():
        ev = route._Events({"id": "resp_x", "created_at": 1, **rc.echo(body(), rc.from_request(body()))}, False)
        return [e async for e in route._stream(outputs(), ev)]
    events = asyncio.run(collect())
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert all(STREAM_EVENT.validate_python(e).type == e["type"] for e in events)
    assert events[-2]["message"] == "prompt too long; shorten it" and events[-2]["code"] == "invalid_prompt"
    failed = openai.types.responses.ResponseFailedEvent.model_validate(events[-1]).response
    assert failed.status == "failed" and failed.error.message == "prompt too long; shorten it"
    assert failed.output_text == "Hi" and failed.output[0].status == "incomplete"


# -- a real server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_text_usage_and_status(client, server):
    r = client.responses.create(model=M, input="Say hi", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == M and r.output_text
    assert r.output[0].type == "message" and r.output[0].role == "assistant" and r.output[0].id.startswith("msg_")
    u = r.usage
    assert 0 < u.output_tokens <= 8 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0 and u.input_tokens_details.cached_tokens >= 0
    assert (r.status == "incomplete") == (u.output_tokens == 8)
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert u.input_tokens == native_prompt_tokens(server, [{"role": "user", "content": "Say hi"}])
    assert r.previous_response_id is None and r.error is None and r.max_output_tokens == 8 and r.tools == []
    ins = client.responses.create(model=M, input="Say hi", instructions="Answer in French.", max_output_tokens=4)
    assert ins.instructions == "Answer in French." and ins.output_text
    assert ins.usage.input_tokens != u.input_tokens  # the instructions replace the model's own system prompt


def native_prompt_tokens(server, messages: list) -> int:
    return httpx.post(server.url + "/api/chat", timeout=120, json={
        "model": M, "messages": messages, "stream": False, "options": {"num_predict": 1}}).json()["prompt_eval_count"]


def test_conversation_as_a_list(client):
    convo = [{"role": "user", "content": "My name is Bob."},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hello Bob!"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]}]
    r = client.responses.create(model=M, input=convo, max_output_tokens=8, temperature=0)
    assert r.output_text and r.usage.input_tokens > 20


def test_structured_output_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=M, input="A person as JSON.", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.status == "completed" and r.text.format.type == "json_schema"


def test_forced_tool_call_then_its_result(client):
    r = client.responses.create(model=M, input="Weather in Paris?", tools=[WEATHER, TIME], tool_choice="required",
                                max_output_tokens=80)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and r.status == "completed" and r.output_text == ""
    call = calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.name]
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "21 C, sunny"}]
    again = client.responses.create(model=M, input=history, tools=[WEATHER, TIME], tool_choice="none",
                                    max_output_tokens=12, temperature=0)
    assert again.output_text and not [o for o in again.output if o.type == "function_call"]


def test_stream_events_and_text(client):
    events = list(client.responses.create(model=M, input="Name three colors.", max_output_tokens=10,
                                          temperature=0, stream=True))
    types, final = [e.type for e in events], events[-1].response
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{final.status}"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == events[-4].text == final.output_text
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    u = final.usage
    assert 0 < u.output_tokens <= 10 and u.total_tokens == u.input_tokens + u.output_tokens
    assert (final.status == "incomplete") == (u.output_tokens == 10)


def test_stream_sends_named_events_as_generated(server):
    """Raw SSE: an ``event:`` line per event, no ``[DONE]``, and the first delta well before the end."""
    seen: list[tuple[float, str, str]] = []
    with httpx.stream("POST", server.url + "/v1/responses", timeout=120, json={
            "model": M, "input": "Tell me a long story.", "max_output_tokens": 24, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                seen.append((time.perf_counter(), name, json.loads(line[6:])["type"]))
    assert all(name == kind for _, name, kind in seen)
    first = next(t for t, _, kind in seen if kind == "response.output_text.delta")
    assert seen[-1][1] in ("response.completed", "response.incomplete") and seen[-1][0] - first > 0.02


def test_stream_helper_with_a_forced_call(client):
    with client.responses.stream(model=M, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=80) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    (call,) = final.output
    assert call.name == "get_weather" and call.parsed_arguments == json.loads(call.arguments)  # strict: parsed
    jsonschema.validate(call.parsed_arguments, PARAMS)
    assert final.usage.output_tokens > 0


def test_http_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=M, input="hi", previous_response_id="resp_123")
    msg = err.value.body["message"]
    assert "previous_response_id" in msg and "input" in msg and "\n" not in msg
    assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=M, input="hi", tools=[{"type": "web_search"}])
    assert "web_search" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=M, input="hi", stream=True, previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=M, input="hi", temperature=5)
    assert "temperature" in err.value.body["message"]


def test_langchain_openai_responses_api(server):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model=M, base_url=server.url + "/v1", api_key="x", use_responses_api=True, max_tokens=8,
                     temperature=0)
    msg = llm.invoke("Say hi")
    assert msg.text and msg.usage_metadata["output_tokens"] > 0
