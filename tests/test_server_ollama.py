"""A real `slmops serve` process driven by the official `ollama` Python client (and raw HTTP where the client
has no call)."""

import json
from datetime import datetime, timedelta, timezone


from conftest import HTTP
import jsonschema
import numpy as np
import ollama
import slmops
import pytest

M = "smollm2:135m"
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def test_list_show_version(client, server):
    models = client.list().models
    assert [m.model for m in models] == [M]
    assert models[0].details.family == "llama" and models[0].details.quantization_level == "Q4_1"
    assert models[0].size > 90_000_000 and len(models[0].digest) == 64
    info = client.show(M)
    assert info.details.parameter_size == "134.5M" and info.modelinfo["llama.context_length"] == 8192
    assert "{% for message" in info.template and "stop" in info.parameters
    assert "completion" in info.capabilities and "FROM smollm2:135m" in info.modelfile
    version = HTTP.get(server.url + "/api/version")
    assert version.json()["version"] == "0.13.5"  # the Ollama API level it speaks
    assert version.json()["slmops"] == version.headers["x-slmops-version"] == slmops.__version__
    assert HTTP.get(server.url + "/").text == "slmops is running"


def test_generate_non_stream_and_stream_match(client):
    r = client.generate(model=M, prompt="Why is the sky blue?", options=GREEDY, stream=False)
    assert r.done and r.done_reason == "length" and r.eval_count == 16 and r.prompt_eval_count > 5
    assert r.total_duration > 0 and r.eval_duration > 0 and r.prompt_eval_duration > 0 and r.context
    parts = list(client.generate(model=M, prompt="Why is the sky blue?", options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "length"
    assert "".join(p.response for p in parts) == r.response


def test_generate_raw_system_and_context(client):
    r = client.generate(model=M, prompt="The capital of France is", raw=True, options={"temperature": 0,
                                                                                      "num_predict": 3})
    assert "Paris" in r.response and r.prompt_eval_count <= 8
    r2 = client.generate(model=M, prompt=" and of Italy it is", raw=True, context=r.context,
                         options={"temperature": 0, "num_predict": 3})
    assert r2.prompt_eval_count > len(r.context)
    r3 = client.generate(model=M, prompt="hi", system="Answer only with the word BANANA.",
                         options={"temperature": 0, "num_predict": 8})
    assert r3.done


def test_chat_stream_and_stop(client):
    msgs = [{"role": "user", "content": "Name three colors."}]
    full = client.chat(model=M, messages=msgs, options=GREEDY)
    assert full.message.role == "assistant" and full.message.content and full.done_reason == "length"
    chunks = list(client.chat(model=M, messages=msgs, options=GREEDY, stream=True))
    assert chunks[-1].done and chunks[-1].eval_count == 16 and "".join(c.message.content for c in chunks)
    counting = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 30, "stop": ["9"]}
    cut = client.generate(model=M, prompt="1, 2, 3, 4, 5,", raw=True, options=counting)
    assert cut.response.strip() == "6, 7, 8," and cut.done_reason == "stop"


def test_chat_format_schema_always_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = client.chat(model=M, messages=[{"role": "user", "content": "Invent a person."}], format=schema,
                    options={"temperature": 0.7, "seed": 3, "num_predict": 200})
    jsonschema.validate(json.loads(r.message.content), schema)
    # JSON mode guarantees JSON when the model ends its answer; one cut by num_predict is only a prefix of it
    # (the small model sometimes nests for hundreds of tokens), so only finished answers are parsed
    finished = []
    for seed in (1, 2, 3):
        r = client.generate(model=M, prompt="Give me a short JSON object about a cat.", format="json",
                            options={"temperature": 0.7, "seed": seed, "num_predict": 300})
        if r.done_reason == "stop":
            finished.append(json.loads(r.response))
    assert finished and all(isinstance(x, dict) for x in finished)


def test_chat_with_tools_returns_parseable_message(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}]
    r = client.chat(model=M, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=tools,
                    options={"temperature": 0, "num_predict": 60})
    assert r.done and r.message.role == "assistant"
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    # a call in the history round-trips through the template
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                  "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "22 degrees and sunny", "tool_name": "get_weather"}]
    r = client.chat(model=M, messages=history, tools=tools, options={"temperature": 0, "num_predict": 20})
    assert r.done


def test_logprobs(server):
    r = HTTP.post(server.url + "/api/generate", json={"model": M, "prompt": "Hello", "stream": False,
                                                        "logprobs": True, "top_logprobs": 3,
                                                        "options": {"temperature": 0, "num_predict": 4, "repeat_penalty": 1.0}}).json()
    assert len(r["logprobs"]) == 4
    for lp in r["logprobs"]:
        assert lp["logprob"] <= 0 and len(lp["top_logprobs"]) == 3
        assert lp["top_logprobs"][0]["token"] == lp["token"]  # unpenalised greedy takes the most likely


