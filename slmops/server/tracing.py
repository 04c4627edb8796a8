"""OpenTelemetry traces of model requests, named as the GenAI semantic conventions name them, sent over OTLP/HTTP.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; then
:func:`from_env` builds a tracer provider that belongs to the app (``app.state.tracing``; the app shuts it down,
which flushes what is buffered). Off, nothing of the OpenTelemetry SDK is imported, so start-up costs nothing. The
SDK reads its other ``OTEL_*`` variables itself (headers, timeout, compression, sampler, batch delays, service
name, resource attributes): they mean here what they mean everywhere.

One span per model request (a POST to a generation or embedding route), named ``{gen_ai.operation.name}
{gen_ai.request.model}``. Its kind is SERVER: the GenAI conventions describe the caller's CLIENT span; this is the
side that answers it, and the caller's span becomes its parent through the incoming W3C ``traceparent``. Each
generation adds child spans rebuilt from the engine's stats. Those are durations measured in the runner process,
so they are laid back from the moment the server had the final record, inside the generation's own time:

- ``queue``: from the generation's start in the server to the first step of the model's batch that evaluates its
  prompt (the starter thread, the pipe to the runner, the batch scheduler's queue); with a load, one ``queue`` span
  before it and one after, for the batch's queue;
- ``load``: the model's load, when this request paid for it;
- ``prefill``: the prompt's evaluation up to the first sampled token;
- ``decode``: from the first sampled token to the last.

``gen_ai.response.time_to_first_chunk`` is the server's view: seconds from the request's arrival to the model's
first piece (the convention's client-side figure adds the network). ``error.type`` is the class name of the error
(``ModelNotFound``, ``RunnerCrashed``...), ``cancelled`` for a client that left mid-generation, else the HTTP
status code; the span's status is ERROR only for the server's own faults (5xx, or a failure mid-stream).

Prompt and output text stay out of spans unless ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``
(OpenTelemetry's own switch): then ``gen_ai.input.messages``, ``gen_ai.system_instructions`` and
``gen_ai.output.messages`` carry them, as JSON in the conventions' message shape. Embedding inputs never do.
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from slmops.server import access, errors
from slmops.server.asgi import StatusSend
from slmops.types.errors import SlmopsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from slmops.engine.client import Request
    from slmops.engine.outputs import Output, Stats

PROVIDER = "slmops"  # gen_ai.provider.name: the server that runs the model, as no listed provider fits
CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
OPERATIONS = {  # POST routes -> gen_ai.operation.name
    "/api/chat": "chat", "/api/generate": "text_completion", "/api/embed": "embeddings",
    "/api/embeddings": "embeddings", "/v1/chat/completions": "chat", "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings", "/v1/responses": "chat"}
_OPTIONS = {"num_predict": "gen_ai.request.max_tokens", "temperature": "gen_ai.request.temperature",
            "top_p": "gen_ai.request.top_p", "top_k": "gen_ai.request.top_k", "seed": "gen_ai.request.seed",
            "frequency_penalty": "gen_ai.request.frequency_penalty",
            "presence_penalty": "gen_ai.request.presence_penalty"}


def enabled(env: Mapping[str, str]) -> bool:
    """Whether ``env`` turns traces on: an OTLP endpoint, and neither the SDK nor its trace exporter switched off."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(endpoint) and env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true" \
        and env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none"


def from_env(env: Mapping[str, str]) -> Tracing | None:
    """The app's tracing as ``env`` asks, or None (nothing imported). The exporter, batch processor, sampler and
    resource read their own ``OTEL_*`` variables from the process environment."""
    if not enabled(env):
        return None
    import slmops

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = OTELResourceDetector().detect().attributes.get("service.name") or "slmops"  # the operator's name wins
    provider = TracerProvider(resource=Resource.create({"service.name": named,
                                                        "service.version": slmops.__version__}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider, env.get(CAPTURE, "").strip().lower() == "true")


class Tracing:
    """The app's tracer provider and whether spans may carry message text. Built with any provider (tests give
    one with an in-memory exporter)."""

    def __init__(self, provider: TracerProvider, capture_content: bool = False):
        import slmops

        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        self.provider = provider
        self.tracer = provider.get_tracer("slmops.server", slmops.__version__)
        self.propagator = TraceContextTextMapPropagator()
        self.capture_content = capture_content

    def start(self, operation: str, scope: Scope) -> RequestSpan:
        """A request's span, a child of the caller's span when its headers carry a ``traceparent``."""
        from opentelemetry.trace import SpanKind
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        parent = self.propagator.extract(headers)
        span = self.tracer.start_span(operation, context=parent, kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER,
            "http.request.method": scope["method"], "http.route": scope.get("path", ""),
            "url.scheme": scope.get("scheme", "http")})
        return RequestSpan(self, span, operation)

    def shutdown(self) -> None:
        """Flush what the batch processor holds and stop exporting."""
        self.provider.shutdown()


