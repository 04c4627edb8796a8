"""A real `slmops serve` process driven by the official `openai` Python client."""

import json

import jsonschema
import numpy as np
import openai
import pytest

M = "smollm2:135m"
Q = [{"role": "user", "content": "Name three colors."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                                                        "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_models(client):
    assert [m.id for m in client.models.list().data] == [M]
    assert client.models.retrieve(M).id == M
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found"


def test_chat_completion_usage_and_length(client, server):
    r = client.chat.completions.create(model=M, messages=Q, max_tokens=7, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and c.message.role == "assistant"
    assert c.finish_reason == "length" and r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    import httpx
    native = httpx.post(server.url + "/api/chat", json={"model": M, "messages": Q, "stream": False,
                                                         "options": {"num_predict": 1}}).json()
    assert r.usage.prompt_tokens == native["prompt_eval_count"]
    r2 = client.chat.completions.create(model=M, messages=Q, max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens == 3


def test_stream_with_usage_matches_non_stream(client):
    full = client.chat.completions.create(model=M, messages=Q, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=M, messages=Q, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_seed_n(client):
    cut = client.completions.create(model=M, prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0,
                                    frequency_penalty=0, stop=["9"])
    assert cut.choices[0].text.strip() == "6, 7, 8," and cut.choices[0].finish_reason == "stop"
    a = client.chat.completions.create(model=M, messages=Q, max_tokens=16, temperature=1.0, seed=7)
    b = client.chat.completions.create(model=M, messages=Q, max_tokens=16, temperature=1.0, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    two = client.chat.completions.create(model=M, messages=Q, max_tokens=6, n=2, temperature=1.0, seed=1)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 12


def test_logprobs(client):
    r = client.chat.completions.create(model=M, messages=Q, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, frequency_penalty=0)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and bytes(t.bytes).decode("utf-8", "replace") == t.token
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_response_format_json_object_and_schema(client):
    r = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "A JSON object for a cat."}],
                                       response_format={"type": "json_object"}, max_tokens=1500, temperature=0)
    if r.choices[0].finish_reason == "stop":  # a grammar bounds the shape, not the length
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.lstrip().startswith("{")
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                               "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                        "maxItems": 3}},  # bounded: it always fits max_tokens
              "required": ["title", "year", "tags"], "additionalProperties": False}
    for seed in (1, 2, 3):
        r = client.chat.completions.create(
            model=M, messages=[{"role": "user", "content": "Describe a movie."}], seed=seed, max_tokens=300,
            response_format={"type": "json_schema", "json_schema": {"name": "movie", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_validate(client, choice):
    for seed in (1, 2):
        r = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "Paris?"}],
                                           tools=[WEATHER, TIME], tool_choice=choice, seed=seed, max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, repr(c.message.content)
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call-")
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_forced_tool_call_streams_and_history_round_trips(client):
    chunks = list(client.chat.completions.create(model=M, messages=[{"role": "user", "content": "Weather?"}],
                                                 tools=[WEATHER], tool_choice="required", stream=True,
                                                 max_tokens=200, seed=1))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert {d.index for d in deltas} == {0}  # one call, streamed as OpenAI does: named, then its arguments
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call-")
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)),
                        WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "tool_calls": [{"id": "call-1", "type": "function",
                                                     "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris", "unit": "c"}'}}]},
               {"role": "tool", "tool_call_id": "call-1", "content": "21 C, sunny"}]
    r = client.chat.completions.create(model=M, messages=history, tools=[WEATHER], max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    r = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                       tool_choice="none", max_tokens=5, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_completions(client):
    r = client.completions.create(model=M, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.object == "text_completion" and "Paris" in r.choices[0].text and r.usage.completion_tokens <= 3
    e = client.completions.create(model=M, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  echo=True, logprobs=2)
    assert e.choices[0].text == "The capital of France is" + r.choices[0].text
    lp = e.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) == 2 for t in lp.top_logprobs)
    parts = list(client.completions.create(model=M, prompt="The capital of France is", max_tokens=3,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason in ("length", "stop")
    two = client.completions.create(model=M, prompt=["One, two,", "A, B,"], max_tokens=2, temperature=0)
    assert len(two.choices) == 2


def test_embeddings_float_and_base64(client):
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    r = client.embeddings.create(model=M, input=texts)  # the client asks for base64 and decodes it
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 576) and r.usage.prompt_tokens > 10
    f = client.embeddings.create(model=M, input=texts, encoding_format="float")
    assert np.allclose(np.array([d.embedding for d in f.data]), v, atol=1e-6)
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2]


def test_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=M, messages=Q, temperature=5)
    assert err.value.body["type"] == "invalid_request_error" and "temperature" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=Q)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=M, messages=Q, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "not among the tools" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=M, messages=[])
