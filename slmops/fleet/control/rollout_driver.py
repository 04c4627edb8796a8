"""Drive wave rollouts: start them, tick them, act on operators' orders, and record every decision.

A tick runs every ``ControlPlane.rollout_tick_s`` seconds (``SLMOPS_FLEET_TICK``, 1 s by default; 0 runs none,
and tests call :func:`tick` with their own clock). Each running rollout is judged against the observations of its
release and of the release each class ran before, computed with SQL aggregates (``observations``), and its
decisions are carried out in ONE write transaction: load its state (the row locked on PostgreSQL, so replicas'
drivers take turns), ``step`` the state machine, apply the decisions (new assignments when a wave advances,
reverted assignments when a class fails), save the state and append every decision to the ledger with its numbers.

The aggregates are read in a snapshot just before that transaction, together with the state they are judged
against, and the transaction goes on only if the state is still the one read (else the rollout waits for the next
tick): over a wave of ten thousand devices the bucket sums take a good part of a second on SQLite, and holding its
one writer that long would stall every report and poll meanwhile.

A tick that decides something bumps the change version, naming the devices it assigned or reverted, so every
replica drops those devices' cached desired states and they see new ETags while the rest of the fleet keeps its
304s; one that only refreshes gate values does not bump at all.

Ledger actions (subject ``rollout:<id>``, one ``device.reverted`` per device on subject ``device:<id>``):
``rollout.started``, ``rollout.wave_advanced``, ``rollout.class_completed``, ``rollout.gate_failed`` (gate
values, thresholds, devices, requests), ``rollout.reverted``, ``device.reverted`` (rollout, from, to),
``rollout.paused``, ``rollout.resumed``, ``rollout.promoted``, ``rollout.aborted``, ``rollout.completed``.
Entries that put devices in a wave list them (``assigned``), so the ledger alone says what each device was told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.api.fleet import RolloutInfo, RolloutRequest
from slmops.fleet import hardware
from slmops.fleet.control import ledger, rollout_store as store
from slmops.fleet.control.gates import DEFAULT_GATES, Gate, Observation, evaluate
from slmops.fleet.control.models import Group, Release, Variant
from slmops.fleet.control.models import Rollout as RolloutRow
from slmops.fleet.control.observations import observe, observe_previous
from slmops.fleet.control.releases import split_release
from slmops.fleet.control.rollouts import Decision, Plan, Rollout
from slmops.fleet.control.routes_admin import duration
from slmops.types.errors import Conflict, InvalidInput, NotFound

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

log = logging.getLogger("slmops.fleet")
SYSTEM = "system"  # the ledger actor of the driver's own decisions
DEFAULT_WAVES = (1.0, 10.0, 50.0, 100.0)
START_LOCK = int.from_bytes(b"slmops:R", "big")  # pg_advisory_xact_lock key: one start per group at a time
ACTIONS = ("pause", "resume", "promote", "abort")


# -- the plan ----------------------------------------------------------------------------------------------------

def plan_of(req: RolloutRequest) -> Plan:
    """The state machine's plan from a request: its waves (or base percent and increment factor), bake time,
    minimum sample and gates (the defaults when none are given)."""
    stepped = req.base_percent is not None or req.increment_factor is not None
    if req.waves is not None and stepped:
        raise InvalidInput("give waves, or base_percent with increment_factor, not both")
    if stepped and (req.base_percent is None or req.increment_factor is None):
        raise InvalidInput("base_percent and increment_factor go together (such as 5 and 2: 5, 10, 20, 40, 80, "
                           "100%)")
    if req.waves is not None:
        waves = tuple(req.waves)
    elif stepped:
        waves = stepped_waves(req.base_percent, req.increment_factor)  # type: ignore[arg-type]
    else:
        waves = DEFAULT_WAVES
    gates = tuple(Gate.parse(g) for g in (DEFAULT_GATES if req.gates is None else req.gates))
    return Plan.from_percent(waves, bake_s=duration(req.bake, "bake"), min_devices=req.min_devices,
                             min_requests=req.min_requests, gates=gates)


def stepped_waves(base: float, factor: float, most: int = 32) -> tuple[float, ...]:
    """IoT-Jobs style waves: ``base`` percent, then each ``factor`` times the one before, the last 100%."""
    waves: list[float] = []
    share = base
    while share < 100 and len(waves) < most - 1:
        waves.append(round(share, 6))
        share *= factor
    return (*waves, 100.0)


# -- starting ----------------------------------------------------------------------------------------------------

async def start(plane: ControlPlane, req: RolloutRequest, actor: str) -> RolloutInfo:
    """Start a rollout of ``req.release`` to ``req.group``: one class per hardware class of the group that the
    release has a variant for, wave 1 assigned at once. Refused (409) while a running or paused rollout targets the
    group. ``previous`` per class: the release the class's devices get from their channels now (see
    ``rollout_store.previous_by_class``)."""
    plan = plan_of(req)
    name, version = split_release(req.release)
    now = plane.clock()
    async with plane.db.write(bump=False) as s:
        if plane.db.dialect == "postgresql":
            await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": START_LOCK})
        release, keys = await _release(s, name, version)
        group = await s.get(Group, req.group)
        if group is None:
            raise NotFound(f'no group "{req.group}"; `slmops fleet groups list` shows them')
        clash = (await s.execute(select(RolloutRow.id).where(RolloutRow.group == req.group,
                                                             RolloutRow.status.in_(store.LIVE)))).scalars().first()
        if clash is not None:
            raise Conflict(f"rollout {clash} is still under way in group {req.group}; let it complete or abort it "
                           f"first (`slmops fleet rollout status {clash}`)")
        found = await store.members(s, group.selector or {})
        fits = [m for m in found if hardware.pick_variant(m.hardware_class, keys) is not None]
        if not fits:
            raise Conflict(f"group {req.group} has no device of a hardware class release {req.release} has a variant "
                           f"for ({', '.join(keys)}); add a variant or pick another group")
        previous = store.previous_by_class(fits, await store.Channels.load(s))
        rollout = Rollout.start(store.new_id(), plan, previous.keys(), now)
        row = RolloutRow(id=rollout.id, release_id=release.id, group=req.group, status=rollout.status, state={},
                         previous=previous, created_at=now, created_by=actor, updated_at=now)
        s.add(row)
        await s.flush()
        assigned = {c: await store.assign(s, row, rollout, c, now) for c in sorted(rollout.classes)}
        store.save(row, rollout, now)
        await plane.db.bump(s, devices=[i for ids in assigned.values() for i in ids])
        skipped = sorted({m.hardware_class for m in found} - set(rollout.classes))
        data = {"release": req.release, "group": req.group, "plan": rollout.to_json()["plan"], "previous": previous,
                "devices": dict(sorted(_class_sizes(fits).items())), "skipped_classes": skipped,
                "assigned": assigned}
        counts = await store.device_counts(s, row, req.release)
        await ledger.append(s, actor=actor, action="rollout.started", subject=f"rollout:{row.id}", data=data, at=now)
    return store.to_info(row, rollout, req.release, counts)


async def _release(s: AsyncSession, name: str, version: str) -> tuple[Release, list[str]]:
    release = (await s.execute(select(Release).where(Release.name == name, Release.version == version))
               ).scalars().first()
    if release is None:
        raise NotFound(f"release {name}:{version} not found; `slmops fleet releases list` shows them")
    keys = list((await s.execute(select(Variant.hardware).where(Variant.release_id == release.id))).scalars())
    if not keys:
        raise Conflict(f"release {name}:{version} has no variant to roll out; publish one with a variant")
    return release, keys


def _class_sizes(found: Iterable[store.Member]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for m in found:
        sizes[m.hardware_class] = sizes.get(m.hardware_class, 0) + 1
    return sizes


# -- ticking -----------------------------------------------------------------------------------------------------

async def tick(plane: ControlPlane, now: float | None = None) -> list[Decision]:
    """Judge every running rollout once (oldest first); the decisions made."""
    now = plane.clock() if now is None else now
    decisions: list[Decision] = []
    for rollout_id in await running(plane):
        decisions += await step(plane, rollout_id, now)
    return decisions


async def running(plane: ControlPlane) -> list[str]:
    async with plane.db.read() as s:
        return list((await s.execute(select(RolloutRow.id).where(RolloutRow.status == "running")
                                     .order_by(RolloutRow.created_at, RolloutRow.id))).scalars())


async def step(plane: ControlPlane, rollout_id: str, now: float) -> list[Decision]:
    """One rollout's tick (see the module's docstring)."""
    async with plane.db.read() as s:
        row, rollout, release = await store.load(s, rollout_id)
        if rollout.status != "running":
            return []  # paused or finished since the list was read
        seen = row.state
        observed, previous = await observations(s, row, rollout, release)
    async with plane.db.write(bump=False) as s:
        row, rollout, release = await store.load(s, rollout_id, lock=True)
        if row.state != seen:
            return []  # an operator or another replica moved it meanwhile: judged again at the next tick
        decisions = rollout.step(observed, previous, now)
        entries, moved = await apply(s, row, rollout, release, decisions, SYSTEM, now)
        store.save(row, rollout, now)
        if decisions:
            await plane.db.bump(s, devices=moved)
            await ledger.append_many(s, entries)  # last: on PostgreSQL it holds the ledger's lock until commit
    plane.metrics.decided(entries)  # committed: counted once, by the replica that made them
    return decisions


async def observations(s: AsyncSession, row: RolloutRow, rollout: Rollout, release: str
                       ) -> tuple[dict[str, Observation], dict[str, Observation]]:
    """The release's numbers per active class since its wave started, and the previous release's over the
    same windows (``observations.observe_previous``)."""
    since = {name: c.wave_started for name, c in rollout.classes.items() if c.status == "active"}
    return (await observe(s, release, since),
            await observe_previous(s, dict(row.previous or {}), since, row.created_at))


async def apply(s: AsyncSession, row: RolloutRow, rollout: Rollout, release: str, decisions: Iterable[Decision],
                actor: str, now: float) -> tuple[list[dict[str, Any]], set[str]]:
    """Carry the decisions out in the caller's transaction; their ledger entries, in order, for the caller to
    append last, and the devices whose desired state they changed (assigned or reverted), for the change's
    scope: no other device's state moves with a rollout's decision."""
    subject = f"rollout:{row.id}"
    entries: list[dict[str, Any]] = []
    moved: set[str] = set()

    def entry(action: str, data: Mapping[str, Any], about: str = subject) -> None:
        entries.append({"actor": actor, "action": action, "subject": about, "data": dict(data), "at": now})

    for d in decisions:
        data: dict[str, Any] = {"release": release, "hardware_class": d.hardware_class, **d.data}
        if d.action in ("wave_advanced", "promoted") and d.hardware_class is not None:
            data["assigned"] = await store.assign(s, row, rollout, d.hardware_class, now)
            moved.update(data["assigned"])
        elif d.action == "revert" and d.hardware_class is not None:
            reverted = await store.revert(s, row, d.hardware_class, now)
            moved.update(reverted)
            entry("rollout.reverted", {**data, "devices": len(reverted)})
            for device_id, to in sorted(reverted.items()):
                entry("device.reverted", {"rollout": row.id, "from": release, "to": to,
                                          "hardware_class": d.hardware_class, "reason": d.data.get("reason")},
                      about=f"device:{device_id}")
            continue
        entry(f"rollout.{d.action}", data)
    return entries, moved


# -- by hand -----------------------------------------------------------------------------------------------------

async def act(plane: ControlPlane, rollout_id: str, action: str, actor: str,
              hardware_class: str | None = None) -> RolloutInfo:
    """pause | resume | promote (one class, or every active one) | abort, in one write transaction with its
    ledger entries; Conflict when the rollout's state does not allow it."""
    if action not in ACTIONS:
        raise InvalidInput(f"unknown rollout action {action!r}; use one of {', '.join(ACTIONS)}")
    if hardware_class is not None and action != "promote":
        raise InvalidInput("only promote takes a hardware class")
    now = plane.clock()
    async with plane.db.write(bump=False) as s:
        row, rollout, release = await store.load(s, rollout_id, lock=True)
        if action == "pause":
            decisions = rollout.pause()
        elif action == "resume":
            decisions = rollout.resume(now)
        elif action == "promote":
            decisions = rollout.promote(now, hardware_class)
        else:
            decisions = rollout.abort()
        entries, moved = await apply(s, row, rollout, release, decisions, actor, now)
        store.save(row, rollout, now)
        await plane.db.bump(s, devices=moved)
        counts = await store.device_counts(s, row, release)
        await ledger.append_many(s, entries)  # last: on PostgreSQL it holds the ledger's lock until commit
    plane.metrics.decided(entries)
    return store.to_info(row, rollout, release, counts)


