"""No JSON Schema may crash a runner: whatever a request's format, response_format or forced tool call asks for, the
grammar that reaches llama.cpp is bounded in depth, rules and size, or the request is a 400 naming the limit.

A ``maxLength`` of 20,000 used to compile to a grammar nested 20,000 levels deep, and llama.cpp's recursive parser
overflowed its stack: the runner died with SIGSEGV, taking every other stream of the model with it (the whole server
in thread mode)."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import llama_cpp
import ollama
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Server, link_home
from slmops.engine.llamacpp import gbnf, grammar
from slmops.engine.llamacpp.gbnf import check_grammar
from slmops.engine.backend import tool_call_schema
from slmops.engine.llamacpp.grammar import for_format, for_schema
from slmops.types.errors import InvalidInput

M = "smollm2:135m"
LONG = {"type": "string", "maxLength": 20000}
NOTE = {"type": "function", "function": {
    "name": "save_note", "description": "Save a note.",
    "parameters": {"type": "object", "properties": {"text": LONG}, "required": ["text"]}}}


# -- no model ---------------------------------------------------------------------------------------------------

def depth(gbnf: str) -> int:
    """How deep groups nest, read independently of the module: literals and classes skipped, escapes included."""
    deepest = level = i = 0
    while i < len(gbnf):
        c = gbnf[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            i += 1
            while gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "#":
            while i < len(gbnf) and gbnf[i] != "\n":
                i += 1
        elif c == "(":
            level += 1
            deepest = max(deepest, level)
        elif c == ")":
            level -= 1
        i += 1
    return deepest


def llama_parses(gbnf: str) -> bool:
    """llama.cpp's own parser, without a vocabulary: only for grammars already found shallow enough to parse."""
    sampler = llama_cpp.llama_sampler_init_grammar(None, gbnf.encode(), b"root")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    return bool(sampler)


def refused(schema_or_format, *words: str) -> str:
    with pytest.raises(InvalidInput) as err:
        for_format(schema_or_format)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_repetitions_are_flat_and_bounded():
    g = for_format({"type": "string", "minLength": 2, "maxLength": gbnf.MAX_REPEAT})
    assert f"char{{2,{gbnf.MAX_REPEAT}}}" in g and depth(g) <= 3 and llama_parses(g)
    g = for_format({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5})
    assert '("," space integer){1,4}' in g and llama_parses(g)
    g = for_format({"type": "array", "items": {"type": "integer"}, "maxItems": gbnf.MAX_REPEAT})
    assert f'("," space integer){{0,{gbnf.MAX_REPEAT - 1}}}' in g and llama_parses(g)
    refused({"type": "string", "maxLength": 20000}, "maxLength 20000", f"limit of {gbnf.MAX_REPEAT}", "lower")
    refused({"type": "array", "items": {"type": "string"}, "minItems": 10**9}, "minItems", "limit")
    refused({"type": "string", "pattern": "^a{0,5000}$"}, "5000", f"limit of {gbnf.MAX_REPEAT}")
    refused({"type": "string", "pattern": "^(ab){3000}$"}, "3000", "limit")
    # Depth comes from nothing else the converter writes: the JSON grammar and a typical schema stay shallow.
    assert depth(for_format("json")) <= 5
    assert depth(for_format({"type": "object", "properties": {"n": {"type": "number"}}})) <= 20


