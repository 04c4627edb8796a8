"""Prometheus metrics, ``slmops_`` prefixed, in a registry owned by the app (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from slmops.engine.outputs import Stats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


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
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("slmops_time_per_output_token_seconds", "Decode time per generated token",
                              ["model"], buckets=_PER_TOKEN, registry=r)
        self.loaded_models = Gauge("slmops_loaded_models", "Models loaded now", registry=r)
        self.queue_depth = Gauge("slmops_queue_depth", "Requests waiting for a busy model", registry=r)
        self.batch_max = Gauge("slmops_batch_max_sequences", "Most sequences decoded in one step, per loaded model",
                               ["model"], registry=r)
        self.parallel = Gauge("slmops_parallel_sequences", "Sequences a loaded model decodes together",
                              ["model"], registry=r)
        self.in_flight = Gauge("slmops_requests_in_flight", "Model requests running or waiting", registry=r)
        self.cancelled = Counter("slmops_cancelled_generations", "Generations stopped because the client left",
                                 ["model"], registry=r)

    def generation(self, model: str, stats: Stats, ttft_s: float | None) -> None:
        self.prompt_tokens.labels(model).inc(stats.prompt_eval_count)
        self.completion_tokens.labels(model).inc(stats.eval_count)
        self.cached_tokens.labels(model).inc(stats.cached_prompt_tokens)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        if stats.eval_count > 1:
            self.tpot.labels(model).observe(stats.eval_duration / 1e9 / stats.eval_count)