# -- reading -----------------------------------------------------------------------------------------------------

async def info(plane: ControlPlane, rollout_id: str) -> RolloutInfo:
    """A rollout with its devices per state and, for its active classes, gate values: those of the last tick
    while the driver ticks it (at most ``rollout_tick_s`` old: the aggregates take a good part of a second over a
    large wave, too much to redo for every operator's read), else computed now (paused, or no driver running)."""
    async with plane.db.read() as s:
        row, rollout, release = await store.load(s, rollout_id)
        gates: dict[str, list[dict[str, Any]]] = {}
        ticked = rollout.status == "running" and plane.rollout_tick_s > 0
        if rollout.status in store.LIVE and not ticked:
            observed, previous = await observations(s, row, rollout, release)
            for name, c in rollout.classes.items():
                if c.status == "active":
                    gates[name] = [evaluate(g, observed.get(name, Observation()), previous.get(name)).to_json()
                                   for g in rollout.plan.gates]
        return store.to_info(row, rollout, release, await store.device_counts(s, row, release), gates)


async def listing(plane: ControlPlane, group: str | None = None, status: str | None = None,
                  limit: int = 100) -> list[RolloutInfo]:
    """Rollouts newest first, with devices per state and the gate values of their last tick."""
    async with plane.db.read() as s:
        q = select(RolloutRow, Release).join(Release, Release.id == RolloutRow.release_id)
        if group is not None:
            q = q.where(RolloutRow.group == group)
        if status is not None:
            q = q.where(RolloutRow.status == status)
        rows = (await s.execute(q.order_by(RolloutRow.created_at.desc(), RolloutRow.id.desc()).limit(limit))).all()
        out = []
        for row, release in rows:
            label = store.label(release)
            out.append(store.to_info(row, Rollout.from_json(row.state), label,
                                     await store.device_counts(s, row, label)))
        return out


# -- the loop ----------------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def lifespan(plane: ControlPlane) -> AsyncIterator[None]:
    """Tick every ``plane.rollout_tick_s`` seconds while the app runs (none when it is 0 or less)."""
    if plane.rollout_tick_s <= 0:
        yield
        return
    task = asyncio.create_task(_run(plane, plane.rollout_tick_s), name="slmops-fleet-rollouts")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _run(plane: ControlPlane, interval: float) -> None:
    """:func:`tick`, where one rollout's failure (logged) holds up neither the others nor the next tick."""
    while True:
        await asyncio.sleep(interval)
        try:
            ids = await running(plane)
        except Exception:  # noqa: BLE001 - the database is away: try again at the next tick
            log.exception("rollout tick failed")
            continue
        for rollout_id in ids:
            try:
                await step(plane, rollout_id, plane.clock())
            except Exception:  # noqa: BLE001 - retried at the next tick; the rollout waits meanwhile
                log.exception("rollout %s: tick failed", rollout_id)
