"""A device's desired state: the release its channel points at, in the variant for its hardware, and its
effective configuration.

The state is computed from the database (membership, blueprints, channels, releases) and compared by hash, not
by time: ``desired_version`` moves forward exactly when what the device is told changes, which is what lets a
device refuse an older document (anti-rollback) and lets the poll route answer 304 from memory. Everything here
reads the caller's session; the route decides when to compute and what to cache.

Signing: every served document goes through :func:`seal`. Signed, expiring desired-state metadata (TUF-style: an
online key signs the versioned document with an expiry) plugs in there; until then a device trusts the document
as far as it trusts its TLS connection to the control plane (its own signature authenticates the request only).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.api.fleet import Golden
from slmops.fleet import hardware
from slmops.fleet.control import blueprints, membership
from slmops.fleet.control.membership import Selecting
from slmops.fleet.control.models import Channel, Device, Release, Variant

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
    if release is None:
        return None
    rows = (await s.execute(select(Variant).where(Variant.release_id == release.id)
                            .order_by(Variant.hardware))).scalars()
    variants = tuple((v.hardware, v.reference, v.manifest_digest,
                      base64.b64encode(v.signature).decode("ascii") if v.signature else None) for v in rows)
    golden = tuple(Golden.model_validate(g).model_dump() for g in (release.golden or []))
    return Candidate(f"{release.name}:{release.version}", golden, variants)


class Candidates:
    """Channel -> candidate, shared by every device's computation until the next change; ``clear`` on change."""

    def __init__(self) -> None:
        self._by_channel: dict[str, Candidate | None] = {}
        self._generation = 0

    def clear(self) -> None:
        self._by_channel.clear()
        self._generation += 1

    async def get(self, s: AsyncSession, channel: str) -> Candidate | None:
        if channel in self._by_channel:
            return self._by_channel[channel]
        generation = self._generation
        found = await candidate(s, channel)
        if generation == self._generation:  # read before a change that raced with us: do not keep it
            self._by_channel[channel] = found
        return found


async def compute(s: AsyncSession, device: Device, candidates: Candidates | None = None,
                  groups: Iterable[Selecting] | None = None) -> Computed:
    """The device's desired state, from its effective configuration (``channel`` picks the release). No channel,
    an unknown one, or a release with no variant for the device's class: no release; the config still goes."""
    effective = await membership.effective_config(s, device, groups)
    channel = effective.channel
    found = None
    if channel is not None:
        found = await (candidates.get(s, channel) if candidates else candidate(s, channel))
    release = found.target(device.hardware_class) if found else None
    body = {"device_id": device.id, "release": release, "config": effective.config}
    return Computed(device.id, release, effective.config, blueprints.effective_hash(body))


def etag(version: int, digest: str) -> str:
    """The strong ETag of a desired state: its version and hash, so a device that missed a version cannot match."""
    return f'"{version}.{digest[:24]}"'


def seal(document: dict[str, Any]) -> bytes:
    """The served bytes of a desired-state document. The hook for signed, expiring metadata (TUF-style): sign
    the canonical document here with the online key and wrap it with its signature and expiry; not done yet."""
    return _encode(document)
