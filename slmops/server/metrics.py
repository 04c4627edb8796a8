"""Prometheus metrics, ``slmops_`` prefixed, in a registry owned by the app (no process-global state).

Time to first token and time per output token count into the fleet's quarter-octave buckets
(:data:`slmops.fleet.histogram.BOUNDS_S`): the edge agent diffs the cumulative counts per report window into the
bucket counts the control plane sums per hardware class, so a p95 gate can tell a 20% regression apart (the
usual 2-2.5x buckets cannot). Requests for a model that fail on the server's side are counted per stored model and
kind (``load``: the model could not be made ready; ``crash``: its runner died; ``error``: anything else the engine
raised), which is what the agent's health window watches after a switch.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

from slmops.engine.outputs import Stats
from slmops.fleet.histogram import BOUNDS_S
from slmops.server.asgi import StatusSend
from slmops.types.errors import EngineError, IntegrityError, OutOfMemory, RunnerCrashed, SlmopsError

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmops_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("slmops_request_duration_seconds", "HTTP request latency", ["route"],
                                 buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("slmops_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("slmops_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.cached_tokens = Counter("slmops_cached_prompt_tokens", "Prompt tokens served from the KV cache",
                                     ["model"], registry=r)
        self.ttft = Histogram("slmops_time_to_first_token_seconds", "Time from request to first token", ["model"],
                              buckets=BOUNDS_S, registry=r)
        self.tpot = Histogram("slmops_time_per_output_token_seconds", "Decode time per generated token",
                              ["model"], buckets=BOUNDS_S, registry=r)
        self.loaded_models = Gauge("slmops_loaded_models", "Models loaded now", registry=r)
        self.queue_depth = Gauge("slmops_queue_depth", "Requests waiting for a busy model", registry=r)
        self.batch_max = Gauge("slmops_batch_max_sequences", "Most sequences decoded in one step, per loaded model",
                               ["model"], registry=r)
        self.parallel = Gauge("slmops_parallel_sequences", "Sequences a loaded model decodes together",
                              ["model"], registry=r)
        self.in_flight = Gauge("slmops_requests_in_flight", "Model requests running or waiting", registry=r)
        self.cancelled = Counter("slmops_cancelled_generations", "Generations stopped because the client left",
                                 ["model"], registry=r)
        self.fallbacks = Gauge("slmops_accelerator_fallback", "1 for a loaded model that runs on the CPU though a "
                               "GPU was asked for (see /api/ps for why)", ["model"], registry=r)
        self.failures = Counter("slmops_model_failures", "Requests that failed on the server's side, per stored "
                                "model and kind (load, oom, crash, error)", ["model", "kind"], registry=r)

    def generation(self, model: str, stats: Stats, ttft_s: float | None) -> None:
        self.prompt_tokens.labels(model).inc(stats.prompt_eval_count)
        self.completion_tokens.labels(model).inc(stats.eval_count)
        self.cached_tokens.labels(model).inc(stats.cached_prompt_tokens)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        if stats.eval_count > 1:
            self.tpot.labels(model).observe(stats.eval_duration / 1e9 / stats.eval_count)

    def cancellation(self, model: str) -> None:
        self.cancelled.labels(model).inc()

    def failure(self, model: str, err: SlmopsError, loaded: bool) -> None:
        """Count a request for ``model`` that failed with ``err``; ``loaded``: whether the model is loaded after
        it. Client mistakes (bad input, refusals, a full queue) are not failures of the model."""
        if isinstance(err, OutOfMemory):
            kind = "oom"  # a runner the OOM killer took, or an allocation llama.cpp could not make
        elif isinstance(err, RunnerCrashed):
            kind = "crash"
        elif isinstance(err, IntegrityError) or (isinstance(err, EngineError) and not loaded):
            kind = "load"  # damaged or untrusted blobs, or an engine error that left the model unloaded
        elif isinstance(err, EngineError):
            kind = "error"
        else:
            return
        self.failures.labels(model, kind).inc()


class Observed:
    """ASGI middleware, innermost: each request's count and latency to its last byte (a stream's whole length) by
    route template, and the version header on every answer. Raw ASGI because Starlette's ``@app.middleware``
    runs the route in a task of its own and passes every chunk of a stream through a memory channel: a cost per
    streamed token."""

    def __init__(self, app: ASGIApp, metrics: Metrics, version: str):
        self.app = app
        self.metrics = metrics
        self.headers = ((b"x-slmops-version", version.encode()),)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        sending = StatusSend(send, 500, self.headers)  # 500: what the server answers when the app raises first
        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(sending.status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
