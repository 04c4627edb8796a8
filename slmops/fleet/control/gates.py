"""Rollout gates as data: ``load_failure_rate < 0.01``, ``ttft_p95 <= 1.2 x previous``, ``golden_score >= 0.8``.

A gate compares one metric of the new release on one hardware class either with a constant or with a factor of
the same metric of the release that class ran before (``previous``): a model that is twice as slow on a
Raspberry Pi but fine on a GPU box must stop on the Pi only, and "slow" only means something against what that
hardware did before. Metrics are what the agents report as aggregates (never text):

    load_failure_rate  load failures / devices that tried the release
    error_rate         failed requests / requests
    oom_rate           out-of-memory events / devices
    ttft_p50, ttft_p95 time to first token (ms), percentiles of the class's summed histogram
    itl_p50, itl_p95   time between tokens (ms), likewise
    tokens_per_s       generation speed, weighted by requests
    golden_score       share of golden prompts answered as expected (0..1)

A gate without enough data is neither passed nor failed but *waiting*; a relative gate whose previous value is
unknown (the class ran nothing before) is passed with a note, since there is nothing to regress from. Pure: no
database, no clock; what the numbers are comes in as :class:`Observation`.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

from slmops.types.errors import InvalidInput

METRICS = ("load_failure_rate", "error_rate", "oom_rate", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95",
           "tokens_per_s", "golden_score")
DEVICE_METRICS = frozenset({"load_failure_rate", "oom_rate", "golden_score"})  # judged per device, not request
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_GATE = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*"
                   r"(?:(?:x|\*|×)\s*previous)?\s*$")
Outcome = Literal["pass", "fail", "waiting"]


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    value: float
    relative: bool  # value is a factor of the previous release's metric on the same hardware class

    @classmethod
    def parse(cls, text: str) -> "Gate":
        m = _GATE.match(text)
        if not m:
            raise InvalidInput(f'gate "{text}": write METRIC OP NUMBER or METRIC OP FACTOR x previous, such as '
                               '"error_rate < 0.02" or "ttft_p95 <= 1.2 x previous"')
        metric, op, number = m.group(1), m.group(2), float(m.group(3))
        if metric not in METRICS:
            raise InvalidInput(f'gate "{text}": unknown metric {metric}; use one of {", ".join(METRICS)}')
        relative = "previous" in text
        return cls(metric, op, number, relative)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}{' x previous' if self.relative else ''}"


@dataclass(frozen=True)
class Observation:
    """One hardware class's numbers for one release over the gate window. ``devices``: devices of the class that
    report running the release (or failed to load it); ``requests``: requests they served."""

    devices: int = 0
    requests: int = 0
    metrics: Mapping[str, float | None] = None  # type: ignore[assignment]

    def get(self, metric: str) -> float | None:
        return (self.metrics or {}).get(metric)


@dataclass(frozen=True)
class Result:
    gate: str
    outcome: Outcome
    value: float | None
    threshold: float | None
    note: str = ""

    def to_json(self) -> dict[str, object]:
        return {"gate": self.gate, "outcome": self.outcome, "value": self.value, "threshold": self.threshold,
                **({"note": self.note} if self.note else {})}


def evaluate(gate: Gate, new: Observation, previous: Observation | None) -> Result:
    value = new.get(gate.metric)
    if value is None:
        return Result(str(gate), "waiting", None, None, "no data yet")
    threshold = gate.value
    if gate.relative:
        before = previous.get(gate.metric) if previous is not None else None
        if before is None:
            return Result(str(gate), "pass", value, None, "no previous release on this class to compare with")
        threshold = gate.value * before
    outcome: Outcome = "pass" if _OPS[gate.op](value, threshold) else "fail"
    return Result(str(gate), outcome, value, threshold)


def verdict(results: list[Result]) -> Outcome:
    """Any failed gate fails; otherwise any waiting one waits."""
    outcomes = {r.outcome for r in results}
    return "fail" if "fail" in outcomes else "waiting" if "waiting" in outcomes else "pass"


DEFAULT_GATES = ("load_failure_rate < 0.01", "error_rate < 0.02", "ttft_p95 <= 1.2 x previous",
                 "tokens_per_s >= 0.9 x previous", "golden_score >= 0.8")
