"""Report windows from the local server's ``/metrics``: aggregates only, never a prompt's or an answer's text.

The server counts per stored model (a slot's hidden name): time to first token and time per output token in the
fleet's quarter-octave buckets (:mod:`slmops.fleet.histogram`), tokens generated, and failures by kind (``load``,
``oom``, ``crash``, ``error``; ``oom`` is reported as the window's ``oom``). The agent reads the cumulative counts
at the start and the end of a window and reports the difference for the model serving now, labelled with its
release: requests are the generations that finished plus the ones that failed, ``ttft_hist``/``itl_hist`` the
bucket counts the control plane sums per hardware class, percentiles and tokens/s read from them. A counter that
went down means the server restarted: its values then count from zero, and the window takes them as they are.

ITL here is each generation's mean decode time per token (one value per request), which is what the server
measures; tokens/s is requests over the summed per-token times (the harmonic mean of each request's decode rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from slmops.api.fleet import Window
from slmops.fleet import histogram
from slmops.fleet.histogram import BUCKETS, Histogram

TTFT = "slmops_time_to_first_token_seconds"
TPOT = "slmops_time_per_output_token_seconds"
TOKENS = "slmops_completion_tokens"
FAILURES = "slmops_model_failures"
KINDS = ("load", "oom", "crash", "error")  # slmops_model_failures{kind}: server/metrics.py


@dataclass(frozen=True)
class Counters:
    """One stored model's counters, cumulative as scraped or the difference of two scrapes."""

    ttft: tuple[int, ...] = (0,) * BUCKETS  # per fleet bucket (not cumulative)
    itl: tuple[int, ...] = (0,) * BUCKETS
    itl_sum_s: float = 0.0
    tokens: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # kind -> count

    @property
    def finished(self) -> int:
        return sum(self.ttft)

    @property
    def errors(self) -> int:
        return sum(self.failures.values())

    def minus(self, before: Counters | None) -> Counters:
        """What happened since ``before``; everything since zero when a counter went down (a server restart)."""
        if before is None:
            return self
        kinds = {*self.failures, *before.failures}
        pairs = [*zip(self.ttft, before.ttft, strict=True), *zip(self.itl, before.itl, strict=True),
                 (self.tokens, before.tokens), *((self.failures.get(k, 0), before.failures.get(k, 0)) for k in kinds)]
        if any(now < then for now, then in pairs):
            return self
        return Counters(tuple(a - b for a, b in zip(self.ttft, before.ttft, strict=True)),
                        tuple(a - b for a, b in zip(self.itl, before.itl, strict=True)),
                        max(0.0, self.itl_sum_s - before.itl_sum_s), self.tokens - before.tokens,
                        {k: self.failures.get(k, 0) - before.failures.get(k, 0) for k in self.failures})


def parse(text: str) -> dict[str, Counters]:
    """Stored model -> its counters, from the Prometheus text ``/metrics`` serves."""
    # the full install's library: imported here, so the fleet package imports without it
    from prometheus_client.parser import text_string_to_metric_families

    cumulative: dict[tuple[str, str], dict[float, float]] = {}  # (histogram, model) -> le -> cumulative count
    sums: dict[str, float] = {}
    tokens: dict[str, float] = {}
    failures: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            if family.name in (TTFT, TPOT) and s.name.endswith("_bucket"):
                cumulative.setdefault((family.name, model), {})[float(s.labels["le"])] = s.value
            elif family.name == TPOT and s.name.endswith("_sum"):
                sums[model] = s.value
            elif family.name == TOKENS and s.name.endswith("_total"):
                tokens[model] = s.value
            elif family.name == FAILURES and s.name.endswith("_total"):
                failures.setdefault(model, {})[s.labels.get("kind", "error")] = int(s.value)
    models = {m for _, m in cumulative} | set(tokens) | set(failures)
    return {m: Counters(_buckets(cumulative.get((TTFT, m), {})), _buckets(cumulative.get((TPOT, m), {})),
                        sums.get(m, 0.0), tokens.get(m, 0.0), failures.get(m, {})) for m in models}


def _buckets(cumulative: dict[float, float]) -> tuple[int, ...]:
    """Per fleet bucket counts from a Prometheus histogram's cumulative ``le`` counts. The server's bounds are the
    fleet's, so each count lands in its own bucket; a server with other bounds is read approximately (each count
    in the fleet bucket of its upper bound)."""
    counts = [0] * BUCKETS
    seen = 0.0
    for le in sorted(cumulative):
        n = cumulative[le] - seen
        seen = cumulative[le]
        if n <= 0:
            continue
        index = BUCKETS - 1 if math.isinf(le) else histogram.bucket(le * 1000 * (1 - 1e-9))
        counts[index] += round(n)
    return tuple(counts)


def window(start: float, end: float, release: str | None, counts: Counters, *, memory: int | None = None,
           golden_score: float | None = None, load_failures: int = 0) -> Window:
    """The report window of ``counts`` (a difference) for ``release``; ``load_failures`` adds the agent's own
    (a slot that did not load)."""
    ttft, itl = Histogram(counts.ttft), Histogram(counts.itl)
    return Window(start=start, end=end, release=release, requests=counts.finished + counts.errors,
                  errors=counts.errors, load_failures=counts.failures.get("load", 0) + load_failures,
                  oom=counts.failures.get("oom", 0),
                  ttft_p50_ms=ttft.quantile(0.5), ttft_p95_ms=ttft.quantile(0.95),
                  itl_p50_ms=itl.quantile(0.5), itl_p95_ms=itl.quantile(0.95),
                  tokens_per_s=(itl.total / counts.itl_sum_s) if itl.total and counts.itl_sum_s > 0 else None,
                  golden_score=golden_score, memory_bytes=memory, ttft_hist=ttft.to_wire(), itl_hist=itl.to_wire())


def failure_window(start: float, end: float, release: str, *, golden_score: float | None = None,
                   load_failures: int = 0, errors: int = 0) -> Window:
    """The window a release that did not get to serve is reported in: its smoke test or load failed."""
    empty = replace(Counters(), failures={"error": errors} if errors else {})
    return window(start, end, release, empty, golden_score=golden_score, load_failures=load_failures)


__all__ = ["Counters", "failure_window", "parse", "window"]
