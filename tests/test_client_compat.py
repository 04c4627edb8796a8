"""The clients people already point at Ollama, unchanged, against a real `slmops serve`: langchain-ollama,
langchain-openai, litellm (``ollama/``, ``ollama_chat/``, ``openai/``), llm with llm-ollama, llama-index's Ollama
LLM, and the official ollama and openai clients for what those libraries build on (streams with tools).

None of these may reach the internet: litellm reads its bundled model map, llm keeps its logs in a temporary
folder."""

import json
import os
import subprocess

import httpx
import jsonschema
import ollama
import openai
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported: no download

from conftest import BIN  # noqa: E402

M = "smollm2:135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


# -- streams with tools: what the libraries below build on ----------------------------------------------------
def test_ollama_chat_with_tools_streams_text_as_it_comes(url):
    """With tools, the whole answer used to arrive as one line at the end (status line included)."""
    chunks = list(ollama.Client(host=url).chat(
        model=M, messages=[{"role": "user", "content": "Write two sentences about the sea."}], tools=[WEATHER],
        stream=True, options={"temperature": 0, "num_predict": 40}))
    content = [c for c in chunks if c.message.content]
    assert len(content) >= 3 and chunks[-1].done  # pieces, not one line at the end
    assert not chunks[0].done


def test_ollama_forced_tool_call_streams_as_a_call(url):
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": M, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
        "tool_choice": "required", "stream": True, "max_tokens": 80, "seed": 3})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [tc for e in events for tc in (e["choices"][0]["delta"].get("tool_calls") or []) if e["choices"]]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"] and deltas[0]["type"] == "function"
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_chat_with_tools_streams_text_as_it_comes(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=M, messages=[{"role": "user", "content": "Write two sentences about the sea."}], tools=[WEATHER],
        stream=True, max_tokens=40, temperature=0))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3


# -- langchain ------------------------------------------------------------------------------------------------
def test_langchain_ollama(url):
    from langchain_ollama import ChatOllama, OllamaEmbeddings

    chat = ChatOllama(model=M, base_url=url, num_predict=12, temperature=0)
    assert chat.invoke("Say hi.").content
    assert len([c for c in chat.stream("Count from one to ten.") if c.content]) >= 3
    called = ChatOllama(model=M, base_url=url, num_predict=80, temperature=0).bind_tools([WEATHER])
    pieces = list(called.stream("What is the weather in Paris? Use the tool."))
    assert pieces  # whatever the small model chose, a streamed answer with tools parses
    structured = ChatOllama(model=M, base_url=url, num_predict=60, temperature=0).with_structured_output(
        PERSON, method="json_schema")
    jsonschema.validate(structured.invoke("Invent a person."), PERSON)
    assert len(OllamaEmbeddings(model=M, base_url=url).embed_query("hello")) == 576


def test_langchain_openai_chat(url):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=M, base_url=url + "/v1", api_key="unused", max_tokens=12, temperature=0)
    assert chat.invoke("Say hi.").content
    assert len([c for c in chat.stream("Count from one to ten.") if c.content]) >= 3


# -- litellm --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["ollama", "ollama_chat"])
def test_litellm_ollama_providers(url, prefix, monkeypatch):
    import litellm

    monkeypatch.setenv("OLLAMA_API_BASE", url)
    assert litellm.supports_function_calling(model=f"{prefix}/{M}")  # read from /api/show's template
    r = litellm.completion(model=f"{prefix}/{M}", api_base=url, max_tokens=8,
                           messages=[{"role": "user", "content": "Say hi."}])
    assert r.choices[0].message.content
    stream = litellm.completion(model=f"{prefix}/{M}", api_base=url, max_tokens=20, stream=True, temperature=0,
                                messages=[{"role": "user", "content": "Count from one to ten."}])  # greedy: no flake
    assert len([c for c in stream if c.choices[0].delta.content]) >= 3
    emb = litellm.embedding(model=f"ollama/{M}", api_base=url, input=["hello"])
    assert len(emb.data[0]["embedding"]) == 576


def test_litellm_openai_provider_with_forced_tools(url):
    import litellm

    r = litellm.completion(model=f"openai/{M}", api_base=url + "/v1", api_key="unused", max_tokens=80,
                           messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                           tool_choice="required", seed=1)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


# -- llm + llm-ollama -----------------------------------------------------------------------------------------
def test_llm_with_llm_ollama_and_its_own_options(url, tmp_path):
    """llm-ollama advertises draft_num_predict; slmops ignores options it does not know, as Ollama does."""
    env = {**os.environ, "OLLAMA_HOST": url, "LLM_USER_PATH": str(tmp_path)}
    llm = BIN.parent / "llm"
    listed = subprocess.run([str(llm), "models", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert f"ollama/{M}" in listed.stdout, listed.stderr
    r = subprocess.run([str(llm), "-m", f"ollama/{M}", "-o", "draft_num_predict", "0", "-o", "num_predict", "8", "Hi"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    # greedy: a sampled name can run on past the token budget and leave the JSON unterminated
    schema = subprocess.run([str(llm), "-m", f"ollama/{M}", "--schema", "name, age int", "-o", "num_predict", "120",
                             "-o", "temperature", "0", "Invent a person."], env=env, capture_output=True, text=True,
                            timeout=120)
    assert schema.returncode == 0, schema.stderr
    jsonschema.validate(json.loads(schema.stdout), PERSON)


# -- llama-index ----------------------------------------------------------------------------------------------
def test_llama_index_ollama(url):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.ollama import Ollama

    llm = Ollama(model=M, base_url=url, request_timeout=120, additional_kwargs={"num_predict": 12,
                                                                                 "temperature": 0})
    assert llm.complete("Say hi.").text
    pieces = list(llm.stream_chat([ChatMessage(role="user", content="Count from one to ten.")]))
    assert len(pieces) >= 3 and pieces[-1].message.content
