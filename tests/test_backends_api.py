"""The same API behaviour over both backends: one real `slmops serve` serving the default model on llama.cpp and
its ONNX Runtime GenAI export (pulled through the catalog's ``cpu-onnx-int4`` variant), driven by the official
`ollama` and `openai` clients. A capability a backend lacks answers a 400 that names it."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest

from conftest import Server, link_home
from onnx_model import ONNX, onnx_home  # noqa: F401

pytestmark = pytest.mark.slow

GGUF = "smollm2:135m"
BOTH = [GGUF, ONNX]
Q = [{"role": "user", "content": "Name three colors."}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(onnx_home, tmp_path_factory):  # noqa: F811
    s = Server(link_home(onnx_home, tmp_path_factory.mktemp("bothhome")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oc(server):
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def ai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_both_models_are_listed_with_their_format(oc):
    details = {m.model: m.details for m in oc.list().models}
    assert details[GGUF].format == "gguf" and details[ONNX].format == "onnx"
    shown = oc.show(ONNX)
    assert shown.details.format == "onnx" and shown.modelinfo["llama.context_length"] == 8192
    assert "<|im_start|>" in shown.template


@pytest.mark.parametrize("model", BOTH)
def test_chat_answers_and_stream_matches(oc, model):
    opts = {"temperature": 0, "num_predict": 12}
    full = oc.chat(model=model, messages=Q, options=opts)
    parts = list(oc.chat(model=model, messages=Q, options=opts, stream=True))
    assert full.message.content.strip()
    assert "".join(p.message.content for p in parts) == full.message.content
    assert parts[-1].done and parts[-1].eval_count == full.eval_count == 12 and parts[-1].done_reason == "length"
    assert full.prompt_eval_count > 10


@pytest.mark.parametrize("model", BOTH)
def test_generate_honours_stop_sequences(oc, model):
    prompt, opts = "Tell me about the sea.", {"temperature": 0, "num_predict": 30}
    text = oc.generate(model=model, prompt=prompt, options=opts).response
    at = next(p for p in range(4, len(text) - 3) if text[p:p + 3].strip() and text.find(text[p:p + 3]) == p)
    stop = text[at:at + 3]  # first seen at `at`: the answer ends right before it
    cut = oc.generate(model=model, prompt=prompt, options={**opts, "stop": [stop]})
    assert cut.response == text[:at] and cut.done_reason == "stop", (text, stop)


@pytest.mark.parametrize("model", BOTH)
def test_json_schema_output_validates(oc, ai, model):
    r = oc.chat(model=model, messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}],
                format=PERSON, options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(r.message.content), PERSON)
    o = ai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Invent a person."}],
                                   max_tokens=60, temperature=0,
                                   response_format={"type": "json_schema",
                                                    "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(o.choices[0].message.content), PERSON)


@pytest.mark.parametrize("model", BOTH)
def test_forced_tool_calls_come_back_structured(oc, ai, model):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    o = ai.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], tool_choice="required",
                                   max_tokens=60, temperature=0)
    call = o.choices[0].message.tool_calls[0]
    assert o.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    streamed = list(ai.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], tool_choice="required",
                                               max_tokens=60, temperature=0, stream=True))
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"


@pytest.mark.parametrize("model", BOTH)
def test_logprobs_and_seeded_sampling(ai, model):
    r = ai.chat.completions.create(model=model, messages=Q, max_tokens=4, temperature=0, logprobs=True,
                                   top_logprobs=2)
    lps = r.choices[0].logprobs.content
    assert len(lps) == 4 and all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in lps)
    assert lps[0].top_logprobs[0].logprob >= lps[0].top_logprobs[1].logprob
    a, b = (ai.chat.completions.create(model=model, messages=Q, max_tokens=16, temperature=1.0, seed=11)
            .choices[0].message.content for _ in range(2))
    assert a == b


def test_what_the_onnx_backend_lacks_is_a_400_that_names_it(server, oc):
    r = httpx.post(server.url + "/api/embed", json={"model": ONNX, "input": "hello"}, timeout=120)
    assert r.status_code == 400 and "embeddings" in r.json()["error"] and "ONNX Runtime GenAI" in r.json()["error"]
    v = httpx.post(server.url + "/v1/embeddings", json={"model": ONNX, "input": "hello"}, timeout=120)
    assert v.status_code == 400 and "embeddings" in v.json()["error"]["message"]


def test_ps_shows_each_model_and_where_it_runs(server, oc):
    oc.generate(model=ONNX, prompt="hi", options={"num_predict": 1})
    ps = httpx.get(server.url + "/api/ps").json()["models"]
    onnx = next(m for m in ps if m["name"] == ONNX)
    assert onnx["details"]["format"] == "onnx" and "fallback" not in onnx


def test_an_onnx_model_asked_onto_cuda_here_falls_back_to_the_cpu_and_says_so(onnx_home, tmp_path):  # noqa: F811
    s = Server(link_home(onnx_home, tmp_path / "home"), SLMOPS_ONNX_PROVIDERS="cuda,cpu")
    try:
        r = ollama.Client(host=s.url).generate(model=ONNX, prompt="hi", options={"num_predict": 2})
        assert r.done
        onnx = next(m for m in httpx.get(s.url + "/api/ps").json()["models"] if m["name"] == ONNX)
        assert onnx["fallback"].startswith("cuda failed (") and onnx["fallback"].endswith("on the CPU")
        metrics = httpx.get(s.url + "/metrics").text
        assert f'slmops_accelerator_fallback{{model="{ONNX}"}} 1.0' in metrics
    finally:
        s.stop()


def test_slmops_run_answers_with_the_onnx_model(onnx_home, tmp_path):  # noqa: F811
    from conftest import run_cli
    home = link_home(onnx_home, tmp_path / "home")
    (tmp_path / "Modelfile").write_text(f"FROM {ONNX}\nPARAMETER temperature 0\n")  # greedy: one answer
    made = run_cli("create", "greedy-onnx", "-f", str(tmp_path / "Modelfile"), home=home)
    assert made.returncode == 0, made.stderr
    r = run_cli("run", "greedy-onnx", "What is the capital of France? Answer in one word.", home=home)
    assert r.returncode == 0 and "Paris" in r.stdout, (r.stdout, r.stderr)
