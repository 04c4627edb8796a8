"""Per-key rate limits: requests per minute and tokens per minute, each a token bucket.

A bucket holds up to one minute's allowance and refills continuously, so short bursts pass and a steady rate
above the limit is refused with the seconds until the next request would pass (HTTP 429 with Retry-After).

Completion tokens are reserved before a generation starts (its ``num_predict``, or what is left of the bucket up
to the context size when it sets none, which then caps the generation) and the unused part is refunded when it
ends, however it ends: concurrent requests cannot all pass on one remaining token and together spend many times
the limit. Prompt tokens are only known once the prompt is tokenized, so they are charged afterwards; a key can
overdraw by the prompts of the requests it has in flight, never by what they generate.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Bucket:
    rate_per_minute: int
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.rate_per_minute, self.level + (now - self.stamp) * self.rate_per_minute / 60)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 if it is now)."""
        short = amount - self.level
        return 0.0 if short <= 0 else short * 60 / self.rate_per_minute


class RateLimiter:
    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, who: str, kind: str, rate: int) -> Bucket:
        b = self._buckets.get((who, kind))
        if b is None or b.rate_per_minute != rate:
            b = self._buckets[(who, kind)] = Bucket(rate, float(rate), self.clock())
        b.refill(self.clock())
        return b

    def admit(self, who: str, rpm: int = 0, tpm: int = 0) -> float:
        """Take one request from ``who``'s allowance; returns 0, or the seconds to wait (nothing taken)."""
        rpm, tpm = rpm or self.rpm, tpm or self.tpm
        with self._lock:
            if tpm:
                tokens = self._bucket(who, "tokens", tpm)
                if tokens.level <= 0:
                    return max(1.0, tokens.wait_for(1))
            if rpm:
                requests = self._bucket(who, "requests", rpm)
                wait = requests.wait_for(1)
                if wait:
                    return wait
                requests.level -= 1
        return 0.0

    def spend_tokens(self, who: str, n: int, tpm: int = 0) -> None:
        """Charge ``n`` tokens (negative: refund) to ``who``'s token bucket."""
        tpm = tpm or self.tpm
        if tpm and n:
            with self._lock:
                b = self._bucket(who, "tokens", tpm)
                b.level = min(float(tpm), b.level - n)

    def reserve_tokens(self, who: str, wanted: int, ceiling: int, tpm: int = 0) -> tuple[int | None, float]:
        """Set aside completion tokens for one generation: ``(reserved, 0)``, ``(None, 0)`` when no token limit
        applies, or ``(0, seconds to wait)`` when the bucket cannot cover it now.

        ``wanted`` > 0 reserves that many, at most one minute's allowance (a larger ``num_predict`` could never be
        met, so the generation is capped there instead of refused for ever); ``wanted`` <= 0 (no limit asked)
        reserves what the bucket holds, at most ``ceiling`` (the context size, the most a generation can take).
        """
        tpm = tpm or self.tpm
        if not tpm:
            return None, 0.0
        with self._lock:
            b = self._bucket(who, "tokens", tpm)
            amount = min(wanted, tpm) if wanted > 0 else min(int(b.level), max(1, ceiling))
            if amount < 1 or b.level < amount:
                return 0, max(1.0, b.wait_for(max(amount, 1)))
            b.level -= amount
            return amount, 0.0


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
