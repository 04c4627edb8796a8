"""A device's desired state: the release its channel points at, or the rollout's while a rollout holds the device
(a live assignment: ``rollout_driver``), in the variant for its hardware, and its effective configuration.

The state is computed from the database (membership, blueprints, channels, releases) and compared by hash, not
by time: ``desired_version`` moves forward exactly when what the device is told changes, which is what lets a
device refuse an older document (anti-rollback) and lets the poll route answer 304 from memory. Everything here
reads the caller's session; the route decides when to compute and what to cache.

Signing: every served document goes through :func:`seal`: TUF-style metadata, the versioned document with an
expiry signed by the online key that the device's root of trust names, so a device trusts no document for its TLS
connection alone (``slmops.fleet.metadata``; the device's checks: ``slmops.fleet.agent.trust``).
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from securesystemslib.signer import Signer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.api.fleet import Golden
from slmops.fleet import hardware, metadata
from slmops.fleet.control import blueprints, membership
from slmops.fleet.control.blueprints import Layer
from slmops.fleet.control.membership import Selecting
from slmops.fleet.control.models import Channel, Device, Release, Rollout, RolloutAssignment, Variant

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Candidate:
    """A channel's release as every device on the channel shares it; the variant is picked per device."""

    release: str  # NAME:VERSION
    golden: tuple[dict[str, Any], ...]
    variants: tuple[tuple[str, str, str, str | None], ...]  # (hardware, reference, manifest digest, signature b64)

    def target(self, hardware_class: str) -> dict[str, Any] | None:
        """The ``ReleaseTarget`` for a device of ``hardware_class``, or None when no variant suits it."""
        key = hardware.pick_variant(hardware_class, [v[0] for v in self.variants])
        if key is None:
            return None
        _, reference, digest, signature = next(v for v in self.variants if v[0] == key)
        return {"release": self.release, "variant": key, "reference": reference, "manifest_digest": digest,
                "signature": signature, "golden": list(self.golden)}


@dataclass(frozen=True)
class Computed:
    """What a device is told, but for its version and issue time; ``hash`` decides whether the version moves."""

    device_id: str
    release: dict[str, Any] | None
    config: dict[str, Any]
    hash: str

    def document(self, version: int, issued_at: float) -> dict[str, Any]:
        """The ``DesiredState`` wire document."""
        return {"device_id": self.device_id, "version": version, "issued_at": issued_at, "release": self.release,
                "config": self.config}


async def candidate(s: AsyncSession, channel: str) -> Candidate | None:
    """The release ``channel`` points at with its variants, or None for a channel that does not exist."""
    release = (await s.execute(select(Release).join(Channel, Channel.release_id == Release.id)
                               .where(Channel.name == channel))).scalar_one_or_none()
    return await _candidate_of(s, release) if release is not None else None


async def _candidate_of(s: AsyncSession, release: Release) -> Candidate:
    rows = (await s.execute(select(Variant).where(Variant.release_id == release.id)
                            .order_by(Variant.hardware))).scalars()
    variants = tuple((v.hardware, v.reference, v.manifest_digest,
                      base64.b64encode(v.signature).decode("ascii") if v.signature else None) for v in rows)
    golden = tuple(Golden.model_validate(g).model_dump() for g in (release.golden or []))
    return Candidate(f"{release.name}:{release.version}", golden, variants)


@dataclass(frozen=True)
class LiveRollout:
    """A rollout as its devices' desired states need it, shared by every device it targets."""

    id: str
    created_at: float
    status: str  # running | paused | completed | aborted
    updated_at: float  # for a completed rollout: when it completed
    release: Candidate


def prevailing(held: Iterable[LiveRollout], channel_moved_at: float | None) -> LiveRollout | None:
    """Of the rollouts holding a live assignment of a device, the one whose release it gets: the newest (by
    start). A completed rollout keeps its devices on its release until an operator moves their channel (the
    channel's ``updated_at`` after the rollout completed); then the channel decides again."""
    kept = [r for r in held if not (r.status == "completed" and channel_moved_at is not None
                                    and channel_moved_at > r.updated_at)]
    return max(kept, key=lambda r: (r.created_at, r.id), default=None)


async def release_candidate(s: AsyncSession, release_id: int) -> Candidate | None:
    """A release by id with its variants, as a channel's :func:`candidate` is."""
    release = await s.get(Release, release_id)
    return await _candidate_of(s, release) if release is not None else None


