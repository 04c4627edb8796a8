"""Which groups a device is in, and the configuration its layers add up to.

A device is in a group when its tags include every tag of the group's selector (an empty selector takes every
device). Membership is computed, never stored: re-tagging a device or editing a selector moves devices between
groups at once, with nothing to keep in step. The operators' routes and the devices' desired state both come
here, so what ``fleet config DEVICE`` shows is what the device is told.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.fleet.control.blueprints import BASELINE, Effective, Layer, device_layer, group_layer, merge, order
from slmops.fleet.control.models import Blueprint, Device, Group


class Selecting(Protocol):
    """A group as membership needs it (a ``Group`` row satisfies it)."""

    name: str
    selector: dict[str, Any]


def in_group(tags: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    return all(tags.get(key) == value for key, value in selector.items())


def groups_of(tags: Mapping[str, Any], groups: Iterable[Selecting]) -> list[str]:
    """Names of the groups whose selector ``tags`` satisfy, sorted."""
    return sorted(g.name for g in groups if in_group(tags or {}, g.selector or {}))


async def all_groups(s: AsyncSession) -> list[Group]:
    return list((await s.execute(select(Group).order_by(Group.name))).scalars())


async def all_layers(s: AsyncSession) -> dict[str, Layer]:
    """Every blueprint layer by name: one read that a whole fleet's computations share until the next change."""
    return _by_name((await s.execute(select(Blueprint))).scalars())


def _by_name(rows: Iterable[Blueprint]) -> dict[str, Layer]:
    return {r.layer: Layer(r.layer, r.priority, dict(r.config or {})) for r in rows}


async def layers_for(s: AsyncSession, device: Device, groups: Iterable[Selecting] | None = None,
                     layers: Mapping[str, Layer] | None = None) -> list[Layer]:
    """The device's layers, lowest precedence first: baseline, its groups' layers (priority, then name), its own.
    ``groups`` and ``layers`` (:func:`all_layers`): everything there is, when the caller has it already."""
    names = groups_of(device.tags, await all_groups(s) if groups is None else groups)
    wanted = [BASELINE, device_layer(device.id), *(group_layer(n) for n in names)]
    if layers is None:
        layers = _by_name((await s.execute(select(Blueprint).where(Blueprint.layer.in_(wanted)))).scalars())
    found = {name: layers[name] for name in wanted if name in layers}
    return order(found.get(BASELINE), [found[group_layer(n)] for n in names if group_layer(n) in found],
                 found.get(device_layer(device.id)))


async def effective_config(s: AsyncSession, device: Device, groups: Iterable[Selecting] | None = None,
                           layers: Mapping[str, Layer] | None = None) -> Effective:
    """The merged configuration of the device, with the layer each leaf came from."""
    return merge(await layers_for(s, device, groups, layers))
