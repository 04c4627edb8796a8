"""The operators' routes of ``/fleet/v1``: enrolment tokens, devices, groups, blueprint layers, the ledger and keys.

Each mutation is one ``db.write()`` transaction that checks what it was given first, changes the rows, and
appends its ledger entry last (who, what, which subject; never a secret), so a change and its record exist
together or not at all, and every change bumps the change version other replicas watch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import secrets
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.api.fleet import (NAME_RE, BlueprintInfo, BlueprintRequest, DeviceInfo, DevicePage, EffectiveConfig,
                              EnrolmentTokenRequest, EnrolmentTokenResponse, GroupInfo, GroupRequest, Health,
                              KeyInfo, KeyRequest, LedgerInfo, LedgerVerdict, Tags, TagsRequest, TokenInfo)
from slmops.config.settings import parse_duration
from slmops.fleet.control import ledger, membership, operators
from slmops.fleet.control.blueprints import BASELINE, check_layer
from slmops.fleet.control.models import Blueprint, Device, EnrolmentToken, Group, LedgerEntry
from slmops.fleet.control.operators import Actor, admin, operator, viewer
from slmops.fleet.hardware import hardware_class
from slmops.types.errors import Conflict, InvalidInput, NotFound

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

router = APIRouter(prefix="/fleet/v1", tags=["operators"])

TOKEN_PREFIX = "slmenrol_"
TOKEN_TTL = (60.0, 30 * 86400.0)  # 1 minute .. 30 days
SCAN = 500  # devices read at once when a filter runs in Python


@contextlib.asynccontextmanager
async def lifespan(plane: "ControlPlane") -> AsyncIterator[None]:
    """Drop this replica's cached operator keys whenever the database changes (a revocation elsewhere)."""
    plane.watch(operators.key_cache(plane).drop)
    yield


def _plane(request: Request) -> "ControlPlane":
    return request.app.state.plane


async def _delete(s: AsyncSession, row: Any, actor: Actor, kind: str, name: str, data: dict[str, Any],
                  at: float) -> None:
    """Delete ``row`` and append its ``<kind>.delete`` entry about ``<kind>:<name>``, in the caller's transaction."""
    await s.delete(row)
    await s.flush()
    await ledger.append(s, actor=actor.ledger_name, action=f"{kind}.delete", subject=f"{kind}:{name}", data=data,
                        at=at)