async def _live_rollout(s: AsyncSession, rollout_id: str) -> LiveRollout | None:
    row = await s.get(Rollout, rollout_id)
    found = await release_candidate(s, row.release_id) if row is not None else None
    if row is None or found is None:
        return None
    return LiveRollout(row.id, row.created_at, row.status, row.updated_at, found)


async def _holds(s: AsyncSession, device_id: str | None = None) -> dict[str, tuple[str, ...]]:
    """Device id -> the rollouts holding a live assignment of it (of one device when given)."""
    a = RolloutAssignment
    q = select(a.device_id, a.rollout_id).where(a.reverted_at.is_(None))
    if device_id is not None:
        q = q.where(a.device_id == device_id)
    out: dict[str, tuple[str, ...]] = {}
    for device, rollout_id in await s.execute(q):
        out[device] = (*out.get(device, ()), rollout_id)
    return out


async def _channel_moved(s: AsyncSession, channel: str) -> float | None:
    return (await s.execute(select(Channel.updated_at).where(Channel.name == channel))).scalar_one_or_none()


class Candidates:
    """What every device's computation shares until the next change: channel -> candidate, rollout -> its
    release, channel -> when it last moved, and which rollouts hold which devices (one read per change rather
    than a query per device: after a wave moves every device polls again). ``clear`` on change: rollout decisions
    bump the change version too."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], Any] = {}
        self._generation = 0

    def clear(self) -> None:
        self._cache.clear()
        self._generation += 1

    async def _cached(self, key: tuple[str, str], load: Callable[[], Awaitable[Any]]) -> Any:
        if key in self._cache:
            return self._cache[key]
        generation = self._generation
        found = await load()
        if generation == self._generation:  # read before a change that raced with us: do not keep it
            self._cache[key] = found
        return found

    async def get(self, s: AsyncSession, channel: str) -> Candidate | None:
        return await self._cached(("channel", channel), lambda: candidate(s, channel))

    async def rollout(self, s: AsyncSession, rollout_id: str) -> LiveRollout | None:
        return await self._cached(("rollout", rollout_id), lambda: _live_rollout(s, rollout_id))

    async def holds(self, s: AsyncSession) -> dict[str, tuple[str, ...]]:
        return await self._cached(("holds", ""), lambda: _holds(s))

    async def channel_moved(self, s: AsyncSession, channel: str) -> float | None:
        return await self._cached(("moved", channel), lambda: _channel_moved(s, channel))


async def rollout_of(s: AsyncSession, device: Device, channel: str | None, candidates: Candidates | None
                     ) -> LiveRollout | None:
    """The rollout whose release the device gets now, if any. Without shared ``candidates`` (one device's
    computation) its assignments are one indexed query."""
    if candidates is None:
        candidates, ids = Candidates(), (await _holds(s, device.id)).get(device.id, ())
    else:
        ids = (await candidates.holds(s)).get(device.id, ())
    held = [r for r in [await candidates.rollout(s, i) for i in ids] if r is not None]
    if not held:
        return None
    moved = None
    if channel is not None and any(r.status == "completed" for r in held):
        moved = await candidates.channel_moved(s, channel)
    return prevailing(held, moved)


async def compute(s: AsyncSession, device: Device, candidates: Candidates | None = None,
                  groups: Iterable[Selecting] | None = None, layers: Mapping[str, Layer] | None = None) -> Computed:
    """The device's desired state, from its effective configuration (``channel`` picks the release) unless a
    rollout holds it (a live assignment: the rollout's release). No channel, an unknown one, or a release with no
    variant for the device's class: no release; the config still goes."""
    effective = await membership.effective_config(s, device, groups, layers)
    channel = effective.channel
    release = None
    rollout = await rollout_of(s, device, channel, candidates)
    if rollout is not None:
        release = rollout.release.target(device.hardware_class)
    if release is None and channel is not None:
        found = await (candidates.get(s, channel) if candidates else candidate(s, channel))
        release = found.target(device.hardware_class) if found else None
    body = {"device_id": device.id, "release": release, "config": effective.config}
    return Computed(device.id, release, effective.config, blueprints.effective_hash(body))


def etag(version: int, digest: str) -> str:
    """The strong ETag of a desired state: its version and hash, so a device that missed a version cannot match."""
    return f'"{version}.{digest[:24]}"'


def seal(document: dict[str, Any], signer: Signer, expires: float) -> bytes:
    """The served bytes of a desired-state document: ``SignedDesired`` JSON, signed by the online ``targets`` key
    (``control/trust.py``) with an expiry (``slmops.fleet.metadata``); the device checks both before acting."""
    return metadata.seal(signer, document, expires)
