"""The stated model of each simulated hardware class: how fast it serves, how long a new release takes to reach
it, and what one report window of it looks like.

The numbers describe a small model (a 135M-parameter chat model in Q8_0, ~145 MB) serving short requests on four
kinds of edge box. They are a model, not a measurement of those boxes: what matters to a rollout is that classes
differ by an order of magnitude, that latencies spread (log-normally, as service times do) and that a class's
numbers are steady enough for a gate such as ``ttft_p95 <= 1.2 x previous`` to tell a regression from noise.

    class          box                          TTFT p50  sigma  ITL p50  tokens/s  req/s  pull  load+smoke
    cpu-x86_64     4-core x86 mini PC            120 ms   0.18   12 ms      80      6     1.5 s   0.8 s
    cpu-aarch64    Raspberry Pi 5-like board     450 ms   0.18   45 ms      22      2     4.0 s   2.5 s
    cuda-x86_64    x86 box with a small NVIDIA    25 ms   0.18    4 ms     250     20     1.0 s   1.5 s
    npu-aarch64    aarch64 board with an NPU      90 ms   0.18   15 ms      65      5     3.0 s   2.0 s

- Requests per window are Poisson around ``requests_per_s`` x the window's length; each request's TTFT and ITL are
  drawn log-normally around the medians (sigma 0.18: p95 is ~1.34x the median), times the device's own speed
  factor (uniform in +-3%: boxes of one class differ a little), and counted in the fleet's histogram buckets
  (:mod:`slmops.fleet.histogram`), so the control plane sums real per-request histograms per class.
- Pull and load times are drawn uniformly in +-30% around the table's values (a pull fetches the blobs the device
  lacks; load covers the warm load and the golden prompts).
- A healthy release serves without errors and answers its golden prompts (score 1.0). With a small first wave a
  single error fails ``error_rate < 0.02`` (1 of 40 requests is 2.5%), so the model leaves errors to the faults.

Devices enrol with the hardware profile ``slmops hw --json`` would print on such a box (``profile``): the control
plane derives the class itself (:func:`slmops.fleet.hardware.hardware_class`), as it does for real devices.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from slmops.fleet.histogram import Histogram

SIGMA = 0.1
SPEED_SPREAD = 0.03  # a device's speed factor: uniform in 1 +- this
DELAY_SPREAD = 0.3  # pull and load times: uniform in 1 +- this


@dataclass(frozen=True)
class HardwareClass:
    name: str
    profile: dict[str, Any] = field(hash=False)  # what `slmops hw --json` reports on such a box
    ttft_ms: float  # median time to first token
    itl_ms: float  # median time between tokens
    tokens_per_s: float
    requests_per_s: float  # per device
    pull_s: float
    load_s: float  # warm load and golden prompts
    memory_bytes: int


def _profile(arch: str, gpus: list[dict[str, Any]] | None = None, offload: bool = False,
             providers: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": {"architecture": arch, "cores": 4}, "gpus": gpus or [],
                           "llama_gpu_offload": offload}
    if providers:
        out["onnx_providers"] = providers
    return out


CLASSES: dict[str, HardwareClass] = {c.name: c for c in (
    HardwareClass("cpu-x86_64", _profile("x86_64"), 120, 12, 80, 6, 1.5, 0.8, 400 << 20),
    HardwareClass("cpu-aarch64", _profile("aarch64"), 450, 45, 22, 2, 4.0, 2.5, 380 << 20),
    HardwareClass("cuda-x86_64", _profile("x86_64", [{"vendor": "nvidia", "name": "NVIDIA RTX A2000"}], True),
                  25, 4, 250, 20, 1.0, 1.5, 600 << 20),
    HardwareClass("npu-aarch64", _profile("aarch64", providers=["QNNExecutionProvider"]), 90, 15, 65, 5, 3.0, 2.0,
                  350 << 20),
)}


@dataclass(frozen=True)
class Serving:
    """How one release serves on one class: the class's numbers times the release's factors there (1.0: as
    before; a TTFT regression is ``ttft_factor`` > 1)."""

    cls: HardwareClass
    ttft_factor: float = 1.0
    tokens_factor: float = 1.0
    error_rate: float = 0.0
    golden_score: float = 1.0


@dataclass
class WindowNumbers:
    """One window's aggregates, before they become an ``api.fleet.Window``."""

    requests: int
    errors: int
    ttft: Histogram
    itl: Histogram
    tokens_per_s: float | None
    golden_score: float | None
    memory_bytes: int


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw: Knuth's product for small means, the normal approximation above 30."""
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def window(rng: random.Random, serving: Serving, speed: float, seconds: float) -> WindowNumbers:
    """What a device of speed factor ``speed`` (1.0 is the class median; higher is slower) served in ``seconds``."""
    cls = serving.cls
    n = poisson(rng, cls.requests_per_s * seconds)
    ttft, itl = Histogram(), Histogram()
    mu_ttft = math.log(cls.ttft_ms * speed * serving.ttft_factor)
    mu_itl = math.log(cls.itl_ms * speed / serving.tokens_factor)
    for _ in range(n):
        ttft.add(rng.lognormvariate(mu_ttft, SIGMA))
        itl.add(rng.lognormvariate(mu_itl, SIGMA))
    errors = sum(1 for _ in range(n) if rng.random() < serving.error_rate) if serving.error_rate else 0
    tps = cls.tokens_per_s * serving.tokens_factor / speed * (1 + rng.gauss(0, 0.01)) if n else None
    return WindowNumbers(n, errors, ttft, itl, tps, serving.golden_score if n else None, cls.memory_bytes)


def speed_factor(rng: random.Random) -> float:
    return 1 + rng.uniform(-SPEED_SPREAD, SPEED_SPREAD)


def delay(rng: random.Random, seconds: float) -> float:
    return seconds * (1 + rng.uniform(-DELAY_SPREAD, DELAY_SPREAD))


def parse_mix(text: str) -> dict[str, float]:
    """``cpu-x86_64=40,cpu-aarch64=30,...`` (weights) -> shares; empty: the four classes equally."""
    from slmops.types.errors import InvalidInput

    if not text:
        return {name: 1 / len(CLASSES) for name in CLASSES}
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        if name.strip() not in CLASSES:
            raise InvalidInput(f"--classes: unknown class {name.strip()!r}; use {', '.join(CLASSES)}")
        try:
            weights[name.strip()] = float(weight or 1)
        except ValueError:
            raise InvalidInput(f"--classes: {item!r} is not CLASS=WEIGHT") from None
    total = sum(weights.values())
    if total <= 0:
        raise InvalidInput("--classes: give at least one class a weight above 0")
    return {name: w / total for name, w in weights.items() if w > 0}


def assign(n: int, mix: dict[str, float]) -> list[str]:
    """The class of each of ``n`` devices: counts by largest remainder, interleaved so any prefix is mixed."""
    exact = {name: n * share for name, share in mix.items()}
    counts = {name: int(v) for name, v in exact.items()}
    for name in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[:n - sum(counts.values())]:
        counts[name] += 1
    out: list[str] = []
    left = dict(counts)
    while len(out) < n:
        for name in mix:
            if left[name]:
                out.append(name)
                left[name] -= 1
    return out