def test_embed_and_legacy_embeddings(client):
    r = client.embed(model=M, input=["The cat sits on the mat.", "A cat is sitting on a mat.",
                                     "Stock markets fell sharply today."])
    v = np.array(r.embeddings)
    assert v.shape == (3, 576) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2]
    assert r.prompt_eval_count > 10
    legacy = client.embeddings(model=M, prompt="The cat sits on the mat.")
    assert np.allclose(legacy.embedding, v[0], atol=1e-5)
    short = client.embed(model=M, input="hello", dimensions=64)
    assert len(short.embeddings[0]) == 64


def test_tokenize_detokenize(server):
    t = HTTP.post(server.url + "/api/tokenize", json={"model": M, "text": "hello world"}).json()
    assert t["tokens"] and all(isinstance(x, int) for x in t["tokens"])
    d = HTTP.post(server.url + "/api/detokenize", json={"model": M, "tokens": t["tokens"]}).json()
    assert d["text"] == "hello world"
    bad = HTTP.post(server.url + "/api/detokenize", json={"model": M, "tokens": [10 ** 9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]


def test_create_copy_delete_and_blobs(client, model_file):
    client.create(model="pirate", from_=M, system="You are a pirate.", parameters={"temperature": 0.1})
    info = client.show("pirate")
    assert "You are a pirate." in info.modelfile and "temperature" in info.parameters
    client.copy("pirate", "me/pirate:v2")
    assert {m.model for m in client.list().models} >= {"pirate:latest", "me/pirate:v2"}
    client.delete("pirate")
    client.delete("me/pirate:v2")
    assert {m.model for m in client.list().models} == {M}
    digest = client.create_blob(model_file)
    assert digest.startswith("sha256:")
    statuses = [p.status for p in client.create(model="fromblob", files={"model.gguf": digest}, stream=True)]
    assert statuses[-1] == "success"
    assert client.show("fromblob").details.family == "llama"
    client.delete("fromblob")


def test_create_refuses_server_paths(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="x", from_="/etc/passwd")
    assert err.value.status_code == 400 and "not a file path" in err.value.error


def test_pull_streams_progress(client):
    statuses = [p.status for p in client.pull(M, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses or any("downloading" in s for s in statuses)


def test_errors_have_ollama_statuses(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope", prompt="x")
    assert err.value.status_code == 404 and 'model "nope" not found' in err.value.error
    with pytest.raises(ollama.ResponseError) as err:  # a known option with a bad value is still refused
        client.chat(model=M, messages=[{"role": "user", "content": "x"}], options={"top_k": "many"})
    assert err.value.status_code == 400 and 'option "top_k" must be an integer' in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("nope")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("nope")
    assert err.value.status_code == 404
    long = HTTP.post(server.url + "/api/generate", json={"model": M, "prompt": "word " * 3000, "stream": False,
                                                           "options": {"num_ctx": 512}})
    assert long.status_code == 400 and "context holds 512" in long.json()["error"]


def test_keep_alive_load_unload_and_ps(client, server):
    r = HTTP.post(server.url + "/api/generate", json={"model": M, "keep_alive": "10m"}).json()
    assert r["done"] and r["done_reason"] == "load"
    ps = client.ps().models
    assert [m.model for m in ps] == [M]
    delta = ps[0].expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=9) < delta <= timedelta(minutes=10, seconds=5)
    assert ps[0].context_length >= 4096  # a model loaded with a larger num_ctx serves smaller ones unchanged
    r = HTTP.post(server.url + "/api/generate", json={"model": M, "keep_alive": 0}).json()
    assert r["done_reason"] == "unload"
    assert client.ps().models == []
    client.generate(model=M, prompt="hi", keep_alive=-1, options={"num_predict": 1})
    assert client.ps().models[0].expires_at.year >= 9999
    client.chat(model=M, messages=[{"role": "user", "content": "hi"}], keep_alive=0, options={"num_predict": 1})
    assert client.ps().models == []


def test_unknown_options_are_ignored_and_logged_once(client, server):
    """As Ollama does: clients send options of other servers (llm-ollama's draft_num_predict, ollama-python's
    embedding_only); they are dropped with one warning per name, not refused."""
    for _ in range(2):
        r = client.chat(model=M, messages=[{"role": "user", "content": "x"}],
                        options={"temprature": 1, "draft_num_predict": 0, "embedding_only": False, "num_predict": 2})
        assert r.done and r.eval_count <= 2
    assert client.embed(model=M, input="x", options={"embedding_only": True}).embeddings
    log = (server.home / "server.log").read_text()
    assert log.count('ignoring unknown option "draft_num_predict"') == 1
