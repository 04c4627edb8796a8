"""The ONNX Runtime GenAI backend: execution providers and their order, constraints compiled for llguidance, and the
default model's ONNX export served through the engine (streaming, stops, limits, JSON and tool calls, logprobs,
seeds, requests side by side, cancel, a full queue). The runtime stays inside its package."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from onnx_model import onnx_folder  # noqa: F401

from slmops.engine.backend import Constraint, require_constraint
from slmops.engine.client import EngineConfig, ModelSpec, ModelUnloaded, Request
from slmops.engine.outputs import Output
from slmops.types.errors import Busy, ConfigError, ContextOverflow, EngineError, InvalidInput, Unsupported
from slmops.types.options import LoadParams, SamplingParams

GREEDY = {"temperature": 0}
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STORY = [{"role": "user", "content": "Tell me a long story about a dragon."}]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}]


# -- the runtime stays in its package (the import rule itself: tests/test_backend.py) -----------------------------

def test_importing_the_package_loads_no_native_code():
    code = ("import sys, slmops.engine.onnx as o; o.installed(); "
            "assert not {'onnxruntime_genai', 'onnxruntime'} & set(sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_without_the_runtime_the_backend_says_which_extra_to_install(monkeypatch):
    from slmops.engine.onnx import create_backend

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as if not installed: importing it fails
    with pytest.raises(EngineError) as err:
        create_backend()
    assert str(err.value) == ("this model is an ONNX Runtime GenAI model; install the extra with "
                              "`pip install 'slmops[onnx]'`")


# -- execution providers ---------------------------------------------------------------------------------------

def test_providers_are_tried_npu_then_gpu_then_cpu():
    from slmops.engine.onnx.providers import available, lookup, order

    def names(providers) -> list[str]:
        return [p.name for p in providers]
    found = tuple(lookup(n) for n in ("cpu", "cuda", "dml", "qnn"))  # in no particular order
    assert names(order(None, True, found)) == ["qnn", "cuda", "dml", "cpu"]
    assert names(order(None, False, found)) == ["qnn", "cpu"]  # num_gpu 0: no GPU, but an NPU is for this
    assert names(order(None, True, (lookup("cpu"),))) == ["cpu"]
    assert names(order(("CUDA", "cpu"), True)) == ["cuda", "cpu"]  # forced, whatever is detected
    assert names(order(("cuda",), True)) == ["cuda", "cpu"]  # the CPU always ends the list
    assert names(order(("cpu", "cuda"), True)) == ["cpu"]  # nothing after it is tried
    assert names(order(("cuda",), False)) == ["cuda", "cpu"]  # asked for by name: tried
    assert names(order(("tensorrt", "nvtensorrtrtx", "CUDAExecutionProvider"), True)) == ["tensorrt", "cuda", "cpu"]
    assert [(p.genai, p.accelerator) for p in map(lookup, ("qnn", "directml", "cuda", "cpu"))] == \
        [("QNN", "npu"), ("DML", "gpu"), ("cuda", "gpu"), (None, "cpu")]
    with pytest.raises(ConfigError, match="unknown ONNX Runtime execution provider 'tpu'; known: qnn, "):
        order(("tpu",), True)
    here = available()
    assert here[-1].name == "cpu" and names(order(None, True)) == names(here)


# -- constraints and options, without a model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("onnxruntime_genai")
    from slmops.engine.onnx import create_backend

    return create_backend(False)


def test_constraints_compile_to_llguidance_inputs(backend):
    assert backend.name == "ONNX Runtime GenAI"
    caps = backend.capabilities
    assert caps.logprobs and not (caps.continuous_batching or caps.embeddings or caps.adapters)
    assert caps.constraints == {"json", "json_schema", "tool_calls", "regex"}
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert backend.compile(Constraint("json")) == ("json_schema", '{"type": "object"}')
    assert backend.compile(Constraint("json_schema", schema=schema)) == ("json_schema", json.dumps(schema))
    kind, data = backend.compile(Constraint.tool_calls(WEATHER))
    assert kind == "json_schema" and json.loads(data)["properties"]["name"] == {"const": "get_weather"}
    assert backend.compile(Constraint.regex("(yes|no)")) == ("regex", "(yes|no)")
    with pytest.raises(InvalidInput, match=r"invalid regular expression '\(unclosed'"):
        backend.compile(Constraint.regex("(unclosed"))


def test_a_gbnf_grammar_is_a_400_naming_it(backend):
    from slmops.server.errors import status_for

    with pytest.raises(Unsupported) as err:
        require_constraint(backend, Constraint.gbnf('root ::= "a"'))
    assert str(err.value) == "the ONNX Runtime GenAI backend this model runs on does not support GBNF grammars"
    assert status_for(err.value) == 400


def test_ollama_options_become_search_options(backend):
    from slmops.engine.onnx.generate import one_line, search_options
    from slmops.engine.streams import TokenStream

    def options(n_prompt: int = 10, n_ctx: int = 100, **sampling: Any) -> dict[str, Any]:
        s = SamplingParams(**sampling)
        return search_options(TokenStream(list(range(n_prompt)), s, print), n_ctx,
                              s.num_predict if s.num_predict >= 0 else -1, 49152)
    assert options(temperature=0) == {"max_length": 100, "do_sample": False, "repetition_penalty": 1.1}
    assert options(temperature=0, num_predict=5)["max_length"] == 15  # the prompt counts; KV is sized by it
    assert options(temperature=0, num_predict=500)["max_length"] == 100
    assert options(top_k=0, seed=-1) == {"max_length": 100, "do_sample": True, "repetition_penalty": 1.1,
                                         "temperature": 0.8, "top_k": 0, "top_p": 0.9}  # top_k 0: off, top-p alone
    assert options(seed=2**40 + 7)["random_seed"] == 7 and options(top_k=10**6)["top_k"] == 49152
    multi = RuntimeError('Error creating grammar: at 1(8): invalid regex "(?=a)a" (in regex): regex parse error:\n'
                         '    (?=a)a\n    ^^^\nerror: look-around is not supported\n   1 | start: /(?=a\n     ^\n')
    assert one_line(multi) == ('Error creating grammar: at 1(8): invalid regex "(?=a)a" (in regex): regex parse '
                               'error: (?=a)a error: look-around is not supported')


# -- the default model's export -------------------------------------------------------------------------------

def _spec(folder: Path, files: bool = False) -> ModelSpec:
    """The folder's model; with ``files`` as the store hands it over (file name -> blob), linked at load."""
    return ModelSpec(name="smollm2-onnx", model_path=folder, format="onnx", context_length=8192,
                     template=(folder / "chat_template.jinja").read_text(),
                     files={p.name: p for p in folder.iterdir()} if files else {})


