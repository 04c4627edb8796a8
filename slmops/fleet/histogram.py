"""Latency histograms with buckets fine enough for p95 gates, summed across a fleet.

A percentile cannot be averaged: the p95 of a hardware class is not the mean of its devices' p95s. Each device
counts its requests' latencies into the same fixed buckets; the control plane sums the counts per bucket (a SQL
``SUM ... GROUP BY bucket``) and reads the class's percentile from the sum. The buckets are quarter-octaves
(each bound 2^(1/4), about 19%, above the one before) from 1 ms to about 55 s, and a value is placed by
interpolating inside its bucket, so a percentile read from them is within a few percent of the exact one, well
under the 20% that a gate such as ``ttft_p95 <= 1.2 x previous`` tells apart. (Prometheus' default buckets, and
the server's own, jump 2-2.5x: a 20% regression can stay in one bucket.)

On the wire a histogram is a list of counts, bucket ``i`` holding values in ``(BOUNDS_MS[i-1], BOUNDS_MS[i]]``
(the last also everything above), trailing zeros dropped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

BUCKETS = 64
BOUNDS_MS: tuple[float, ...] = tuple(2 ** (i / 4) for i in range(BUCKETS))  # 1 ms .. ~55 s
BOUNDS_S: tuple[float, ...] = tuple(b / 1000 for b in BOUNDS_MS)


def bucket(value_ms: float) -> int:
    """The index of the bucket that counts ``value_ms`` (the last bucket for anything past the last bound)."""
    return min(bisect.bisect_left(BOUNDS_MS, value_ms), BUCKETS - 1)


class Histogram:
    """Counts of one latency in :data:`BOUNDS_MS` buckets; ``add`` one value, ``merge`` another's counts."""

    __slots__ = ("counts",)

    def __init__(self, counts: Iterable[int] = ()) -> None:
        self.counts = [0] * BUCKETS
        self.merge(counts)

    def add(self, value_ms: float, n: int = 1) -> None:
        self.counts[bucket(value_ms)] += n

    def merge(self, counts: Iterable[int]) -> None:
        for i, c in enumerate(counts):
            self.counts[i] += c

    @property
    def total(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        return quantile(self.counts, q)

    def to_wire(self) -> list[int]:
        """The counts with trailing zeros dropped (an empty list for no values)."""
        end = len(self.counts)
        while end and not self.counts[end - 1]:
            end -= 1
        return self.counts[:end]


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) in ms of values counted in ``counts``, interpolated linearly inside its bucket
    (the first bucket from 0); None when nothing was counted."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            low = BOUNDS_MS[i - 1] if i else 0.0
            return low + (BOUNDS_MS[i] - low) * max(0.0, rank - seen) / c
        seen += c
    return BOUNDS_MS[len(counts) - 1]
