"""The Backend protocol without a model: neutral constraints, capabilities answered as a 400 that names what is
missing, a backend with its own generate loop driven by the Engine, and llama.cpp kept inside its package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from slmops.engine.backend import (CONSTRAINT_KINDS, BatchPlan, Capabilities, Constraint, require,
                                   require_constraint, tool_call_schema)
from slmops.engine.client import EngineConfig, ModelSpec, Request
from slmops.engine.outputs import Output
from slmops.types.errors import InvalidInput, Unsupported

PACKAGE = Path(__file__).resolve().parent.parent / "slmops"
LLAMACPP = PACKAGE / "engine" / "llamacpp"
TOOLS = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "b"}}]


# -- llama.cpp stays in its package ---------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_the_llamacpp_package_imports_llama_cpp():
    outside = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if LLAMACPP not in p.parents and any(n.split(".")[0] == "llama_cpp" for n in _imports(p)))
    assert outside == []
    # Nor by name (import_module, -c strings): only the CLI's list of modules the full install has mentions it,
    # and `slmops serve`'s first step, which asks whether the engine is installed before it imports the CLI.
    named = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if LLAMACPP not in p.parents and re.search(r"\bllama_cpp\b", p.read_text()))
    assert named == ["cli/common.py", "cli/main.py"]


def test_only_the_onnx_package_imports_onnx_runtime():
    onnx = PACKAGE / "engine" / "onnx"
    outside = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if onnx not in p.parents and any(n.split(".")[0] in ("onnxruntime_genai", "onnxruntime")
                                                      for n in _imports(p)))
    assert outside == []


def test_the_engine_outside_the_package_does_not_reach_into_its_modules():
    """Only wiring points name the package's modules: the default backend, and ops that are llama.cpp's own work
    (quantizing, pruning, perplexity, the GPU-offload probe, trained weights back to GGUF)."""
    allowed = {"engine/backend.py", "ops/quantize.py", "ops/variants.py", "ops/evaluate.py", "ops/hw.py",
               "ops/shrink.py", "ops/back_to_gguf.py"}
    users = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if LLAMACPP not in p.parents
             and any(n.startswith("slmops.engine.llamacpp") for n in _imports(p))}
    assert users <= allowed and "slmops.engine.llamacpp" in (PACKAGE / "engine" / "backend.py").read_text()


# -- constraints ----------------------------------------------------------------------------------------------------

def test_constraints_from_ollama_formats():
    assert Constraint.from_format(None) is None and Constraint.from_format("") is None
    assert Constraint.from_format({}) is None
    assert Constraint.from_format("json") == Constraint("json")
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert Constraint.from_format(schema) == Constraint("json_schema", schema=schema)
    for bad in ("yaml", 3, ["json"]):
        with pytest.raises(InvalidInput, match='format must be "json" or a JSON Schema object'):
            Constraint.from_format(bad)


def test_tool_call_constraints_carry_the_call_shape():
    c = Constraint.tool_calls(TOOLS, "b")
    assert c.kind == "tool_calls" and c.schema == tool_call_schema(TOOLS, "b")
    assert c.schema["properties"]["name"] == {"const": "b"}
    assert c.schema["properties"]["arguments"] == {"type": "object"}  # no parameters: any object
    assert [o["properties"]["name"]["const"] for o in Constraint.tool_calls(TOOLS).schema["anyOf"]] == ["a", "b"]
    with pytest.raises(InvalidInput, match='tool_choice names "c"'):
        Constraint.tool_calls(TOOLS, "c")


@pytest.mark.parametrize("kind,kwargs,message", [
    ("yaml", {}, "constraint kind 'yaml' is not one of"),
    ("json_schema", {}, "needs a JSON Schema object"),
    ("json_schema", {"schema": "{}"}, "needs a JSON Schema object"),
    ("tool_calls", {"source": "x"}, "needs a JSON Schema object"),
    ("json", {"schema": {}}, "takes no JSON Schema"),
    ("json", {"source": "root ::= x"}, "takes no text"),
    ("regex", {}, "needs its text"),
    ("gbnf", {"source": ""}, "needs a non-empty gbnf"),
    ("regex", {"source": "a+", "schema": {}}, "takes no JSON Schema"),
])
def test_constraints_refuse_a_payload_that_does_not_fit_their_kind(kind, kwargs, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        Constraint(kind, **kwargs)


def test_each_kind_has_a_constructor_and_values_compare():
    assert Constraint.regex("[a-z]+") == Constraint("regex", source="[a-z]+")
    assert Constraint.gbnf('root ::= "a"').source == 'root ::= "a"'
    assert set(CONSTRAINT_KINDS) == {"json", "json_schema", "tool_calls", "regex", "gbnf"}
    with pytest.raises(Exception):  # frozen: a constraint does not change on its way to the backend
        Constraint("json").kind = "regex"  # type: ignore[misc]


# -- capabilities ---------------------------------------------------------------------------------------------------

class _Fake:
    """A backend with its own generate loop (no continuous batching), no embeddings, logprobs or adapters; it
    compiles JSON Schemas and regular expressions, and echoes the prompt back."""

    name = "fake"
    capabilities = Capabilities(constraints=frozenset({"json_schema", "regex"}))

    def __init__(self) -> None:
        self.compiled: list[Any] = []

    def load(self, spec, load, config):  # type: ignore[no-untyped-def]
        return _FakeModel(self)

    def compile(self, constraint: Constraint) -> Any:
        return ("compiled", constraint.kind)


class _FakeModel:
    n_vocab, n_ctx_train, bos_text, eos_text, add_bos, embedding_only = 256, 64, "", "", False, False
    plan, decoder = BatchPlan(1), None

    def __init__(self, backend: _Fake):
        self.backend = backend
        self.closed = False

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return list(text.encode())

    def detokenize(self, tokens: list[int]) -> str:
        return bytes(tokens).decode()

    def start(self, tokens, sampling, constraint, emit, load_duration, n_ctx,  # type: ignore[no-untyped-def]
              whole=False):
        self.backend.compiled.append(constraint)
        emit(Output(text=self.detokenize(tokens)))
        emit(Output(text="", done=True, done_reason="stop"))
        return lambda: None

    def embed(self, texts, truncate):  # type: ignore[no-untyped-def]
        raise AssertionError("not offered")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_engine():
    from slmops.engine.engine import Engine

    backend = _Fake()
    engine = Engine(EngineConfig(default_ctx=32), backend=backend)
    yield engine, backend, ModelSpec(name="fake", model_path=Path("/nonexistent"), context_length=64)
    engine.close()


def test_an_engine_runs_a_backend_with_its_own_generate_loop(fake_engine):
    engine, backend, spec = fake_engine
    out = list(engine.run(spec, Request(prompt="hello", raw=True, format={"type": "object"})))
    assert "".join(o.text for o in out) == "hello" and out[-1].done
    assert backend.compiled == [("compiled", "json_schema")]  # compiled by the backend, from the neutral form
    assert engine.tokenize(spec, "hi") == [104, 105] and engine.detokenize(spec, [104, 105]) == "hi"
    assert engine.loaded()[0].waiting == 0


@pytest.mark.parametrize("call,named", [
    (lambda e, s: e.embed(s, ["x"]), "embeddings"),
    (lambda e, s: e.run(s, Request(prompt="x", raw=True, logprobs=2)), "log-probabilities"),
    (lambda e, s: e.run(s, Request(prompt="x", raw=True, format="json")), "JSON output"),
    (lambda e, s: e.run(s, Request(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="a")),
     "forced tool calls"),
])
def test_what_a_backend_lacks_is_a_400_naming_it(fake_engine, call, named):
    from slmops.server.errors import status_for

    engine, _, spec = fake_engine
    with pytest.raises(Unsupported) as err:
        call(engine, spec)
    assert named in str(err.value) and "fake backend" in str(err.value) and err.value.capability.startswith(named)
    assert isinstance(err.value, InvalidInput) and status_for(err.value) == 400


def test_adapters_need_a_backend_that_loads_them(fake_engine):
    engine, _, spec = fake_engine
    spec.adapters = [Path("/nonexistent/adapter.gguf")]
    with pytest.raises(Unsupported, match="LoRA adapters"):
        engine.load(spec)


def test_unsupported_keeps_its_class_across_a_runner_pipe():
    from slmops.engine import messages as msg

    back = msg.from_failure(msg.failure(1, Unsupported("embeddings", "fake")))
    assert type(back) is Unsupported and str(back) == "the fake backend this model runs on does not support embeddings"


def test_require_checks_one_capability_at_a_time():
    backend = _Fake()
    require(backend, "embeddings", needed=False)
    require_constraint(backend, Constraint.regex("a+"))
    with pytest.raises(Unsupported, match="continuous batching"):
        require(backend, "continuous_batching")
    with pytest.raises(Unsupported, match="GBNF grammars"):
        require_constraint(backend, Constraint.gbnf('root ::= "a"'))


# -- llama.cpp compiles the neutral constraints, within the grammar limits ------------------------------------------

def test_llama_cpp_compiles_constraints_to_checked_gbnf():
    from slmops.engine.llamacpp import create_backend
    from slmops.engine.llamacpp.gbnf import MAX_GRAMMAR_DEPTH, MAX_REPEAT

    llama = create_backend(False)
    assert llama.capabilities.continuous_batching and llama.capabilities.embeddings
    assert "regex" not in llama.capabilities.constraints  # GBNF has no regular expressions: a 400 names it
    assert re.search(r"^root\s+::= object", llama.compile(Constraint("json")), re.M)
    assert re.search(r"^root\s+::=", llama.compile(Constraint.tool_calls(TOOLS, "a")), re.M)
    assert llama.compile(Constraint.gbnf('root ::= "yes" | "no"')) == 'root ::= "yes" | "no"'
    with pytest.raises(InvalidInput, match=f"limit of {MAX_REPEAT}"):  # the schema checks, before conversion
        llama.compile(Constraint("json_schema", schema={"type": "string", "maxLength": 20000}))
    deep = "root ::= " + "(" * (MAX_GRAMMAR_DEPTH + 1) + '"a"' + ")" * (MAX_GRAMMAR_DEPTH + 1)
    with pytest.raises(InvalidInput, match=f"nested more than {MAX_GRAMMAR_DEPTH} levels"):  # the dry run
        llama.compile(Constraint.gbnf(deep))


@pytest.mark.slow
def test_a_context_that_does_not_fit_in_memory_is_out_of_memory(model_file: Path) -> None:
    """llama.cpp returns no context when its KV cache cannot be allocated: that is ``OutOfMemory`` (counted as
    ``kind="oom"`` and gated on by a fleet), not a generic engine error. The address space is capped just above
    what the loaded model takes, in a process of its own."""
    script = textwrap.dedent('''
        import resource
        from slmops.engine.llamacpp import preload
        preload()
        import sys
        from pathlib import Path
        from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel
        from slmops.types.errors import OutOfMemory
        from slmops.types.options import LoadParams
        model = LlamaModel(Path(sys.argv[1]))
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + (32 << 20), resource.RLIM_INFINITY))
        try:
            LlamaContext(model, LoadParams(num_ctx=8192), n_seq_max=4)
        except OutOfMemory as err:
            print("oom:", err)
    ''')
    done = subprocess.run([sys.executable, "-c", script, str(model_file)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("oom: llama.cpp could not create a context of 8192 tokens"), done.stdout


# -- accelerator fallback ---------------------------------------------------------------------------------------

class _Gpu(_Fake):
    """A backend that can offload, whose GPU loads fail as a CUDA out-of-memory does."""

    name = "gpu-fake"
    capabilities = Capabilities(constraints=frozenset({"json_schema"}), gpu_offload=True)

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[int] = []

    def load(self, spec, load, config):  # type: ignore[no-untyped-def]
        from slmops.types.errors import OutOfMemory
        self.loads.append(load.num_gpu)
        if load.num_gpu:
            raise OutOfMemory("CUDA error: out of memory (cudaMalloc 2.1 GiB)")
        return _FakeModel(self)


def test_a_failed_gpu_load_falls_back_to_the_cpu_and_says_why() -> None:
    from slmops.engine.engine import Engine

    backend = _Gpu()
    spec = ModelSpec(name="fake", model_path=Path("/nonexistent"), context_length=64)
    engine = Engine(EngineConfig(default_ctx=32, num_gpu=99), backend=backend)
    try:
        out = list(engine.run(spec, Request(prompt="hello", raw=True)))
        assert "".join(o.text for o in out) == "hello"  # the request was served, on the CPU
        assert backend.loads == [99, 0]
        (status,) = engine.loaded()
        assert status.fallback == ("loading with GPU offload failed (CUDA error: out of memory (cudaMalloc 2.1 GiB)); "
                                   "on the CPU")
        list(engine.run(spec, Request(prompt="again", raw=True)))
        assert backend.loads == [99, 0]  # the CPU model serves what was asked for: no reload per request
    finally:
        engine.close()


def test_gpu_offload_asked_of_a_backend_without_it_runs_on_the_cpu_and_says_so(fake_engine) -> None:
    """This machine has no GPU: asking for layers on one runs the model on the CPU, reported in ps."""
    from slmops.engine.engine import Engine

    backend = _Fake()
    spec = ModelSpec(name="fake", model_path=Path("/nonexistent"), context_length=64)
    engine = Engine(EngineConfig(default_ctx=32), backend=backend)
    try:
        list(engine.run(spec, Request(prompt="hi", raw=True, options={"num_gpu": 12})))
        assert engine.loaded()[0].fallback == "GPU offload was asked for (num_gpu 12), but fake has none here; on the CPU"
        engine.unload("fake")
        list(engine.run(spec, Request(prompt="hi", raw=True)))
        assert engine.loaded()[0].fallback is None  # asked for nothing else than the CPU
    finally:
        engine.close()