@pytest.fixture(scope="module")
def engine(backend, onnx_folder):  # noqa: F811
    from slmops.engine.engine import Engine

    engine = Engine(EngineConfig(default_ctx=512, num_parallel=2), backend=backend)
    yield engine, _spec(onnx_folder)
    engine.close()


@pytest.fixture(scope="module")
def model(backend, onnx_folder):  # noqa: F811
    """Loaded from blobs, as the store's models are: one request at a time, one more may wait."""
    m = backend.load(_spec(onnx_folder, files=True), LoadParams(num_ctx=256), EngineConfig(num_parallel=1,
                                                                                            max_queue=1))
    yield m
    m.close()


def _prompt_of(model, messages: list[dict[str, str]]) -> list[int]:
    from slmops.engine.model import DEFAULT_TEMPLATE
    from slmops.modelfile.template import ChatTemplate

    return model.tokenize(ChatTemplate.compile(DEFAULT_TEMPLATE, model.bos_text, model.eos_text).render(messages))


def _run(engine, messages, **req: Any) -> list[Output]:
    eng, spec = engine
    return list(eng.run(spec, Request(messages=messages, **req)))


def _text(outs: list[Output]) -> str:
    return "".join(o.text for o in outs)


def _start(model, tokens: list[int], constraint: Any = None, **sampling: Any):
    """Start a request on ``model`` directly; returns (cancel, inbox of what it emits)."""
    inbox: queue.Queue = queue.Queue()
    cancel = model.start(tokens, SamplingParams(**{"temperature": 0, **sampling}), constraint, inbox.put, 0, None)
    return cancel, inbox


