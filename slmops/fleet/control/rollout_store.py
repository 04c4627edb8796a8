"""Rollouts as rows: the rollout (its state machine as JSON), the devices each wave targeted (assignments), the
release a device falls back to when its assignment is reverted, and the devices of each class per state.

Everything here works in the caller's transaction; ``rollout_driver`` decides when to read and write, and writes
the ledger. Group membership is computed as everywhere else (a device is in a group while its tags match the
selector), in SQL (``routes_admin.selects``), so a group of ten thousand devices is one query, not ten thousand.

The release a device falls back to is what its desired state then says: the newest other rollout still holding it
(``desired.prevailing``), else its channel's release. Channels are resolved in memory from one read of the
blueprint layers and groups: per device that is the last layer, in precedence order, that names a ``channel``
(``blueprints.merge`` replaces a scalar, so the last one wins).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, and_, case, distinct, false, func, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.api.fleet import RolloutClass, RolloutInfo
from slmops.fleet.control import desired, membership
from slmops.fleet.control.blueprints import BASELINE, CHANNEL, device_layer, group_layer
from slmops.fleet.control.models import Blueprint, Channel, Device, Group, Release, Report, RolloutAssignment
from slmops.fleet.control.models import Rollout as RolloutRow
from slmops.fleet.control.rollouts import Rollout, wave_members
from slmops.fleet.control.routes_admin import selects
from slmops.types.errors import NotFound

_assignments: Table = RolloutAssignment.__table__  # type: ignore[assignment]
_devices: Table = Device.__table__  # type: ignore[assignment]
LIVE = ("running", "paused")  # statuses in which a rollout still moves


def new_id() -> str:
    return f"ro_{secrets.token_hex(6)}"


def label(release: Release) -> str:
    return f"{release.name}:{release.version}"


async def load(s: AsyncSession, rollout_id: str, lock: bool = False) -> tuple[RolloutRow, Rollout, str]:
    """The row, its state machine and its release's NAME:VERSION; ``lock``: hold the row until commit (PostgreSQL:
    replicas' drivers and operators take turns; SQLite has one writer anyway)."""
    row = await s.get(RolloutRow, rollout_id, with_for_update=lock or None)
    if row is None:
        raise NotFound(f"no rollout {rollout_id!r}; `slmops fleet rollout list` shows them")
    release = await s.get(Release, row.release_id)
    assert release is not None  # a foreign key
    return row, Rollout.from_json(row.state), label(release)


def save(row: RolloutRow, rollout: Rollout, now: float) -> None:
    row.state, row.status, row.updated_at = rollout.to_json(), rollout.status, now


# -- members and assignments -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    id: str
    hardware_class: str
    tags: dict[str, Any]


async def members(s: AsyncSession, selector: Mapping[str, Any], hardware_class: str | None = None) -> list[Member]:
    """The group's enrolled devices (not revoked), of one class when given."""
    d = _devices.c
    q = select(d.id, d.hardware_class, d.tags).where(d.revoked_at.is_(None), *selects(dict(selector)))
    if hardware_class is not None:
        q = q.where(d.hardware_class == hardware_class)
    return [Member(i, c, dict(t or {})) for i, c, t in await s.execute(q.order_by(d.id))]


async def selector_of(s: AsyncSession, group: str) -> dict[str, Any] | None:
    found = await s.get(Group, group)
    return None if found is None else dict(found.selector or {})


async def assign(s: AsyncSession, row: RolloutRow, rollout: Rollout, hardware_class: str, now: float) -> list[str]:
    """Put the class's share of the group's devices (``rollouts.wave_members``) in the rollout; the ids of those
    that were not in it yet. A group deleted since the rollout started targets no one new."""
    selector = await selector_of(s, row.group)
    if selector is None:
        return []
    ids = [m.id for m in await members(s, selector, hardware_class)]
    wanted = wave_members(ids, row.id, rollout.share(hardware_class))
    a = _assignments.c
    taken = set((await s.execute(select(a.device_id).where(a.rollout_id == row.id,
                                                           a.hardware_class == hardware_class))).scalars())
    new = [i for i in wanted if i not in taken]
    if new:
        versions = await _desired_versions(s, new)
        wave = rollout.classes[hardware_class].wave + 1
        await s.execute(_assignments.insert(), [
            {"rollout_id": row.id, "device_id": i, "hardware_class": hardware_class, "wave": wave,
             "assigned_at": now, "from_version": versions.get(i, 0), "reverted_at": None} for i in new])
    return new


