"""Report windows from the server's /metrics text: the real Metrics registry scraped, diffed per window into the
fleet's histogram buckets, a server restart in the middle, and windows that carry numbers only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from slmops.engine.outputs import Stats
from slmops.fleet import histogram
from slmops.fleet.agent import telemetry
from slmops.fleet.agent.telemetry import Counters
from slmops.server.metrics import Metrics
from slmops.types.errors import EngineError, InvalidInput, OutOfMemory, RunnerCrashed, RunnerOutOfMemory

M, OTHER = "slot/smol-a:1", "slot/smol-b:2"


def generation(m: Metrics, model: str, ttft_ms: float, ms_per_token: float, tokens: int = 10) -> None:
    m.generation(model, Stats(5, 1_000_000, tokens, int(ms_per_token * tokens * 1e6), 0, 0), ttft_ms / 1000)


def scrape(m: Metrics) -> dict[str, Counters]:
    return telemetry.parse(generate_latest(m.registry).decode())


def test_a_window_is_the_difference_of_two_scrapes_in_fleet_buckets() -> None:
    m = Metrics()
    for ttft in (10, 20, 30):
        generation(m, M, ttft, 5)
    generation(m, OTHER, 900, 50)  # another model's numbers stay out of M's windows
    before = scrape(m)
    expected = histogram.Histogram()
    for i in range(100):
        ttft = 40 + i * 3
        generation(m, M, ttft, 8 + i % 4)
        expected.add(ttft)
    m.failure(M, EngineError("boom"), loaded=True)
    m.failure(M, EngineError("no memory"), loaded=False)
    m.failure(M, RunnerCrashed("killed"), loaded=False)
    m.failure(M, RunnerOutOfMemory("killed by SIGKILL"), loaded=False)  # the OOM killer
    m.failure(M, OutOfMemory("no room for the KV cache"), loaded=False)
    m.failure(M, InvalidInput("prompt too long"), loaded=True)  # the caller's mistake: not the model's failure
    counts = scrape(m)[M].minus(before[M])
    assert list(counts.ttft) == expected.counts  # each value in the bucket the fleet's own Histogram puts it in
    assert counts.finished == 100 and counts.tokens == 1000
    assert counts.failures == {"error": 1, "load": 1, "crash": 1, "oom": 2} and counts.errors == 5

    w = telemetry.window(100.0, 160.0, "smol:1", counts, memory=123)
    assert (w.start, w.end, w.release, w.requests, w.errors, w.load_failures, w.oom) == (
        100.0, 160.0, "smol:1", 105, 5, 1, 2)
    assert w.ttft_hist == expected.to_wire() and sum(w.itl_hist) == 100
    exact_p95 = sorted(40 + i * 3 for i in range(100))[94]
    assert abs(w.ttft_p95_ms - exact_p95) / exact_p95 < 0.1  # bucket interpolation: close, not exact
    assert w.itl_p50_ms is not None and 8 <= w.itl_p50_ms <= 12
    assert 80 < w.tokens_per_s < 125  # 8-11 ms per token
    assert w.memory_bytes == 123 and w.golden_score is None


def test_a_server_restart_counts_from_zero() -> None:
    first = Metrics()
    for _ in range(5):
        generation(first, M, 10, 5)
    before = scrape(first)[M]
    restarted = Metrics()
    generation(restarted, M, 10, 5)
    assert restarted is not first and scrape(restarted)[M].minus(before).finished == 1
    assert scrape(restarted)[M].minus(None).finished == 1


def test_a_server_with_coarser_buckets_is_read_approximately() -> None:
    registry = CollectorRegistry()
    h = Histogram("slmops_time_to_first_token_seconds", "", ["model"], buckets=(0.01, 0.1, 1.0), registry=registry)
    for seconds in (0.005, 0.05, 0.5, 5.0):
        h.labels(M).observe(seconds)
    counts = telemetry.parse(generate_latest(registry).decode())[M]
    assert counts.finished == 4
    assert [i for i, c in enumerate(counts.ttft) if c] == [histogram.bucket(10), histogram.bucket(100),
                                                           histogram.bucket(1000), histogram.BUCKETS - 1]


def test_failure_windows_and_empty_windows_carry_numbers_only() -> None:
    w = telemetry.failure_window(10.0, 12.5, "smol:3", golden_score=0.5, errors=1)
    assert (w.release, w.requests, w.errors, w.load_failures, w.golden_score) == ("smol:3", 1, 1, 0, 0.5)
    assert w.ttft_hist == [] and w.ttft_p95_ms is None and w.tokens_per_s is None
    quiet = telemetry.window(0.0, 60.0, "smol:1", Counters())
    assert quiet.requests == 0 and quiet.ttft_p50_ms is None
    assert set(w.model_dump()) == {"start", "end", "release", "requests", "errors", "load_failures", "oom",
                                   "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms", "tokens_per_s",
                                   "golden_score", "memory_bytes", "ttft_hist", "itl_hist"}