def _drain(inbox: queue.Queue, timeout: float = 60) -> list[Any]:
    out = []
    while True:
        item = inbox.get(timeout=timeout)
        out.append(item)
        if isinstance(item, BaseException) or item.done:
            return out


@pytest.mark.slow
def test_the_model_loads_on_the_cpu_from_its_blobs(model, backend, onnx_folder):  # noqa: F811
    assert model.provider == "cpu" and model.fallback is None and model.decoder is None
    assert (model.n_vocab, model.n_ctx_train, model.add_bos, model.embedding_only) == (49152, 8192, False, False)
    assert (model.bos_text, model.eos_text) == ("<|im_start|>", "<|im_end|>")
    tokens = model.tokenize("<|im_start|>user\nHello world")
    assert tokens[0] == 1 and model.detokenize(tokens) == "user\nHello world"  # special tokens read, not shown
    with pytest.raises(Unsupported, match="embeddings"):
        model.embed(["x"], True)
    with pytest.raises(ContextOverflow, match="prompt is 256 tokens but the context holds 256"):
        model.start([28] * 256, SamplingParams(), None, print, 0, None)
    # A constrained request reads the tokenizer from the folder again: it outlives the load.
    _, inbox = _start(model, model.tokenize("<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"),
                      backend.compile(Constraint.regex("(yes|no)")), num_predict=8)
    outs = _drain(inbox)
    assert _text(outs) in ("yes", "no") and outs[-1].done_reason == "stop"


@pytest.mark.slow
def test_a_forced_provider_that_fails_falls_back_to_the_cpu_and_says_why(backend, onnx_folder):  # noqa: F811
    config = EngineConfig(onnx_providers=("cuda", "cpu"))  # SLMOPS_ONNX_PROVIDERS=cuda,cpu
    m = backend.load(_spec(onnx_folder), LoadParams(num_ctx=64, num_gpu=99), config)
    try:
        assert m.provider == "cpu"
        assert m.fallback.startswith("cuda failed (") and m.fallback.endswith("); on the CPU")
        assert "\n" not in m.fallback and len(m.fallback) < 250
        _, inbox = _start(m, _prompt_of(m, FRANCE), num_predict=8)
    finally:
        m.close()  # as an unload: what runs finishes first, what comes after is refused
    assert _drain(inbox, timeout=0.1)[-1].done
    with pytest.raises(ModelUnloaded):
        m.start([1, 2], SamplingParams(), None, print, 0, None)


@pytest.mark.slow
def test_a_greedy_chat_streams_pieces_that_make_the_answer(engine):
    outs = _run(engine, FRANCE, options={**GREEDY, "num_predict": 24})
    final = outs[-1]
    assert "Paris" in _text(outs) and final.done and final.done_reason == "stop"
    assert all(not o.done for o in outs[:-1]) and len(outs) > 3
    assert [o.eval_count for o in outs[:-1]] == sorted(o.eval_count for o in outs[:-1])
    s = final.stats
    assert s.prompt_eval_count == outs[0].prompt_eval_count > 20 and 0 < s.eval_count < 24
    assert len(final.context) == s.prompt_eval_count + s.eval_count and s.cached_prompt_tokens == 0
    assert s.total_duration >= s.prompt_eval_duration + s.eval_duration > 0


@pytest.mark.slow
def test_a_stop_string_cuts_the_output(engine):
    outs = _run(engine, FRANCE, options={**GREEDY, "stop": ["Paris"], "num_predict": 24})
    assert "Paris" not in _text(outs) and _text(outs).startswith("The capital") and outs[-1].done_reason == "stop"


@pytest.mark.slow
def test_num_predict_ends_with_length(engine):
    outs = _run(engine, STORY, options={**GREEDY, "num_predict": 5})
    assert outs[-1].done_reason == "length" and outs[-1].stats.eval_count == 5 and _text(outs)