CURRENT: contextvars.ContextVar[RequestSpan | None] = contextvars.ContextVar("slmops_span", default=None)


def current() -> RequestSpan | None:
    """The traced request this code runs for; None when tracing is off or the route is not a model request."""
    return CURRENT.get()


class Traced:
    """Middleware: a span around each model request, ended once its response (streamed or not) is sent."""

    def __init__(self, app: ASGIApp, tracing: Tracing):
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = OPERATIONS.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        if operation is None:
            return await self.app(scope, receive, send)
        span = self.tracing.start(operation, scope)
        if not span.span.is_recording():  # sampled out (the caller's flags, OTEL_TRACES_SAMPLER): nothing to add
            span.span.end()
            return await self.app(scope, receive, send)
        token = CURRENT.set(span)
        sending = StatusSend(send, 500)
        try:
            await self.app(scope, receive, sending)
        except BaseException as err:
            span.failed(err)
            raise
        finally:
            CURRENT.reset(token)
            span.end(sending.status)


class RequestSpan:
    """One model request's span: the runtime reports its generations and embeddings here as they happen."""

    def __init__(self, tracing: Tracing, span: Span, operation: str):
        self.tracing = tracing
        self.span = span
        self.operation = operation
        self.capture = tracing.capture_content
        self.started_ns: int = getattr(span, "start_time", None) or time.time_ns()
        self.requested: str | None = None
        self.finish_reasons: list[str] = []
        self.usage = [0, 0, 0]  # input, output, cached input tokens
        self.first_ns: int | None = None
        self.outputs: list[dict[str, Any]] = []
        self.error: str | None = None
        self.fault = False

    def model(self, requested: str, model: str, req: Request | None = None) -> None:
        """A generation or an embedding runs on ``model`` (the stored model) for ``requested`` (the name the caller
        gave). The first one names the span and sets what was asked for."""
        if self.requested is not None:
            return
        self.requested = requested
        self.span.update_name(f"{self.operation} {requested}")
        attrs: dict[str, Any] = {"gen_ai.request.model": requested, "gen_ai.response.model": model}
        if req is not None:
            attrs.update(request_attributes(req))
            if self.capture:
                attrs.update(input_messages(req))
        self.span.set_attributes(attrs)

    def generation(self, requested: str, model: str, req: Request) -> Generation:
        self.model(requested, model, req)
        return Generation(self)

    def embedded(self, requested: str, model: str, vectors: list[list[float]], used: int, load_ns: int,
                 started_ns: int) -> None:
        self.model(requested, model)
        self.usage[0] += used
        self.span.set_attribute("gen_ai.embeddings.dimension.count", len(vectors[0]) if vectors else 0)
        if load_ns > 0:
            end = time.time_ns()
            self._child("load", max(started_ns, end - load_ns), end)

    def failed(self, err: BaseException) -> None:
        """The request failed with ``err`` (a refusal, a model's failure, a client gone); the first cause stays."""
        import asyncio
        if self.error is not None:
            return
        if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
            self.error = "cancelled"
            return
        self.error = type(err).__name__
        self.fault = not isinstance(err, SlmopsError) or errors.status_for(err) >= 500

    def end(self, status: int) -> None:
        from opentelemetry.trace import Status, StatusCode
        if self.requested is None:  # refused before any model ran: the name it asked for, when it got that far
            ctx = access.current()
            if ctx is not None and ctx.model:
                self.requested = ctx.model
                self.span.update_name(f"{self.operation} {ctx.model}")
                self.span.set_attribute("gen_ai.request.model", ctx.model)
        attrs: dict[str, Any] = {"http.response.status_code": status}
        if self.finish_reasons or self.usage[0]:
            attrs["gen_ai.usage.input_tokens"] = self.usage[0]
            if self.operation != "embeddings":
                attrs["gen_ai.usage.output_tokens"] = self.usage[1]
        if self.usage[2]:
            attrs["gen_ai.usage.cache_read.input_tokens"] = self.usage[2]
        if self.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = self.finish_reasons
        if self.first_ns is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = (self.first_ns - self.started_ns) / 1e9
        if self.capture and self.outputs:
            attrs["gen_ai.output.messages"] = json.dumps(self.outputs, ensure_ascii=False)
        if self.error is None and status >= 400:
            self.error, self.fault = str(status), status >= 500
        if self.error is not None:
            attrs["error.type"] = self.error
        self.span.set_attributes(attrs)
        if self.fault or status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, self.error))
        self.span.end()

    def _child(self, name: str, start_ns: int, end_ns: int, **attrs: Any) -> None:
        from opentelemetry import trace
        span = self.tracing.tracer.start_span(name, context=trace.set_span_in_context(self.span),
                                              start_time=start_ns, attributes=attrs or None)
        span.end(end_time=end_ns)


