"""OpenTelemetry traces: the real app in process (a scripted engine, no model) exporting to the SDK's in-memory
exporter; then a real ``slmops serve`` with the real default model exporting OTLP/HTTP to a receiver on loopback
that decodes the protobuf, called by the official ``openai`` and ``ollama`` clients with a ``traceparent``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from registry import tiny_gguf
from slot_server import FakeEngine, stored
from slmops.engine.outputs import Output, Stats
from slmops.security.keys import KeyStore
from slmops.server import tracing
from slmops.server.access import AccessPolicy
from slmops.server.app import ServerConfig, create_app
from slmops.server.runtime import ModelRuntime
from slmops.types.errors import EngineError

MODEL = "m:1"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET_PROMPT = "the prompt text no trace should hold"


class TimedEngine(FakeEngine):
    """Answers with pieces after really spending time on "prefill" and "decode", and reports those times in its
    stats as a runner does; embeds as well."""

    def start(self, spec: Any, req: Any, emit: Any) -> Any:
        self.load(spec)
        if spec.name in self.failing:
            raise self.failing[spec.name]

        def produce() -> None:
            t0 = time.perf_counter_ns()
            time.sleep(0.02)
            t1 = time.perf_counter_ns()
            emit(Output(text="Hello", prompt_eval_count=7, eval_count=1))
            time.sleep(0.02)
            emit(Output(text=" there", prompt_eval_count=7, eval_count=2))
            t2 = time.perf_counter_ns()
            emit(Output(done=True, done_reason="length", stats=Stats(7, t1 - t0, 2, t2 - t1, 0, t2 - t0, 3)))
        threading.Thread(target=produce, daemon=True).start()
        return lambda: None

    def embed(self, spec: Any, inputs: list[str], options: Any = None, truncate: bool = True):
        self.load(spec)
        return [[0.6, 0.8, 0.0] for _ in inputs], 4 * len(inputs), 0


def build(home: Path, exporter: InMemorySpanExporter, capture: bool = False, batch: bool = False,
          engine: TimedEngine | None = None) -> TestClient:
    store = stored(home, tiny_gguf(home / "tiny.gguf"), MODEL)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600_000) if batch
                                else SimpleSpanProcessor(exporter))
    app = create_app(store, ModelRuntime(store, engine or TimedEngine(), keep_alive=300),  # type: ignore[arg-type]
                     ServerConfig(home=home), access=AccessPolicy(KeyStore(home / "keys.json")),
                     tracing=tracing.Tracing(provider, capture_content=capture))
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def client(tmp_path: Path, exporter: InMemorySpanExporter) -> Iterator[TestClient]:
    with build(tmp_path, exporter) as c:
        yield c


def request_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id}


def all_text(exporter: InMemorySpanExporter) -> str:
    return json.dumps([dict(s.attributes or {}) for s in exporter.get_finished_spans()], default=str)


CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": SECRET_PROMPT}]}


def test_a_chat_is_one_server_span_named_by_the_conventions_under_the_callers_trace(client, exporter):
    r = client.post("/api/chat", json={**CHAT, "options": {"temperature": 0.2, "top_p": 0.9, "seed": 42,
                                                            "num_predict": 16}},
                    headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    (span,) = request_spans(exporter)
    assert span.name == f"chat {MODEL}" and span.kind == SpanKind.SERVER
    assert span.context.trace_id == int(TRACE_ID, 16) and span.parent is not None
    assert span.parent.span_id == int(PARENT_ID, 16) and span.parent.is_remote
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "slmops"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.response.model"] == MODEL
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (7, 2)
    assert a["gen_ai.usage.cache_read.input_tokens"] == 3
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length",)
    assert (a["gen_ai.request.temperature"], a["gen_ai.request.top_p"]) == (0.2, 0.9)
    assert (a["gen_ai.request.seed"], a["gen_ai.request.max_tokens"]) == (42, 16)
    assert 0 < a["gen_ai.response.time_to_first_chunk"] <= (span.end_time - span.start_time) / 1e9
    assert a["http.response.status_code"] == 200 and "error.type" not in a
    assert span.status.status_code != StatusCode.ERROR
    assert SECRET_PROMPT not in all_text(exporter) and "Hello" not in all_text(exporter)


def test_queue_prefill_and_decode_are_child_spans_in_order(client, exporter):
    assert client.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": True}).status_code == 200
    (span,) = request_spans(exporter)
    assert span.name == f"text_completion {MODEL}"
    kids = children(exporter, span)
    assert set(kids) == {"queue", "prefill", "decode"}  # no load: the engine reported none
    q, p, d = kids["queue"], kids["prefill"], kids["decode"]
    assert all(k.context.trace_id == span.context.trace_id for k in kids.values())
    assert span.start_time <= q.start_time <= q.end_time <= p.start_time <= p.end_time <= d.start_time
    assert d.start_time < d.end_time <= span.end_time and p.start_time < p.end_time
    assert p.attributes["slmops.tokens"] == 7 and d.attributes["slmops.tokens"] == 2


def test_openai_routes_and_embeddings_are_traced_too(client, exporter):
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5, "stream": True})
    assert r.status_code == 200
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 200
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]})
    assert r.status_code == 200, r.text
    r = client.post("/api/embed", json={"model": MODEL, "input": "a"})
    assert r.status_code == 200
    assert client.get("/api/tags").status_code == 200  # not a model request: no span
    chat, completion, v1_embed, api_embed = request_spans(exporter)
    assert chat.name == f"chat {MODEL}" and chat.attributes["gen_ai.request.max_tokens"] == 5
    assert completion.name == f"text_completion {MODEL}" and completion.attributes["http.route"] == "/v1/completions"
    for span, tokens in ((v1_embed, 8), (api_embed, 4)):
        assert span.name == f"embeddings {MODEL}" and span.attributes["gen_ai.operation.name"] == "embeddings"
        assert span.attributes["gen_ai.usage.input_tokens"] == tokens
        assert span.attributes["gen_ai.embeddings.dimension.count"] == 3
        assert "gen_ai.usage.output_tokens" not in span.attributes
    assert chat.context.trace_id != completion.context.trace_id  # no traceparent: each a trace of its own


def test_message_text_only_when_the_operator_opts_in(tmp_path, exporter):
    with build(tmp_path, exporter, capture=True) as c:
        assert c.post("/api/chat", json=CHAT).status_code == 200
    (span,) = request_spans(exporter)
    assert json.loads(span.attributes["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": SECRET_PROMPT}]}]
    assert json.loads(span.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Hello there"}], "finish_reason": "length"}]


def test_failures_set_error_type(tmp_path, exporter):
    engine = TimedEngine()
    with build(tmp_path, exporter, engine=engine) as c:
        assert c.post("/api/chat", json={**CHAT, "model": "nosuch:1"}).status_code == 404
        engine.failing[MODEL] = EngineError("the model broke")
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 500
        assert c.post("/api/chat", content=b"{not json", headers={"content-type": "application/json"}).status_code \
            == 400
    missing, broken, bad = request_spans(exporter)
    assert missing.name == "chat nosuch:1" and missing.attributes["error.type"] == "ModelNotFound"
    assert missing.status.status_code != StatusCode.ERROR  # the caller's mistake, not the server's fault
    assert broken.attributes["error.type"] == "EngineError" and broken.status.status_code == StatusCode.ERROR
    assert tuple(broken.attributes["gen_ai.response.finish_reasons"]) == ("error",)
    assert bad.name == "chat" and bad.attributes["error.type"] == "400"


def test_a_client_that_leaves_mid_stream_ends_its_generation_as_cancelled(tmp_path, exporter):
    from slmops.engine.client import ModelSpec, Request
    from slmops.server.admission import Admission
    from slmops.server.inference import Inference
    from slmops.server.keepalive import Expiry
    from slmops.server.loaded import LoadedModels

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traces = tracing.Tracing(provider)
    engine = FakeEngine()  # answers "[m:1]", then holds its second piece until the gate opens
    engine.hold[MODEL] = threading.Event()

    async def go() -> None:
        models = LoadedModels(engine, Expiry())
        inference = Inference(engine, models, Admission(300, 2048))
        span = traces.start("text_completion", {"type": "http", "method": "POST", "path": "/api/generate",
                                                "headers": []})
        token = tracing.CURRENT.set(span)
        try:
            stream = inference.stream(ModelSpec(MODEL, tmp_path / "absent.gguf"), Request(prompt="hi"), 300)
            assert (await stream.__anext__()).text == f"[{MODEL}]"
            await stream.aclose()
        finally:
            tracing.CURRENT.reset(token)
            engine.hold[MODEL].set()
        span.end(200)
        await models.stop()
        inference.close()
    asyncio.run(go())
    (span,) = request_spans(exporter)
    assert span.attributes["error.type"] == "cancelled" and span.status.status_code != StatusCode.ERROR
    assert tuple(span.attributes["gen_ai.response.finish_reasons"]) == ("error",)
    assert span.attributes["gen_ai.usage.output_tokens"] == 1  # what it generated before the client left
    assert "decode" not in children(exporter, span)  # no final stats: no steps to lay out


def test_shutdown_flushes_what_the_batch_processor_holds(tmp_path, exporter):
    with build(tmp_path, exporter, batch=True) as c:
        assert c.post("/api/chat", json=CHAT).status_code == 200
        assert exporter.get_finished_spans() == ()  # held: the batch is due in ten minutes
    assert [s.name for s in request_spans(exporter)] == [f"chat {MODEL}"]


def test_off_unless_an_otlp_endpoint_is_set_and_then_nothing_is_imported():
    assert not tracing.enabled({}) and tracing.from_env({}) is None
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert not tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})
    probe = ("import sys; from slmops import wiring; from slmops.server import app, tracing; "
             "assert tracing.from_env({}) is None; "
             "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- a real server, a real OTLP/HTTP receiver ---------------------------------------------------------------------
class Receiver:
    """An OTLP/HTTP trace receiver on loopback: decodes each POST /v1/traces as ExportTraceServiceRequest."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)
        self.requests: list[Any] = []
        self.paths: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.paths.append(self.path)
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                received.requests.append(message)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[Any, Any]]:
        """(resource, span) pairs received so far."""
        return [(rs.resource, span) for req in self.requests for rs in req.resource_spans
                for ss in rs.scope_spans for span in ss.spans]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