@pytest.mark.slow
def test_json_schema_output_validates(engine):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    outs = _run(engine, [{"role": "user", "content": "Describe Ana, 31, as JSON with name and age."}],
                format=schema, options={**GREEDY, "num_predict": 40})
    jsonschema.validate(json.loads(_text(outs)), schema)
    assert outs[-1].done_reason == "stop"


@pytest.mark.slow
def test_a_forced_tool_call_parses(engine):
    outs = _run(engine, [{"role": "user", "content": "What's the weather in Paris, in celsius?"}], tools=WEATHER,
                tool_choice="get_weather", options={**GREEDY, "num_predict": 48})
    call = json.loads(_text(outs))
    assert call["name"] == "get_weather" and set(call["arguments"]) == {"city", "unit"}


@pytest.mark.slow
def test_logprobs_cover_every_generated_token(engine):
    # The model's own distribution: with no repeat penalty, greedy takes the likeliest token.
    outs = _run(engine, FRANCE, options={**GREEDY, "num_predict": 6, "repeat_penalty": 1.0}, logprobs=2)
    lps = [lp for o in outs for lp in o.logprobs]
    assert len(lps) == outs[-1].stats.eval_count == 6
    assert "".join(lp.token for lp in lps) == _text(outs)
    for lp in lps:
        assert lp.logprob <= 0 and lp.bytes == lp.token.encode() and len(lp.top) == 2
        assert lp.top[0].logprob >= lp.top[1].logprob and lp.top[0].token == lp.token  # greedy: the likeliest


@pytest.mark.slow
def test_a_seed_repeats_a_sampled_answer(engine):
    def sample(seed: int) -> str:
        return _text(_run(engine, STORY, options={"temperature": 1.0, "seed": seed, "num_predict": 12}))
    first = sample(42)
    assert sample(42) == first
    assert any(sample(s) != first for s in (1, 2, 3))


@pytest.mark.slow
def test_requests_side_by_side_give_what_each_gives_alone(engine):
    eng, spec = engine
    alone = [_text(_run(engine, m, options={**GREEDY, "num_predict": 16})) for m in (FRANCE, STORY)]
    inboxes = [queue.Queue(), queue.Queue()]
    for m, inbox in zip((FRANCE, STORY), inboxes):
        eng.start(spec, Request(messages=m, options={**GREEDY, "num_predict": 16}), inbox.put)
    together = [_drain(inbox) for inbox in inboxes]
    assert [_text(outs) for outs in together] == alone and all(outs[-1].done for outs in together)


@pytest.mark.slow
def test_cancel_stops_a_request_and_a_full_queue_is_busy(model):
    tokens = _prompt_of(model, STORY)
    cancel_running, running = _start(model, tokens, num_predict=200)
    first = running.get(timeout=30)
    assert isinstance(first, Output) and not first.done
    cancel_waiting, waiting = _start(model, tokens, num_predict=200)  # the one running slot is taken: it waits
    with pytest.raises(Busy, match="server busy: 1 requests already wait; retry later"):
        _start(model, tokens, num_predict=200)
    cancel_waiting()
    cancel_running()
    time.sleep(0.3)
    while not running.empty():  # pieces emitted before the cancel landed
        assert not running.get().done
    time.sleep(0.5)
    assert running.empty() and waiting.empty()  # nothing further, no final record
    outs = _drain(_start(model, tokens, num_predict=3)[1])  # the model serves on
    assert outs[-1].done_reason == "length"


@pytest.mark.slow
def test_a_grammar_llguidance_rejects_is_invalid_input(model, backend):
    tokens = _prompt_of(model, FRANCE)
    compiled = backend.compile(Constraint.regex("(?=a)a"))  # Python's re takes look-ahead; llguidance does not
    (err,) = _drain(_start(model, tokens, compiled, num_predict=4)[1])
    assert isinstance(err, InvalidInput) and "look-around" in str(err) and "\n" not in str(err)
    outs = _drain(_start(model, tokens, num_predict=3)[1])
    assert outs[-1].done

