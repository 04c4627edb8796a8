"""Prometheus metrics of one control-plane replica, ``slmops_fleet_`` prefixed, in a registry the plane owns.

Two kinds, because replicas share one database but not their memory:

- **Events counted by this replica** since it started (HTTP requests, rollout decisions it carried out). Sum them
  over replicas (``sum without (instance)``): the rollout driver's ticks run on every replica, but a decision is
  made by whichever replica won the rollout's row, so each one is counted once across the fleet.
- **The fleet's state**, read from the database when ``/metrics`` is scraped (devices by hardware class and
  health, devices heard from lately, rollouts by status). Every replica reports the same numbers: take ``max``
  over replicas, never the sum.

Rollout decisions are counted from the ledger entries the driver writes, after their transaction commits, so a
decision the database refused (another replica moved the rollout meanwhile) is not counted. Labels hold hardware
classes, gate metrics and reasons only: never a device id, a release or a tag, so cardinality stays bounded by the
hardware classes a fleet has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

from slmops.fleet.control.models import Device, Rollout
from slmops.server.asgi import StatusSend

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

log = logging.getLogger("slmops.fleet")

# Polls and reports take well under a millisecond; the top buckets catch a stalled database.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ROLLOUT_STATUSES = ("running", "paused", "completed", "aborted")
SEEN_POLLS = 3  # a device counts as seen lately when it was heard from within this many poll intervals
READ_TIMEOUT_S = 5.0  # the state's counts, at most this long per scrape


class ControlMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmops_fleet_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("slmops_fleet_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.devices = Gauge("slmops_fleet_devices", "Enrolled devices not revoked, by hardware class and the "
                             "health they last reported (the database's view: the same on every replica)",
                             ["hardware_class", "health"], registry=r)
        self.seen = Gauge("slmops_fleet_devices_seen", f"Devices heard from within the last {SEEN_POLLS} poll "
                          "intervals, by hardware class", ["hardware_class"], registry=r)
        self.database_up = Gauge("slmops_fleet_database_up", "1 when the last scrape could read the fleet's "
                                 "state from the database, else 0 (and the state gauges keep their last values)",
                                 registry=r)
        self.rollouts = Gauge("slmops_fleet_rollouts", "Rollouts by status", ["status"], registry=r)
        self.report_queue = Gauge("slmops_fleet_report_queue", "Device reports this replica holds, not yet "
                                  "written", registry=r)
        self.waves = Counter("slmops_fleet_wave_advances", "Waves a hardware class moved on to (by the driver or "
                             "promoted)", ["hardware_class"], registry=r)
        self.completed = Counter("slmops_fleet_classes_completed", "Hardware classes that passed a rollout's "
                                 "last wave", ["hardware_class"], registry=r)
        self.gate_failures = Counter("slmops_fleet_gate_failures", "Gates failed when a rollout stopped a hardware "
                                     "class, by the gate's metric", ["hardware_class", "gate"], registry=r)
        self.reverts = Counter("slmops_fleet_reverts", "Hardware classes sent back to their previous release, by "
                               "reason (gate_failed, aborted)", ["hardware_class", "reason"], registry=r)
        self.reverted_devices = Counter("slmops_fleet_reverted_devices", "Devices told their previous release "
                                        "again", ["hardware_class", "reason"], registry=r)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    # -- HTTP ------------------------------------------------------------------------------------------------
    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        pair = self._children.get(key)
        if pair is None:  # labels() validates and locks: resolved once per (route, method, status)
            pair = self._children[key] = (self.requests.labels(route, method, str(status)),
                                          self.latency.labels(route))
        pair[0].inc()
        pair[1].observe(seconds)

    # -- rollout decisions -----------------------------------------------------------------------------------
    def decided(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Count the rollout decisions in ``entries`` (ledger entries as ``rollout_driver.apply`` makes them),
        once their transaction has committed."""
        for e in entries:
            data = e.get("data") or {}
            cls = str(data.get("hardware_class") or "")
            action = e.get("action")
            if action in ("rollout.wave_advanced", "rollout.promoted"):
                self.waves.labels(cls).inc()
            elif action == "rollout.class_completed":
                self.completed.labels(cls).inc()
            elif action == "rollout.gate_failed":
                for gate in data.get("gates") or ():
                    if gate.get("outcome") == "fail":
                        self.gate_failures.labels(cls, str(gate.get("gate", "")).split(" ", 1)[0]).inc()
            elif action == "rollout.reverted":
                reason = str(data.get("reason") or "unknown")
                self.reverts.labels(cls, reason).inc()
                self.reverted_devices.labels(cls, reason).inc(int(data.get("devices") or 0))

    # -- the fleet's state, at scrape time -------------------------------------------------------------------
    async def refresh(self, plane: ControlPlane) -> None:
        """Read the fleet's state from the database into the gauges (three grouped counts). A database that does
        not answer is a gauge at 0, not a failed scrape: the counters still come through, and ``up`` keeps meaning
        that the replica answers."""
        from slmops.fleet.control.routes_device import STATE

        side = plane.extras.get(STATE)
        self.report_queue.set(len(side.batcher) if side is not None else 0)
        try:
            await asyncio.wait_for(self._read(plane), READ_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - whatever keeps the database from answering
            log.warning("metrics: could not read the fleet's state (%s)", type(err).__name__)
            self.database_up.set(0)
            return
        self.database_up.set(1)

    async def _read(self, plane: ControlPlane) -> None:
        since = plane.clock() - SEEN_POLLS * plane.poll_interval_s
        live = Device.revoked_at.is_(None)
        async with plane.db.read() as s:
            health = (await s.execute(select(Device.hardware_class, Device.health, func.count())
                                      .where(live).group_by(Device.hardware_class, Device.health))).all()
            seen = (await s.execute(select(Device.hardware_class, func.count())
                                    .where(live, Device.last_seen >= since).group_by(Device.hardware_class))).all()
            rollouts = dict((await s.execute(select(Rollout.status, func.count()).group_by(Rollout.status))).all())
        # no await from here on: a scrape never sees the gauges half set
        self.devices.clear()
        for cls, state, n in health:
            self.devices.labels(cls, state).set(n)
        classes = {cls for cls, _, _ in health}
        counted = dict(seen)  # type: ignore[arg-type]
        self.seen.clear()
        for cls in classes | counted.keys():
            self.seen.labels(cls).set(counted.get(cls, 0))
        for status in {*ROLLOUT_STATUSES, *rollouts}:
            self.rollouts.labels(status).set(rollouts.get(status, 0))


class RequestMetrics:
    """ASGI middleware, outermost, so it also counts the polls and reports the device fast path answers before
    FastAPI routes anything. Routes are labelled by their template (``/fleet/v1/rollouts/{rollout_id}``), never
    by the path a client sent, so ids do not become label values; a path no route matches is ``unmatched``."""

    def __init__(self, app: ASGIApp, metrics: ControlMetrics):
        self.app = app
        self.metrics = metrics
        self._static: frozenset[str] | None = None  # documented routes without parameters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        sending = StatusSend(send, 500)  # what the server answers when the app raises before it starts a response
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(self._route(scope), scope["method"], sending.status, time.perf_counter() - t0)

    def _route(self, scope: Scope) -> str:
        route = getattr(scope.get("route"), "path", None)
        if route is not None:
            return route
        # Answered before routing (the device fast path) or refused by a middleware: labelled by its path when
        # that is a documented route without parameters (a bounded set), else "unmatched".
        if self._static is None:
            self._static = frozenset(p for p in scope["app"].openapi().get("paths", {}) if "{" not in p)
        return scope["path"] if scope["path"] in self._static else "unmatched"