def test_impossible_counts_are_refused_not_looped_on():
    """llama.cpp computes max - min unsigned: ``{5,2}`` would have it build rules until memory ran out."""
    refused({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 is more than maxLength 2")
    refused({"type": "string", "pattern": "^a{5,2}$"}, "at least 5 and at most 2")
    refused({"type": "string", "maxLength": -1}, "maxLength", "whole number")
    refused({"type": "string", "maxLength": "5"}, "maxLength")
    with pytest.raises(InvalidInput, match="minimum over its maximum"):
        check_grammar('root ::= "a"{5,2}\n')
    refused({"type": "string", "maxLength": 10**40}, "maxLength of 41 digits is over the limit")


@pytest.mark.parametrize("wrap", [lambda s: {"type": "array", "items": s},
                                  lambda s: {"type": "object", "properties": {"x": s}},
                                  lambda s: {"anyOf": [s, {"type": "null"}]},
                                  lambda s: [s]])
def test_deep_schemas_are_a_400_not_a_recursion_error(wrap):
    schema: object = {"type": "string"}
    for _ in range(5000):
        schema = wrap(schema)
    fmt = {"type": "array", "items": schema} if isinstance(schema, list) else schema
    refused(fmt, f"more than {grammar.MAX_SCHEMA_DEPTH} levels", "flatten")
    with pytest.raises(InvalidInput):
        for_schema(tool_call_schema([{"function": {"name": "f", "parameters": fmt}}]))


def test_ref_chains_are_a_400():
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(3000)}
    defs["d3000"] = {"type": "string"}
    refused({"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}, "$ref", "flatten")


def test_grammar_limits_each_name_themselves():
    with pytest.raises(InvalidInput, match=f"nested more than {gbnf.MAX_GRAMMAR_DEPTH} levels"):
        check_grammar("root ::= " + "(" * 50_000 + '"x"' + ")" * 50_000 + "\n")
    many = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 2000} for i in range(11)}}
    refused(many, f"more than {gbnf.MAX_GRAMMAR_RULES} grammar rules")
    with pytest.raises(InvalidInput, match=f"more than {gbnf.MAX_GRAMMAR_ELEMENTS} elements"):
        check_grammar('root ::= "' + "x" * 600 + '"{2000}\n')
    refused({"enum": [f"v{i}" for i in range(3000)]}, f"more than {gbnf.MAX_GRAMMAR_ALTERNATIVES} alternatives")
    refused({"enum": ["x" * 200_000, "y" * 200_000]}, f"limit of {gbnf.MAX_GRAMMAR_BYTES}")
    # llama.cpp's own product limit, named before llama.cpp would refuse it with a message nobody sees.
    with pytest.raises(InvalidInput, match=f"part that holds 3 grammar rules 1000 times.*{gbnf.MAX_REPEAT}"):
        check_grammar('root ::= ("a"? "b"? "c"){1000}\n')
    assert not llama_parses('root ::= ("a"? "b"? "c"){1000}\n')


def test_what_parses_but_kills_or_stalls_a_runner_is_refused():
    # No token can follow: llama.cpp's sampler then aborts the runner (seen: SIGABRT).
    refused({"type": "string", "pattern": "^[^\\x00-\\U0010FFFF]$"}, "matches no character")
    refused({"type": "string", "pattern": "^\\x00$"}, "no model can write")
    # A repeated part that can be empty: 2 s a token at {0,100}.
    refused({"type": "string", "pattern": "^(a?){0,100}$"}, "can be empty")
    refused({"type": "string", "pattern": "^([a-z]*,?)*$"}, "can be empty")
    assert for_format({"type": "string", "pattern": "^[a-z]+(,[a-z]+)*$"})


def test_json_mode_and_tool_calls_take_the_same_path():
    assert for_format("json") == check_grammar(for_format("json"))
    tools = [{"function": {"name": "save", "parameters": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 20000}}}}}]
    with pytest.raises(InvalidInput, match="maxLength 20000 is over the limit"):
        for_schema(tool_call_schema(tools))


def test_the_dry_run_agrees_with_llama_cpp_on_what_parses():
    good = ['root ::= "a"{0,5} [b-d]+ ("x" | "y")*\n', 'root ::= x # c\nx ::= [^\\]"\\\\] "\\u00e9"\n',
            "root ::= (\n  \"a\"\n  | \"b\"\n)?\n", 'root ::= "a" {2} "b"{ 1 , 3 }\n', 'root ::= .{3,} "\\x41"\r\n']
    bad = ['root ::= "a" (\n', "root ::= x\n", 'root ::= "\\q"\n', 'root ::= *\n', 'root ::= "a"{,3}\n',
           'x ::= "a"\n', 'root ::= "a" "b\n', 'root ::= [a-\n', 'root ::= "a"{2}{3}{400}\n']
    for g in good:
        assert check_grammar(g) == g and llama_parses(g), g
    for g in bad:
        with pytest.raises(InvalidInput):
            check_grammar(g)
        assert not llama_parses(g), g