def token_hash(token: str) -> str:
    """What the table stores of an enrolment token: sha256 hex of its whole text."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def duration(text: str, what: str) -> float:
    """Seconds from ``10m``, ``1h30m``, ``7d`` or ``2d12h`` (``parse_duration``'s grammar, plus leading days)."""
    m = re.fullmatch(r"\s*(\d+)d(\d.*)?\s*", text)
    try:
        seconds = int(m.group(1)) * 86400.0 + (parse_duration(m.group(2)) if m.group(2) else 0.0) if m \
            else parse_duration(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"{what}: {text!r} is not a duration; use one such as 10m, 1h or 7d")
    return seconds


# -- enrolment tokens -------------------------------------------------------------------------------------------

@router.post("/tokens", response_model=EnrolmentTokenResponse, status_code=201)
async def create_token(body: EnrolmentTokenRequest, request: Request,
                       actor: Actor = Depends(operator)) -> EnrolmentTokenResponse:
    plane = _plane(request)
    ttl = duration(body.expires_in, "expires_in")
    if not TOKEN_TTL[0] <= ttl <= TOKEN_TTL[1]:
        raise InvalidInput(f"expires_in: a token lives from 1m to 30d; got {body.expires_in!r}")
    now = plane.clock()
    token_id, secret = f"tok_{secrets.token_hex(6)}", TOKEN_PREFIX + secrets.token_urlsafe(32)
    async with plane.db.write(devices=()) as s:  # tokens change no device's state
        s.add(EnrolmentToken(id=token_id, token_hash=token_hash(secret), expires_at=now + ttl, tags=body.tags,
                             created_by=actor.ledger_name, created_at=now))
        await s.flush()
        await ledger.append(s, actor=actor.ledger_name, action="token.create", subject=f"token:{token_id}",
                            data={"expires_at": now + ttl, "tags": body.tags}, at=now)
    return EnrolmentTokenResponse(id=token_id, token=secret, expires_at=now + ttl)


@router.get("/tokens", response_model=list[TokenInfo])
async def list_tokens(request: Request, actor: Actor = Depends(viewer)) -> list[TokenInfo]:
    async with _plane(request).db.read() as s:
        rows = (await s.execute(select(EnrolmentToken).order_by(EnrolmentToken.created_at,
                                                                EnrolmentToken.id))).scalars()
        return [TokenInfo(id=t.id, expires_at=t.expires_at, tags=t.tags, created_by=t.created_by,
                          created_at=t.created_at, used_at=t.used_at, used_by=t.used_by) for t in rows]


@router.delete("/tokens/{token_id}", status_code=204)
async def delete_token(token_id: str, request: Request, actor: Actor = Depends(operator)) -> Response:
    plane = _plane(request)
    async with plane.db.write(devices=()) as s:
        row = await s.get(EnrolmentToken, token_id)
        if row is None:
            raise NotFound(f'no enrolment token "{token_id}"; `slmops fleet tokens list` shows them')
        await _delete(s, row, actor, "token", token_id, {"used": row.used_at is not None}, plane.clock())
    return Response(status_code=204)


# -- devices ----------------------------------------------------------------------------------------------------

def device_info(d: Device, groups: list[Group]) -> DeviceInfo:
    return DeviceInfo(id=d.id, name=d.name, hardware_class=d.hardware_class, agent_version=d.agent_version,
                      tags=d.tags or {}, groups=membership.groups_of(d.tags or {}, groups),
                      enrolled_at=d.enrolled_at, last_seen=d.last_seen, revoked=d.revoked_at is not None,
                      running_release=d.running_release, health=d.health, desired_version=d.desired_version)


def selects(selector: dict[str, Any]) -> list[ColumnElement[bool]]:
    """SQL conditions for "the device's tags include the selector" (tag values are strings)."""
    return [Device.tags[key].as_string() == value for key, value in sorted(selector.items())]


async def _device(s: AsyncSession, device_id: str) -> Device:
    row = await s.get(Device, device_id)
    if row is None:
        raise NotFound(f'no device "{device_id}"; `slmops fleet devices` lists them')
    return row


async def _group(s: AsyncSession, name: str) -> Group:
    row = await s.get(Group, name)
    if row is None:
        raise NotFound(f'no group "{name}"; `slmops fleet groups list` shows them')
    return row


@router.get("/devices", response_model=DevicePage)
async def list_devices(request: Request, group: str | None = None, hardware_class: str | None = None,
                       release: str | None = None, health: Health | None = None, seen_within: str | None = None,
                       revoked: bool | None = None, limit: int = Query(100, ge=1, le=1000), after: str = "",
                       actor: Actor = Depends(viewer)) -> DevicePage:
    plane = _plane(request)
    q = select(Device).where(Device.id > after).order_by(Device.id).limit(limit + 1)
    if hardware_class is not None:
        q = q.where(Device.hardware_class == hardware_class)
    if release is not None:  # NAME:VERSION, or NAME for any version of it
        q = q.where(Device.running_release == release if ":" in release else
                    Device.running_release.startswith(release + ":", autoescape=True))
    if health is not None:
        q = q.where(Device.health == health)
    if seen_within is not None:
        q = q.where(Device.last_seen >= plane.clock() - duration(seen_within, "seen_within"))
    if revoked is not None:
        q = q.where(Device.revoked_at.is_not(None) if revoked else Device.revoked_at.is_(None))
    async with plane.db.read() as s:
        if group is not None:
            q = q.where(*selects((await _group(s, group)).selector or {}))
        rows = list((await s.execute(q)).scalars())
        groups = await membership.all_groups(s)
    more = len(rows) > limit
    rows = rows[:limit]
    return DevicePage(devices=[device_info(d, groups) for d in rows], next=rows[-1].id if more else None)


@router.get("/devices/{device_id}", response_model=DeviceInfo)
async def get_device(device_id: str, request: Request, actor: Actor = Depends(viewer)) -> DeviceInfo:
    async with _plane(request).db.read() as s:
        return device_info(await _device(s, device_id), await membership.all_groups(s))


@router.patch("/devices/{device_id}/tags", response_model=DeviceInfo)
async def tag_device(device_id: str, body: TagsRequest, request: Request,
                     actor: Actor = Depends(operator)) -> DeviceInfo:
    """Set tags (null removes one). The ``class`` tag overrides the hardware class, so that is recomputed."""
    plane = _plane(request)
    now = plane.clock()
    async with plane.db.write(devices=(device_id,)) as s:  # its groups, so its state: no other device's
        d = await _device(s, device_id)
        tags = {**(d.tags or {}), **{k: v for k, v in body.tags.items() if v is not None}}
        removed = sorted(k for k, v in body.tags.items() if v is None and k in tags)
        for key in removed:
            del tags[key]
        try:
            tags = TypeAdapter(Tags).validate_python(tags)
        except ValidationError as err:
            raise InvalidInput(err.errors()[0]["msg"].removeprefix("Value error, ")) from None
        d.hardware_class = hardware_class(d.hardware or {}, tags)
        d.tags = tags
        await ledger.append(s, actor=actor.ledger_name, action="device.tag", subject=f"device:{device_id}",
                            data={"set": {k: v for k, v in body.tags.items() if v is not None}, "removed": removed},
                            at=now)
        return device_info(d, await membership.all_groups(s))


@router.post("/devices/{device_id}/revoke", response_model=DeviceInfo)
async def revoke_device(device_id: str, request: Request, actor: Actor = Depends(admin)) -> DeviceInfo:
    """From the commit on, the device's signed requests get 401 on every replica (the change version moved)."""
    plane = _plane(request)
    now = plane.clock()
    async with plane.db.write() as s:  # a change of everything: every replica drops its cached keys
        d = await _device(s, device_id)
        if d.revoked_at is None:
            d.revoked_at = now
            await ledger.append(s, actor=actor.ledger_name, action="device.revoke", subject=f"device:{device_id}",
                                data={"name": d.name}, at=now)
        return device_info(d, await membership.all_groups(s))


@router.get("/devices/{device_id}/config", response_model=EffectiveConfig)
async def device_config(device_id: str, request: Request, actor: Actor = Depends(viewer)) -> EffectiveConfig:
    async with _plane(request).db.read() as s:
        effective = await membership.effective_config(s, await _device(s, device_id))
    return EffectiveConfig(device_id=device_id, config=effective.config, sources=effective.sources)


# -- groups -----------------------------------------------------------------------------------------------------

async def group_info(s: AsyncSession, g: Group) -> GroupInfo:
    count = select(func.count()).select_from(Device).where(Device.revoked_at.is_(None), *selects(g.selector or {}))
    return GroupInfo(name=g.name, selector=g.selector or {}, devices=int((await s.execute(count)).scalar_one()))


@router.put("/groups/{name}", response_model=GroupInfo)
async def put_group(name: str, body: GroupRequest, request: Request, actor: Actor = Depends(operator)) -> GroupInfo:
    if not NAME_RE.match(name):
        raise InvalidInput(f"group name {name!r}: use lowercase letters, digits and ._- (64 at most)")
    plane = _plane(request)
    now = plane.clock()
    async with plane.db.write() as s:
        row = await s.get(Group, name)
        if row is None:
            row = Group(name=name, selector=body.selector, created_at=now)
            s.add(row)
        else:
            row.selector = body.selector
        await s.flush()
        await ledger.append(s, actor=actor.ledger_name, action="group.put", subject=f"group:{name}",
                            data={"selector": body.selector}, at=now)
        return await group_info(s, row)


@router.get("/groups", response_model=list[GroupInfo])
async def list_groups(request: Request, actor: Actor = Depends(viewer)) -> list[GroupInfo]:
    async with _plane(request).db.read() as s:
        return [await group_info(s, g) for g in await membership.all_groups(s)]


@router.get("/groups/{name}", response_model=GroupInfo)
async def get_group(name: str, request: Request, actor: Actor = Depends(viewer)) -> GroupInfo:
    async with _plane(request).db.read() as s:
        return await group_info(s, await _group(s, name))


@router.delete("/groups/{name}", status_code=204)
async def delete_group(name: str, request: Request, actor: Actor = Depends(operator)) -> Response:
    """Refused while the group has a blueprint layer: deleting it would silently change its devices' config."""
    plane = _plane(request)
    async with plane.db.write() as s:
        row = await _group(s, name)
        if await s.get(Blueprint, f"group:{name}") is not None:
            raise Conflict(f'group "{name}" has a blueprint layer; remove it first with '
                           f"`slmops fleet blueprints rm group:{name}`")
        await _delete(s, row, actor, "group", name, {"selector": row.selector}, plane.clock())
    return Response(status_code=204)


# -- blueprint layers -------------------------------------------------------------------------------------------

def blueprint_info(b: Blueprint) -> BlueprintInfo:
    return BlueprintInfo(layer=b.layer, priority=b.priority, config=b.config or {}, updated_at=b.updated_at,
                         updated_by=b.updated_by)


def _layer_kind(layer: str) -> tuple[str, str]:
    """(kind, name) of ``baseline``, ``group:<name>`` or ``device:<id>``."""
    kind, sep, name = layer.partition(":")
    if layer == BASELINE or (sep and name and kind in ("group", "device")):
        return kind, name
    raise InvalidInput(f"blueprint layer {layer!r}: use baseline, group:<name> or device:<id>")


async def _blueprint(s: AsyncSession, layer: str) -> Blueprint:
    _layer_kind(layer)
    row = await s.get(Blueprint, layer)
    if row is None:
        raise NotFound(f'no blueprint layer "{layer}"; `slmops fleet blueprints list` shows them')
    return row


@router.put("/blueprints/{layer}", response_model=BlueprintInfo)
async def put_blueprint(layer: str, body: BlueprintRequest, request: Request,
                        actor: Actor = Depends(operator)) -> BlueprintInfo:
    kind, name = _layer_kind(layer)
    if kind != "group" and body.priority:
        raise InvalidInput(f"priority: only group layers have one (it orders them); {layer} is always "
                           f"{'under' if kind == BASELINE else 'over'} every group")
    config = check_layer(body.config, layer)
    plane = _plane(request)
    now = plane.clock()
    async with plane.db.write() as s:
        if kind == "group":
            await _group(s, name)
        elif kind == "device":
            await _device(s, name)
        row = await s.get(Blueprint, layer)
        if row is None:
            row = Blueprint(layer=layer, priority=body.priority, config=config, updated_at=now,
                            updated_by=actor.ledger_name)
            s.add(row)
        else:
            row.priority, row.config, row.updated_at, row.updated_by = body.priority, config, now, actor.ledger_name
        await s.flush()
        await ledger.append(s, actor=actor.ledger_name, action="blueprint.put", subject=f"blueprint:{layer}",
                            data={"priority": body.priority, "config": config}, at=now)
        return blueprint_info(row)


@router.get("/blueprints", response_model=list[BlueprintInfo])
async def list_blueprints(request: Request, actor: Actor = Depends(viewer)) -> list[BlueprintInfo]:
    """Lowest precedence first: the baseline, group layers by priority then name, device layers."""
    async with _plane(request).db.read() as s:
        rows = list((await s.execute(select(Blueprint))).scalars())
    rank = {BASELINE: 0, "group": 1, "device": 2}
    rows.sort(key=lambda b: (rank.get(b.layer.partition(":")[0], 3), b.priority if b.layer.startswith("group:")
                             else 0, b.layer))
    return [blueprint_info(b) for b in rows]


@router.get("/blueprints/{layer}", response_model=BlueprintInfo)
async def get_blueprint(layer: str, request: Request, actor: Actor = Depends(viewer)) -> BlueprintInfo:
    async with _plane(request).db.read() as s:
        return blueprint_info(await _blueprint(s, layer))


@router.delete("/blueprints/{layer}", status_code=204)
async def delete_blueprint(layer: str, request: Request, actor: Actor = Depends(operator)) -> Response:
    plane = _plane(request)
    async with plane.db.write() as s:
        row = await _blueprint(s, layer)
        await _delete(s, row, actor, "blueprint", layer, {"priority": row.priority}, plane.clock())
    return Response(status_code=204)


# -- ledger -----------------------------------------------------------------------------------------------------

def ledger_info(e: LedgerEntry) -> LedgerInfo:
    return LedgerInfo(seq=e.seq, at=e.at, actor=e.actor, action=e.action, subject=e.subject, data=e.data or {},
                      prev=e.prev, hash=e.hash)


@router.get("/ledger", response_model=list[LedgerInfo])
async def read_ledger(request: Request, after: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000),
                      subject: str | None = None, actor: Actor = Depends(viewer)) -> list[LedgerInfo]:
    async with _plane(request).db.read() as s:
        return [ledger_info(e) for e in await ledger.entries(s, after=after, limit=limit, subject=subject)]