@pytest.mark.slow
def test_a_real_server_sends_otlp_spans_under_the_clients_trace(tmp_path: Path, shared_home: Path):
    import ollama
    import openai
    from conftest import DEFAULT, Server, link_home

    receiver = Receiver()
    server = Server(link_home(shared_home, tmp_path / "home"), OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                    OTEL_BSP_SCHEDULE_DELAY="600000", OTEL_SERVICE_NAME="slmops-under-test")
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        chunks = list(oai.chat.completions.create(
            model=str(DEFAULT), messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=4, stream=True,
            extra_headers={"traceparent": TRACEPARENT}))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        embed_parent = "1111111111111111"
        ollama.Client(host=server.url, headers={"traceparent": f"00-{TRACE_ID}-{embed_parent}-01"}).embed(
            model=str(DEFAULT), input="hello")
        assert receiver.spans() == []  # held by the batch processor (ten-minute delay) until shutdown
    finally:
        server.stop()
        receiver.close()
    assert set(receiver.paths) == {"/v1/traces"}
    got = receiver.spans()
    resource = {kv.key: kv.value.string_value for kv in got[0][0].attributes}
    assert resource["service.name"] == "slmops-under-test"
    by_name = {span.name: span for _, span in got}
    chat, embed = by_name[f"chat {DEFAULT}"], by_name[f"embeddings {DEFAULT}"]
    for span, parent in ((chat, PARENT_ID), (embed, embed_parent)):
        assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == parent
        assert span.kind == span.SPAN_KIND_SERVER
    a = attributes(chat)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == str(DEFAULT)
    assert a["gen_ai.usage.input_tokens"] > 0 and 0 < a["gen_ai.usage.output_tokens"] <= 4
    assert a["gen_ai.request.max_tokens"] == 4 and a["gen_ai.response.finish_reasons"][0] in ("stop", "length")
    assert a["gen_ai.response.time_to_first_chunk"] > 0
    steps = {span.name: span for _, span in got if span.parent_span_id == chat.span_id}
    assert {"queue", "prefill", "decode"} <= set(steps)
    assert steps["prefill"].end_time_unix_nano <= steps["decode"].start_time_unix_nano
    assert chat.start_time_unix_nano <= steps["queue"].start_time_unix_nano
    assert steps["decode"].end_time_unix_nano <= chat.end_time_unix_nano
    assert attributes(embed)["gen_ai.usage.input_tokens"] > 0
    assert SECRET_PROMPT.encode() not in b"".join(r.SerializeToString() for r in receiver.requests)