COUNTS = st.one_of(st.integers(0, 4), st.sampled_from([1999, 2000, 2001, 20000, 10**9]), st.integers(-2, 3000))
ATOMS = st.sampled_from(["a", "[a-z]", "(ab|c)", "[^\\x00-\\U0010FFFF]", "x?", "(a?)", ".", "[0-9]", "(a|b*)",
                         "\\x00", "é", "\\.", "(?:ab)"])
QUANTIFIERS = st.one_of(st.sampled_from(["", "?", "*", "+"]),
                        st.builds("{{{}}}".format, COUNTS), st.builds("{{{},{}}}".format, COUNTS, COUNTS),
                        st.builds("{{{},}}".format, COUNTS))
PATTERNS = st.lists(st.tuples(ATOMS, QUANTIFIERS), max_size=4).map(lambda p: "^" + "".join(a + q for a, q in p) + "$")


def _bounded(schema: dict, low_key: str, high_key: str, low, high) -> dict:
    return {**schema, **({low_key: low} if low is not None else {}), **({high_key: high} if high is not None else {})}


LEAVES = st.one_of(
    st.builds(_bounded, st.just({"type": "string"}), st.just("minLength"), st.just("maxLength"),
              st.none() | COUNTS, st.none() | COUNTS),
    st.builds(lambda p: {"type": "string", "pattern": p}, PATTERNS),
    st.sampled_from([{"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}, {},
                     {"type": "string", "format": "date"}, {"const": "x"}]),
    st.builds(lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n}, st.integers(-5, 5),
              st.integers(0, 1200)),
    st.builds(lambda vs: {"enum": vs}, st.lists(st.text(max_size=5), max_size=4)),
)


def _object(props: dict, required: list) -> dict:
    return {"type": "object", "properties": props, "required": [k for k in required if k in props]}


SCHEMAS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.builds(lambda items, lo, hi: _bounded({"type": "array", "items": items}, "minItems", "maxItems", lo, hi),
              inner, st.none() | COUNTS, st.none() | COUNTS),
    st.builds(_object, st.dictionaries(st.sampled_from("abcde"), inner, max_size=4),
              st.lists(st.sampled_from("abcde"), max_size=3)),
    st.builds(lambda alts: {"anyOf": alts}, st.lists(inner, min_size=1, max_size=3)),
), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEMAS)
def test_any_schema_compiles_within_the_limits_or_is_a_400(schema):
    try:
        g = for_format(schema)
    except InvalidInput as err:
        assert "\n" not in str(err)
        if "cannot parse" in str(err):  # llama.cpp would have refused it too (converter limits, not ours)
            converted = grammar.json_schema_to_gbnf(json.dumps(grammar.enforceable(schema)))
            assert not llama_parses(converted), converted
        return
    if g is None:
        return
    assert depth(g) <= gbnf.MAX_GRAMMAR_DEPTH and len(g.encode()) <= gbnf.MAX_GRAMMAR_BYTES
    assert llama_parses(g), g


# -- against a real server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["process", "thread"])
def srv(request, shared_home, tmp_path_factory):
    home = link_home(shared_home, tmp_path_factory.mktemp(f"grammar-{request.param}"))
    with Server(home, SLMOPS_RUNNERS=request.param, SLMOPS_NUM_PARALLEL="2", SLMOPS_CONTEXT_LENGTH="1024") as s:
        yield s


def _generate(url: str) -> tuple[httpx.Response, object, str]:
    r = httpx.post(url + "/api/generate", json={"model": M, "prompt": "Write a short note.", "format": LONG,
                                               "stream": False, "options": {"num_predict": 40, "seed": 1}},
                   timeout=120)
    done = r.status_code == 200 and r.json()["done_reason"] == "stop"
    return r, LONG, r.json()["response"] if done else None


def _generate_at_limit(url: str) -> tuple[httpx.Response, object, str]:
    schema = {"type": "string", "maxLength": gbnf.MAX_REPEAT}
    r = httpx.post(url + "/api/generate", json={"model": M, "prompt": "Write a short note.", "format": schema,
                                               "stream": False, "options": {"num_predict": 40, "seed": 1}},
                   timeout=120)
    assert r.status_code == 200, r.text  # the longest repetition allowed reaches llama.cpp, flat
    return r, schema, r.json()["response"] if r.json()["done_reason"] == "stop" else None


