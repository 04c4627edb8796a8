"""What a simulation run measured, and the checks that say whether it went right.

Times are true (host) seconds from the moment the rollout was started. The numbers:

- **converge_s**: until the rollout was over (``rollout.completed`` in the ledger) and the last device had moved to
  its final release;
- per stopped class, **revert_s**: from its ``rollout.gate_failed`` entry until the last device of the class that
  was given the new release is back on the previous one (a device that failed to load it: until it took the
  document pointing back). Devices that were offline through the revert (returners) are counted apart: their
  time runs from when they came back;
- **violations**: activations of a document older than one the device had taken, or expired by its clock, and any
  injected bad document (replayed, forged, expired) that the trust code accepted;
- the **final state** of every device three ways: what the simulator runs, the last ``device.running`` ledger entry
  of the device, and what the rollout's ledger entries say it should run (assigned in a wave -> the new release,
  unless a ``device.reverted`` entry sent it back; never assigned -> the class's previous release); they must all
  agree, and agree with what the control plane's device list says.

Load: requests by answer, the control plane's CPU seconds (from /proc) and the simulator's during the rollout, so
CPU per request on each side, and the CPU the trust checks took.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slmops.fleet.sim import services

if TYPE_CHECKING:
    from slmops.fleet.sim.devices import Shared, SimDevice
    from slmops.fleet.sim.faults import Faults

GOAL_S = 60.0  # the goal: converge, and be back after a stopped wave, within a minute
TIMING_GOALS = (f"converged within {GOAL_S:.0f} s", f"back within {GOAL_S:.0f} s of the decision")


@dataclass
class Result:
    scenario: dict[str, Any]
    setup: dict[str, float] = field(default_factory=dict)
    rollout_id: str = ""
    rollout: dict[str, Any] = field(default_factory=dict)
    converge_s: float | None = None
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    returners: list[dict[str, Any]] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    attacks: dict[str, dict[str, int]] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    timeline: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    crashed: list[str] = field(default_factory=list)
    crashed_count: int = 0
    folder: str | None = None

    def goals(self) -> dict[str, bool]:
        """The issue's goals, each true or false."""
        stopped = [c for c in self.classes.values() if c.get("status") == "failed"]
        revert = [c.get("revert_s") for c in stopped if c.get("affected")]
        return {
            "converged": self.converge_s is not None,
            f"converged within {GOAL_S:.0f} s": self.converge_s is not None and self.converge_s < GOAL_S,
            "bad variant stopped within one wave": all(c.get("stopped_in_wave") == 1 for c in stopped),
            "only the faulty classes stopped": self.final.get("faulty_only", False),
            f"back within {GOAL_S:.0f} s of the decision": all(r is not None and r < GOAL_S for r in revert),
            "no violation": not self.violations and all(a["accepted"] == 0 for a in self.attacks.values()),
            "final state equals the ledger": self.final.get("mismatches", 1) == 0,
        }

    def failures(self) -> list[str]:
        """The correctness goals not met (the timing goals are measurements, not checks)."""
        return [name for name, ok in self.goals().items() if not ok and name not in TIMING_GOALS]

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["goals"] = self.goals()
        out["failures"] = self.failures()
        return out


def percentiles(seconds: list[float]) -> dict[str, float] | None:
    """p50, p95, p99 and the maximum of durations in seconds, in milliseconds."""
    if not seconds:
        return None
    ranked = sorted(seconds)

    def at(q: float) -> float:
        return round(1000 * ranked[min(len(ranked) - 1, int(q * len(ranked)))], 1)
    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(1000 * ranked[-1], 1)}