@router.get("/ledger/verify", response_model=LedgerVerdict)
async def verify_ledger(request: Request, actor: Actor = Depends(viewer)) -> LedgerVerdict:
    async with _plane(request).db.read() as s:
        verdict = await ledger.verify(s)
    return LedgerVerdict(ok=verdict.ok, entries=verdict.entries, problem=verdict.problem)


# -- operator keys ----------------------------------------------------------------------------------------------

@router.post("/keys", response_model=KeyInfo, status_code=201)
async def create_key(body: KeyRequest, request: Request, actor: Actor = Depends(admin)) -> KeyInfo:
    plane = _plane(request)
    return await operators.create_key_info(plane.db, body.name, body.role, actor.ledger_name, plane.clock())


@router.get("/keys", response_model=list[KeyInfo])
async def list_keys(request: Request, actor: Actor = Depends(admin)) -> list[KeyInfo]:
    return await operators.list_keys(_plane(request).db)


@router.delete("/keys/{name}", response_model=KeyInfo)
async def revoke_key(name: str, request: Request, actor: Actor = Depends(admin)) -> KeyInfo:
    plane = _plane(request)
    gone = await operators.revoke_key(plane.db, name, actor.ledger_name, plane.clock())
    operators.key_cache(plane).drop()  # this replica at once; the others when they see the change
    return gone