def _chat(url: str) -> tuple[httpx.Response, object, str]:
    schema = {"type": "object", "properties": {"note": LONG}, "required": ["note"]}
    r = httpx.post(url + "/api/chat", json={"model": M, "messages": [{"role": "user", "content": "A note."}],
                                           "format": schema, "stream": False,
                                           "options": {"num_predict": 40, "seed": 1}}, timeout=120)
    done = r.status_code == 200 and r.json()["done_reason"] == "stop"
    return r, schema, r.json()["message"]["content"] if done else None


def _response_format(url: str) -> tuple[httpx.Response, object, str]:
    r = httpx.post(url + "/v1/chat/completions", json={
        "model": M, "messages": [{"role": "user", "content": "Write a short note."}], "max_tokens": 40, "seed": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "note", "schema": LONG}}}, timeout=120)
    choice = r.json()["choices"][0] if r.status_code == 200 else None
    return r, LONG, choice["message"]["content"] if choice and choice["finish_reason"] == "stop" else None


def _forced_tool(url: str) -> tuple[httpx.Response, object, str]:
    r = httpx.post(url + "/v1/chat/completions", json={
        "model": M, "messages": [{"role": "user", "content": "Save a note saying hi."}], "max_tokens": 40,
        "seed": 1, "tools": [NOTE], "tool_choice": "required"}, timeout=120)
    choice = r.json()["choices"][0] if r.status_code == 200 else None
    done = choice and choice["finish_reason"] == "tool_calls"
    return r, NOTE["function"]["parameters"], choice["message"]["tool_calls"][0]["function"]["arguments"] \
        if done else None


def _stream(url: str, started: threading.Event, result: dict) -> None:
    body = {"model": M, "prompt": "1, 2, 3, 4, 5,", "raw": True,
            "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 120}}
    lines = []
    try:
        with httpx.stream("POST", url + "/api/generate", json=body, timeout=300) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                lines.append(json.loads(line))
                started.set()
    finally:
        result["lines"] = lines
        started.set()


@pytest.mark.slow
@pytest.mark.parametrize("attack", [_generate, _chat, _response_format, _forced_tool, _generate_at_limit],
                         ids=["generate-format", "chat-format", "v1-response_format", "v1-tool_choice-required",
                              "generate-at-the-limit"])
def test_a_long_max_length_neither_crashes_nor_stops_other_streams(srv, attack):
    ollama.Client(host=srv.url).generate(model=M, prompt="hi", options={"num_predict": 1})  # loaded
    started, other = threading.Event(), {}
    t = threading.Thread(target=_stream, args=(srv.url, started, other))
    t.start()
    assert started.wait(120) and other.get("status") == 200
    r, schema, output = attack(srv.url)
    running = t.is_alive()
    t.join(300)
    assert not t.is_alive(), "the other stream did not finish"

    if r.status_code == 400:
        error = r.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert "20000" in message and "limit" in message and "\n" not in message, message
    else:
        assert r.status_code == 200, r.text
        if output is not None:  # finished rather than cut at the token limit: it satisfies the schema
            jsonschema.validate(json.loads(output), schema)
    assert running, "the other stream finished before the attack was answered; the test proves nothing"
    end = other["lines"][-1]
    assert "error" not in end and end["done"] and end["eval_count"] == 120, end
    assert srv.proc.poll() is None
    assert ollama.Client(host=srv.url).generate(model=M, prompt="Hi", options={"num_predict": 2}).done


@pytest.mark.slow
@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 5},
    {"type": "string", "minLength": 3, "maxLength": 4},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,3}$"}},
     "required": ["code"]},
], ids=["maxLength", "min-and-maxLength", "min-and-maxItems", "maxItems", "pattern-counts"])
def test_flat_repetitions_still_constrain_output(server, schema):
    """Hot sampling pushes against the bounds; every finished output satisfies the schema."""
    finished = 0
    for seed in range(6):
        r = httpx.post(server.url + "/api/generate", json={
            "model": M, "prompt": "Write a long answer.", "format": schema, "stream": False,
            "options": {"temperature": 1.5, "seed": seed, "num_predict": 60}}, timeout=120).json()
        if r["done_reason"] == "stop":
            jsonschema.validate(json.loads(r["response"]), schema)
            finished += 1
    assert finished >= 3