class Generation:
    """One stream's account on its request's span: when its first piece came, its text when captured, its
    counts, and at its end the queue, load, prefill and decode spans."""

    def __init__(self, parent: RequestSpan):
        self.parent = parent
        self.started_ns = time.time_ns()
        self.text: list[str] | None = [] if parent.capture else None
        self.calls: list[dict[str, Any]] = []
        self.counts = (0, 0)
        self.open = True

    def piece(self, item: Output) -> None:
        if self.parent.first_ns is None and (item.text or item.done):
            self.parent.first_ns = time.time_ns()
        if self.text is not None:
            self.text.append(item.text)
            self.calls += [{"type": "tool_call", "name": c.name, "arguments": c.arguments} for c in item.tool_calls]
        self.counts = (max(self.counts[0], item.prompt_eval_count), max(self.counts[1], item.eval_count))
        if item.done and item.stats is not None:
            self._finish(item.stats, item.done_reason or "stop")

    def cut_short(self, err: BaseException) -> None:
        """The stream ended without its final record: failed, or its client left."""
        if self.open:
            self.parent.failed(err)
            self._close("error", self.counts[0], self.counts[1])

    def _finish(self, stats: Stats, reason: str) -> None:
        end = time.time_ns()
        t0, p = self.started_ns, self.parent
        decode = max(t0, end - stats.eval_duration)
        prefill = max(t0, decode - stats.prompt_eval_duration)
        batched = max(t0, prefill - stats.queue_duration)  # its wait for the model's batch began here
        load = max(t0, batched - stats.load_duration)
        if stats.load_duration:
            p._child("queue", t0, load)
            p._child("load", load, batched)
            if stats.queue_duration:
                p._child("queue", batched, prefill)
        else:
            p._child("queue", t0, prefill)
        p._child("prefill", prefill, decode, **{"slmops.tokens": stats.prompt_eval_count,
                                               "slmops.cached_tokens": stats.cached_prompt_tokens})
        p._child("decode", decode, end, **{"slmops.tokens": stats.eval_count})
        p.usage[2] += stats.cached_prompt_tokens
        self._close(reason, stats.prompt_eval_count, stats.eval_count)

    def _close(self, reason: str, prompt_tokens: int, output_tokens: int) -> None:
        self.open = False
        p = self.parent
        p.finish_reasons.append(reason)
        p.usage[0] += prompt_tokens
        p.usage[1] += output_tokens
        if self.text is not None:
            parts = ([{"type": "text", "content": "".join(self.text)}] if any(self.text) else []) + self.calls
            p.outputs.append({"role": "assistant", "parts": parts, "finish_reason": reason})


def request_attributes(req: Request) -> dict[str, Any]:
    """The sampling settings the generation runs with (Ollama's option names -> the conventions')."""
    options = req.options or {}
    attrs: dict[str, Any] = {}
    for option, attr in _OPTIONS.items():
        value = options.get(option)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if option == "num_predict" and value < 0:
            continue  # no limit
        attrs[attr] = int(value) if attr.endswith(("max_tokens", "top_k", "seed")) else float(value)
    stop = options.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = stop
    return attrs


def input_messages(req: Request) -> dict[str, str]:
    """The request's text in the conventions' message shape (only with content capture on)."""
    attrs: dict[str, str] = {}
    if req.system:
        attrs["gen_ai.system_instructions"] = json.dumps([{"type": "text", "content": req.system}],
                                                         ensure_ascii=False)
    if req.messages is not None:
        messages = [_message(m) for m in req.messages]
    else:
        messages = [{"role": "user", "parts": [{"type": "text", "content": req.prompt or ""}]}]
    attrs["gen_ai.input.messages"] = json.dumps(messages, ensure_ascii=False)
    return attrs


def _message(m: dict[str, Any]) -> dict[str, Any]:
    content = m.get("content")
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False) if content else ""
    role = m.get("role", "user")
    if role == "tool":
        return {"role": "tool", "parts": [{"type": "tool_call_response", "response": text}]}
    parts: list[dict[str, Any]] = [{"type": "text", "content": text}] if text else []
    for call in m.get("tool_calls") or []:
        fn = call.get("function", {})
        parts.append({"type": "tool_call", "name": fn.get("name"), "arguments": fn.get("arguments")})
    return {"role": role, "parts": parts}


__all__ = ["OPERATIONS", "RequestSpan", "Traced", "Tracing", "current", "enabled", "from_env"]