async def _desired_versions(s: AsyncSession, ids: list[str], chunk: int = 5000) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in range(0, len(ids), chunk):
        q = select(_devices.c.id, _devices.c.desired_version).where(_devices.c.id.in_(ids[i:i + chunk]))
        out.update({d: int(v) for d, v in await s.execute(q)})
    return out


async def revert(s: AsyncSession, row: RolloutRow, hardware_class: str, now: float) -> dict[str, str | None]:
    """Mark the class's live assignments reverted; device id -> the release its desired state now names."""
    a = _assignments.c
    live = and_(a.rollout_id == row.id, a.hardware_class == hardware_class, a.reverted_at.is_(None))
    found = list(await s.execute(select(a.device_id, _devices.c.tags)
                                 .join(_devices, _devices.c.id == a.device_id).where(live)))
    if not found:
        return {}
    await s.execute(update(_assignments).where(live).values(reverted_at=now))
    others = await _other_holds(s, row.id, [i for i, _ in found])
    channels = await Channels.load(s)
    return {i: channels.fallback(i, dict(tags or {}), others.get(i, [])) for i, tags in found}


async def _other_holds(s: AsyncSession, rollout_id: str, ids: list[str],
                       chunk: int = 5000) -> dict[str, list[desired.LiveRollout]]:
    """Per device, the other rollouts that hold a live assignment of it."""
    a = _assignments.c
    out: dict[str, list[desired.LiveRollout]] = {}
    for i in range(0, len(ids), chunk):
        q = (select(a.device_id, RolloutRow.id, RolloutRow.created_at, RolloutRow.status, RolloutRow.updated_at,
                    Release.name, Release.version)
             .join(RolloutRow, RolloutRow.id == a.rollout_id).join(Release, Release.id == RolloutRow.release_id)
             .where(a.device_id.in_(ids[i:i + chunk]), a.reverted_at.is_(None), a.rollout_id != rollout_id))
        for device_id, rid, created, status, updated, name, version in await s.execute(q):
            held = desired.LiveRollout(rid, created, status, updated, desired.Candidate(f"{name}:{version}", (), ()))
            out.setdefault(device_id, []).append(held)
    return out


# -- channels, resolved in memory --------------------------------------------------------------------------------

class Channels:
    """Which release each device's channel gives it, from one read of layers, groups and channels."""

    def __init__(self, layers: Mapping[str, tuple[int, str | None, bool]], groups: list[Group],
                 channels: Mapping[str, tuple[str, float]]):
        self._layers = layers  # layer -> (priority, channel, whether the layer names one)
        self._groups = groups
        self._channels = channels  # channel -> (NAME:VERSION, updated_at)

    @classmethod
    async def load(cls, s: AsyncSession) -> Channels:
        layers = {b.layer: (b.priority, (b.config or {}).get(CHANNEL), CHANNEL in (b.config or {}))
                  for b in (await s.execute(select(Blueprint))).scalars()}
        q = select(Channel.name, Release.name, Release.version, Channel.updated_at).join(
            Release, Release.id == Channel.release_id)
        channels = {c: (f"{n}:{v}", at) for c, n, v, at in await s.execute(q)}
        return cls(layers, await membership.all_groups(s), channels)

    def channel(self, device_id: str, tags: Mapping[str, Any]) -> str | None:
        """The device's ``channel``: the last layer naming one, in precedence order (baseline, groups by
        priority then name, the device's own)."""
        names = [group_layer(n) for n in membership.groups_of(tags, self._groups)]
        ranked = sorted((self._layers[n][0], n) for n in names if n in self._layers)
        chosen = None
        for layer in (BASELINE, *(name for _, name in ranked), device_layer(device_id)):
            found = self._layers.get(layer)
            if found is not None and found[2]:
                chosen = found[1]
        return chosen

    def release(self, device_id: str, tags: Mapping[str, Any]) -> str | None:
        channel = self.channel(device_id, tags)
        return self._channels[channel][0] if channel in self._channels else None

    def fallback(self, device_id: str, tags: Mapping[str, Any], held: Iterable[desired.LiveRollout]) -> str | None:
        """The release the device is told once one rollout lets it go: another rollout's, else its channel's."""
        channel = self.channel(device_id, tags)
        moved = self._channels[channel][1] if channel in self._channels else None
        other = desired.prevailing(held, moved)
        if other is not None:
            return other.release.release
        return self._channels[channel][0] if channel in self._channels else None


