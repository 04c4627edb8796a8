"""A wave rollout as a pure state machine, per hardware class: ``step(observations, now) -> decisions``.

Each hardware class moves through the waves on its own: a variant that fails to load on one class is stopped
there, and the devices of that class that took it are reverted, while the classes that pass go on (AWS IoT Jobs
stops a whole job and reverts nothing; Argo Rollouts gates on metrics but knows no hardware). Rules:

- A wave targets a cumulative share of each class's devices (``waves = (0.01, 0.1, 0.5, 1.0)``); at least one
  device per class, chosen by a stable hash of (rollout, device), so a device stays in the wave it was put in.
- **Fail fast, pass slow**: a failing gate with enough sample stops the class at once, even while the wave
  bakes; passing needs the bake time over *and* enough sample (``min_devices`` reporting, ``min_requests``).
- A stopped class is reverted: a ``revert`` decision for it (the caller gives its devices a new desired state
  pointing at the previous release: versions only move forward, so anti-rollback holds).
- Pause holds every class where it is; resume lets them go on; promote takes a class (or all) to the last wave;
  abort reverts every class that is not done.

Every decision carries the numbers that made it, for the ledger. Pure: no database, no clock, no network;
the control plane feeds it observations computed with SQL aggregates (``gates.Observation``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from slmops.fleet.control.gates import DEVICE_METRICS, Gate, Observation, evaluate, verdict
from slmops.types.errors import Conflict, InvalidInput

RolloutStatus = Literal["running", "paused", "completed", "aborted"]
ClassStatus = Literal["active", "done", "failed", "aborted"]


@dataclass(frozen=True)
class Plan:
    waves: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0)
    bake_s: float = 60.0
    min_devices: int = 1
    min_requests: int = 0
    gates: tuple[Gate, ...] = ()

    def __post_init__(self) -> None:
        if not self.waves or any(not 0 < w <= 1 for w in self.waves) or list(self.waves) != sorted(set(self.waves)):
            raise InvalidInput("waves must be increasing shares of the group in (0, 1], such as 1,10,50,100 (%)")
        if self.waves[-1] != 1:
            raise InvalidInput("the last wave must cover the whole group (100%)")
        if self.bake_s < 0 or self.min_devices < 1 or self.min_requests < 0:
            raise InvalidInput("bake time and minimum requests must be 0 or more, minimum devices 1 or more")

    @classmethod
    def from_percent(cls, waves: Iterable[float], **kw: Any) -> "Plan":
        return cls(waves=tuple(w / 100 for w in waves), **kw)


@dataclass
class ClassState:
    wave: int = 0
    status: ClassStatus = "active"
    wave_started: float = 0.0
    last: list[dict[str, Any]] = field(default_factory=list)  # the latest gate results, for status views


@dataclass(frozen=True)
class Decision:
    action: str  # wave_advanced | class_completed | gate_failed | revert | paused | resumed | promoted | aborted
    hardware_class: str | None
    data: Mapping[str, Any]


@dataclass
class Rollout:
    id: str
    plan: Plan
    classes: dict[str, ClassState]
    status: RolloutStatus = "running"

    @classmethod
    def start(cls, rollout_id: str, plan: Plan, hardware_classes: Iterable[str], now: float) -> "Rollout":
        return cls(rollout_id, plan, {c: ClassState(wave_started=now) for c in sorted(set(hardware_classes))})

    def share(self, hardware_class: str) -> float:
        """The share of the class's devices the rollout targets now (0 once it failed or was aborted)."""
        state = self.classes[hardware_class]
        return 0.0 if state.status in ("failed", "aborted") else self.plan.waves[state.wave]

    # -- the automatic step ----------------------------------------------------------------------------------
    def step(self, observations: Mapping[str, Observation], previous: Mapping[str, Observation],
             now: float) -> list[Decision]:
        """Judge every active class on its observations; ``previous``: the same metrics of the release each
        class ran before (relative gates)."""
        if self.status != "running":
            return []
        decisions: list[Decision] = []
        for name, state in self.classes.items():
            if state.status == "active":
                decisions += self._judge(name, state, observations.get(name, Observation()), previous.get(name),
                                         now)
        self._settle(decisions)
        return decisions

    def _judge(self, name: str, state: ClassState, obs: Observation, prev: Observation | None,
               now: float) -> list[Decision]:
        results = [evaluate(g, obs, prev) for g in self.plan.gates]
        state.last = [r.to_json() for r in results]
        devices_enough = obs.devices >= self.plan.min_devices
        enough = devices_enough and obs.requests >= self.plan.min_requests
        numbers = {"wave": state.wave + 1, "share": self.plan.waves[state.wave], "devices": obs.devices,
                   "requests": obs.requests, "gates": state.last}
        # A gate on what devices do (load, golden prompts, OOM) fails on enough devices alone: a variant that loads
        # nowhere serves no request, and waiting for requests would never stop it. Gates on requests also need the
        # minimum of requests before they can fail.
        failed = [r for g, r in zip(self.plan.gates, results) if r.outcome == "fail"
                  and (enough or (devices_enough and g.metric in DEVICE_METRICS))]
        if failed:
            state.status = "failed"
            return [Decision("gate_failed", name, numbers), Decision("revert", name, {"reason": "gate_failed"})]
        if verdict(results) != "pass" or not enough or now - state.wave_started < self.plan.bake_s:
            return []
        if state.wave == len(self.plan.waves) - 1:
            state.status = "done"
            return [Decision("class_completed", name, numbers)]
        state.wave += 1
        state.wave_started = now
        return [Decision("wave_advanced", name, {**numbers, "to_wave": state.wave + 1,
                                                 "to_share": self.plan.waves[state.wave]})]

    def _settle(self, decisions: list[Decision]) -> None:
        if self.status in ("running", "paused") and all(s.status != "active" for s in self.classes.values()):
            self.status = "completed"
            decisions.append(Decision("completed", None, {
                "classes": {n: s.status for n, s in self.classes.items()}}))

    # -- by hand ---------------------------------------------------------------------------------------------
    def pause(self) -> list[Decision]:
        self._require("running", "pause")
        self.status = "paused"
        return [Decision("paused", None, {})]

    def resume(self, now: float) -> list[Decision]:
        self._require("paused", "resume")
        self.status = "running"
        for s in self.classes.values():
            if s.status == "active":
                s.wave_started = now  # the bake starts again: what happened while paused was not watched
        return [Decision("resumed", None, {})]

    def promote(self, now: float, hardware_class: str | None = None) -> list[Decision]:
        if self.status not in ("running", "paused"):
            raise Conflict(f"rollout {self.id} is {self.status}; only a running or paused rollout can be promoted")
        names = [hardware_class] if hardware_class else [n for n, s in self.classes.items() if s.status == "active"]
        decisions = []
        for name in names:
            state = self.classes.get(name)
            if state is None or state.status != "active":
                raise Conflict(f"hardware class {name} is not active in rollout {self.id}")
            decisions.append(Decision("promoted", name, {"from_wave": state.wave + 1, "to_wave": len(self.plan.waves)}))
            state.wave, state.wave_started = len(self.plan.waves) - 1, now
        return decisions

    def abort(self) -> list[Decision]:
        if self.status in ("completed", "aborted"):
            raise Conflict(f"rollout {self.id} is already {self.status}")
        self.status = "aborted"
        decisions = [Decision("aborted", None, {})]
        for name, s in self.classes.items():
            if s.status in ("active", "done"):
                s.status = "aborted"
                decisions.append(Decision("revert", name, {"reason": "aborted"}))
        return decisions

    def _require(self, status: str, what: str) -> None:
        if self.status != status:
            raise Conflict(f"rollout {self.id} is {self.status}; cannot {what} it")

    # -- persistence -----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status,
                "plan": {"waves": list(self.plan.waves), "bake_s": self.plan.bake_s,
                         "min_devices": self.plan.min_devices, "min_requests": self.plan.min_requests,
                         "gates": [str(g) for g in self.plan.gates]},
                "classes": {n: {"wave": s.wave, "status": s.status, "wave_started": s.wave_started,
                                "last": s.last} for n, s in self.classes.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Rollout":
        p = data["plan"]
        plan = Plan(tuple(p["waves"]), p["bake_s"], p["min_devices"], p["min_requests"],
                    tuple(Gate.parse(g) for g in p["gates"]))
        classes = {n: ClassState(c["wave"], c["status"], c["wave_started"], list(c.get("last", [])))
                   for n, c in data["classes"].items()}
        return cls(data["id"], plan, classes, data["status"])


def wave_members(device_ids: Iterable[str], rollout_id: str, share: float) -> list[str]:
    """The devices a share targets: the first ``ceil(share x n)`` (at least one) in the order of a stable hash of
    (rollout, device), so each wave contains the one before it and a device's place never changes."""
    ranked = sorted(device_ids, key=lambda d: hashlib.sha256(f"{rollout_id}:{d}".encode()).digest())
    if not ranked or share <= 0:
        return []
    return ranked[:max(1, math.ceil(share * len(ranked)))]