class Watch:
    """Samples during the rollout: devices per release over time, the ledger as it grows, the CPU of the control
    plane, of the database's own processes (PostgreSQL; SQLite runs inside the control plane) and of this
    simulator, and request counts."""

    def __init__(self, server_pid: int, shared: Shared, db_cpu: services.CpuMeter = lambda: None):
        self.server_pid = server_pid
        self.shared = shared
        self.db_cpu = db_cpu
        self.t0 = 0.0
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self.entries: list[dict[str, Any]] = []  # the ledger as read so far
        self._start: _Cpu | None = None
        self._end: _Cpu | None = None

    def _now(self) -> _Cpu:
        return _Cpu(time.time(), services.cpu_seconds(self.server_pid), self.db_cpu(), time.process_time(),
                    Counter(self.shared.counts), self.shared.verify_cpu_s)

    def begin(self) -> None:
        self._start = self._now()
        self.t0 = self._start.at

    def end(self) -> None:
        self._end = self._now()

    def sample(self, devices: list[SimDevice]) -> None:
        self.timeline.append((round(time.time() - self.t0, 3), dict(Counter(str(d.running) for d in devices))))

    def read(self, ops: Any) -> list[dict[str, Any]]:
        """The ledger entries written since the last call (all of them the first time), through the API."""
        new: list[dict[str, Any]] = []
        while True:
            page = ops.ledger(after=self.entries[-1]["seq"] if self.entries else 0, limit=1000)
            self.entries += [e.model_dump(mode="json") for e in page]
            new += self.entries[len(self.entries) - len(page):]
            if len(page) < 1000:
                return new

    def store(self, result: Result) -> None:
        assert self._start is not None and self._end is not None
        result.timeline = self.timeline
        a, b = self._start, self._end
        seconds, counts = b.at - a.at, b.counts - a.counts
        requests = sum(v for k, v in counts.items() if k.startswith(("poll:", "report:"))) + counts["signed"]
        server, db, sim = _delta(a.server, b.server), _delta(a.db, b.db), b.sim - a.sim
        result.load = {
            "seconds": seconds, "requests": requests, "requests_per_s": requests / seconds if seconds else 0,
            "polls_200": counts["poll:200"], "polls_304": counts["poll:304"], "reports_202": counts["report:202"],
            "reports_503": counts["report:503"], "errors": sum(v for k, v in counts.items() if k.startswith("error:")),
            "server_cpu_s": server, "db_cpu_s": db, "sim_cpu_s": sim, "verify_cpu_s": b.verify - a.verify,
            "server_busy": server / seconds if server is not None and seconds else None,  # cores
            "db_busy": db / seconds if db is not None and seconds else None,
            "sim_busy": sim / seconds if seconds else None,
            "server_us_per_request": 1e6 * server / requests if server is not None and requests else None,
            "sim_us_per_request": 1e6 * sim / requests if requests else None,
            "verify_us_per_document": 1e6 * (b.verify - a.verify) / counts["verified"] if counts["verified"] else None,
            "poll_ms": percentiles(self.shared.latency["poll"]),
            "report_ms": percentiles(self.shared.latency["report"]),
            "timer_lag_ms": percentiles(self.shared.lag),
        }

    async def probe(self, change: Callable[[int], Any], times: int, devices: int) -> dict[str, Any]:
        """The steady state, then what one change that alters no device's desired state costs: the control
        plane's (and database's) CPU beyond the steady rate until it is back to it, per device. Every change drops
        every replica's cached ETags and keys, so each device's next poll recomputes its state (docs/fleet.md:
        the change storm)."""
        steady = await self._steady(devices)
        costs = []
        for i in range(times):
            a = self._now()
            await asyncio.to_thread(change, i)
            await asyncio.sleep(1.3 * self.shared.timing.poll_s)  # every device polled once since
            while await self._rate(1.0) > steady["steady_server_cores"] + 0.1 and time.time() - a.at < 300:
                pass  # still working through the polls that came in
            b = self._now()
            busy = (_delta(a.server, b.server) or 0) + (_delta(a.db, b.db) or 0)
            costs.append(busy - steady["steady_server_cores"] * (b.at - a.at))
        median = sorted(costs)[len(costs) // 2]
        return {**steady, "change_cpu_s": median, "change_cpu_ms_per_device": 1000 * median / devices}

    async def _steady(self, devices: int) -> dict[str, Any]:
        """Requests a second and CPU on both sides once the devices' traffic is back to its steady rate (a
        rollout leaves a backlog behind when the control plane fell behind), over two poll intervals."""
        t = self.shared.timing
        expected = devices * (1 / t.poll_s + 1 / t.report_s)
        deadline = time.time() + 180
        while True:
            a = self._now()
            await asyncio.sleep(2 * t.poll_s)
            b = self._now()
            requests = sum(v for k, v in (b.counts - a.counts).items() if k.startswith(("poll:", "report:")))
            seconds = b.at - a.at
            if requests / seconds >= 0.85 * expected or time.time() > deadline:
                break
        server = ((_delta(a.server, b.server) or 0) + (_delta(a.db, b.db) or 0)) / seconds
        return {"steady_requests_per_s": requests / seconds, "steady_server_cores": server,
                "steady_sim_cores": (b.sim - a.sim) / seconds,
                "steady_server_us_per_request": 1e6 * server * seconds / requests if requests else None,
                "steady_sim_us_per_request": 1e6 * (b.sim - a.sim) / requests if requests else None}

    async def _rate(self, seconds: float) -> float:
        """Cores the control plane and database used over the next ``seconds``."""
        a = self._now()
        await asyncio.sleep(seconds)
        b = self._now()
        return ((_delta(a.server, b.server) or 0) + (_delta(a.db, b.db) or 0)) / (b.at - a.at)


@dataclass(frozen=True)
class _Cpu:
    at: float
    server: float | None
    db: float | None
    sim: float
    counts: Counter
    verify: float


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def finish(result: Result, devices: list[SimDevice], shared: Shared, entries: list[dict[str, Any]],
           known: dict[str, str | None], faults: Faults, previous: str, new: str) -> None:
    """Fill ``result`` from the devices, the ledger and the control plane's view (module docstring)."""
    t0 = shared.rollout_started or 0.0
    mine = [e for e in entries if e["subject"] == f"rollout:{result.rollout_id}"]
    result.decisions = [{"t": e["at"] - t0, "action": e["action"], "class": e["data"].get("hardware_class"),
                         "wave": e["data"].get("wave"), "to_wave": e["data"].get("to_wave"),
                         "gates": e["data"].get("gates", [])} for e in mine]
    result.counts = dict(shared.counts)
    result.violations = list(shared.violations)
    result.attacks = _attacks(shared.counts)
    _per_class(result, devices, shared, mine, entries, faults, previous, new)
    _final(result, devices, entries, known, previous, new)
    done = next((e["at"] for e in mine if e["action"] == "rollout.completed"), None)
    moves = [a.at for a in shared.log if a.at >= t0 and a.kind != "failed"]
    if done is not None and result.final.get("settled"):
        result.converge_s = max([done, *moves]) - t0


def _attacks(counts: Counter) -> dict[str, dict[str, int]]:
    out = {}
    for kind in ("replayed", "forged", "expired"):
        refused = {k.rsplit(":", 1)[1]: v for k, v in counts.items() if k.startswith(f"refused:{kind}:")}
        out[kind] = {"injected": counts[f"attack:{kind}"], "refused": sum(refused.values()),
                     "accepted": counts[f"attack_accepted:{kind}"], "reasons": refused}
    return out


def _per_class(result: Result, devices: list[SimDevice], shared: Shared, mine: list[dict[str, Any]],
               entries: list[dict[str, Any]], faults: Faults, previous: str, new: str) -> None:
    t0 = shared.rollout_started or 0.0
    by_class: dict[str, list[SimDevice]] = defaultdict(list)
    for d in devices:
        by_class[d.cls.name].append(d)
    state = {c["hardware_class"]: c for c in result.rollout.get("classes", [])}
    for name, members in sorted(by_class.items()):
        failed = next((e for e in mine if e["action"] == "rollout.gate_failed"
                       and e["data"].get("hardware_class") == name), None)
        advanced = [e["at"] - t0 for e in mine if e["action"] == "rollout.wave_advanced"
                    and e["data"].get("hardware_class") == name]
        info: dict[str, Any] = {"devices": len(members), "status": state.get(name, {}).get("status"),
                                "wave": state.get(name, {}).get("wave"), "advanced_at": advanced,
                                "took_new": sum(1 for d in members if _took(shared, d.index, new)),
                                "on_new": sum(1 for d in members if d.running == new),
                                "on_previous": sum(1 for d in members if d.running == previous)}
        if failed is not None:
            info.update(_revert(failed, members, shared, previous, new))
        result.classes[name] = info
    stopped = {n for n, c in result.classes.items() if c["status"] == "failed"}
    result.final["faulty_only"] = stopped == faults.bad_classes
    result.returners = [{"device": d.device_id, "class": d.cls.name, "back_online_s": d.returned_at - t0,
                         "on_previous_s": _back_at(shared, d.index, previous, d.returned_at) - t0
                         if d.returned_at is not None and _back_at(shared, d.index, previous, d.returned_at)
                         else None} for d in devices if d.returner]


def _took(shared: Shared, index: int, release: str) -> bool:
    return any(a.device == index and a.release == release and a.kind == "activated" for a in shared.log)


def _back_at(shared: Shared, index: int, previous: str, after: float | None) -> float | None:
    """When the device was last moved to, or told to keep, ``previous`` after ``after``."""
    times = [a.at for a in shared.log if a.device == index and a.release == previous and a.kind != "failed"
             and (after is None or a.at >= after)]
    return max(times) if times else None


def _revert(failed: dict[str, Any], members: list[SimDevice], shared: Shared, previous: str,
            new: str) -> dict[str, Any]:
    """The stopped class: its wave and gates at the decision, and how long its devices took to be back."""
    at = failed["at"]
    given = {a.device for a in shared.log if a.release == new and a.kind in ("activated", "failed")}
    affected = [d for d in members if d.index in given and not d.returner]
    backs = [_back_at(shared, d.index, previous, at) for d in affected]
    back = [b for b in backs if b is not None]
    t0 = shared.rollout_started or 0.0
    return {"stopped_in_wave": failed["data"].get("wave"), "gate_failed_at": at - t0,
            "gates": failed["data"].get("gates", []), "affected": len(affected), "back": len(back),
            "revert_s": max(back) - at if affected and len(back) == len(affected) else None}


def _final(result: Result, devices: list[SimDevice], entries: list[dict[str, Any]], known: dict[str, str | None],
           previous: str, new: str) -> None:
    """Compare every device's release: simulator, its last device.running entry, the rollout's entries, and the
    control plane's device list."""
    running: dict[str, str | None] = {}
    assigned: set[str] = set()
    reverted: dict[str, str | None] = {}
    fallback: dict[str, str | None] = {}
    for e in entries:
        data = e["data"]
        if e["action"] == "device.running":
            running[e["subject"]] = data.get("to")
        elif e["subject"] == f"rollout:{result.rollout_id}":
            if e["action"] == "rollout.started":
                fallback = dict(data.get("previous") or {})
                for ids in (data.get("assigned") or {}).values():
                    assigned.update(ids)
            elif e["action"] in ("rollout.wave_advanced", "rollout.promoted"):
                assigned.update(data.get("assigned") or [])
        elif e["action"] == "device.reverted" and data.get("rollout") == result.rollout_id:
            reverted[e["subject"].removeprefix("device:")] = data.get("to")
    mismatches = []
    for d in devices:
        expected = reverted[d.device_id] if d.device_id in reverted else new if d.device_id in assigned else \
            fallback.get(d.cls.name, previous)
        seen = {"simulator": d.running, "ledger": running.get(d.device_id), "rollout": expected,
                "control_plane": known.get(d.device_id)}
        if len(set(seen.values())) != 1:
            mismatches.append({"device": d.device_id, "class": d.cls.name, **seen})
    result.final.update(mismatches=len(mismatches), examples=mismatches[:10], assigned=len(assigned),
                        reverted=len(reverted), settled=all(d.online for d in devices) and not mismatches)