def previous_by_class(found: Iterable[Member], channels: Channels) -> dict[str, str | None]:
    """Per class, the release the class's devices get from their channels: what the rollout is measured against
    and what a revert goes back to. Devices of a class on different channels: the release most of them get (ties
    by name); none of them on a channel: null (relative gates then pass with a note)."""
    counts: dict[str, Counter[str | None]] = {}
    for m in found:
        counts.setdefault(m.hardware_class, Counter())[channels.release(m.id, m.tags)] += 1
    return {c: min(n.items(), key=lambda kv: (-kv[1], kv[0] or ""))[0] for c, n in counts.items()}


# -- what operators see --------------------------------------------------------------------------------------------

async def device_counts(s: AsyncSession, row: RolloutRow, release: str) -> dict[str, dict[str, int]]:
    """Per class, devices of the group (and any the rollout targeted that left it): ``total``; ``targeted`` (a
    live assignment); ``applied`` (targeted, and applied a desired version issued after it was assigned);
    ``running`` the release; ``failing`` (targeted or reverted, and reporting health ``failing`` or a failure
    to load the release since the rollout started); ``reverted``."""
    a, d, r = _assignments.c, _devices.c, Report.__table__.c
    selector = await selector_of(s, row.group)
    joined = _devices.outerjoin(_assignments, and_(a.device_id == d.id, a.rollout_id == row.id))
    held = a.device_id.is_not(None)
    live = and_(held, a.reverted_at.is_(None))
    failed_loads = (select(distinct(r.device_id)).where(r.release == release, r.load_failures > 0,
                                                        r.window_end > row.created_at))
    failing = and_(held, or_(d.health == "failing", d.id.in_(failed_loads)))

    def total(condition: Any) -> Any:
        return func.sum(case((condition, 1), else_=0))

    in_group = false() if selector is None else and_(true(), *selects(selector))  # a deleted group: targeted only
    q = (select(d.hardware_class, func.count().label("total"), total(live).label("targeted"),
                total(and_(live, d.applied_version > a.from_version)).label("applied"),
                total(d.running_release == release).label("running"), total(failing).label("failing"),
                total(a.reverted_at.is_not(None)).label("reverted"))
         .select_from(joined).where(d.revoked_at.is_(None), or_(held, in_group))
         .group_by(d.hardware_class))
    return {c.hardware_class: {k: int(getattr(c, k) or 0) for k in ("total", "targeted", "applied", "running",
                                                                     "failing", "reverted")}
            for c in await s.execute(q)}


def to_info(row: RolloutRow, rollout: Rollout, release: str, counts: Mapping[str, Mapping[str, int]],
            gates: Mapping[str, list[dict[str, Any]]] | None = None) -> RolloutInfo:
    """``gates``: gate results computed now, per class (else those of the last tick)."""
    state = rollout.to_json()
    classes = [RolloutClass(hardware_class=name, status=c.status, wave=c.wave + 1, share=rollout.share(name),
                            devices=dict(counts.get(name, {})),
                            gates=list((gates or {}).get(name, c.last)))
               for name, c in sorted(rollout.classes.items())]
    return RolloutInfo(id=row.id, release=release, group=row.group, status=rollout.status,
                       created_at=row.created_at, created_by=row.created_by,
                       plan={**state["plan"], "previous": dict(row.previous or {})}, classes=classes)
