"""The devices' routes of ``/fleet/v1``: enrolment, sessions, the desired-state poll and reports.

Polls are most of the control plane's traffic and almost all of them change nothing, so the poll answers 304 from
memory: per device, the ETag of the state last computed, valid until the change feed reports that the database
moved. Device public keys are cached the same way. Reports are queued and written in batches
(``reports.ReportBatcher``); poll times are noted in memory and written with them. The device's identity comes
only from its verified signature or session token: there is no device id in a path, so a device can only read its
own state.

Polls and reports carry a session token (``deviceauth``: one HMAC, a few µs) or, as before, an Ed25519 signature
(130-350 µs); ``POST /device/session`` answers a signed request only, so a token is never renewed without the
device's key. The session secret lives in the database (``server_secrets``), made by the first replica to start,
read by every other one. Either way the device's row is looked up in the key cache on every request, so a revoked
device is refused at once, with a live token too.

Every desired-state document is signed (``control/trust.py``'s online key, ``slmops.fleet.metadata``'s format) with
an expiry ``SLMOPS_FLEET_METADATA_TTL`` ahead, and its ETag carries that expiry, so any replica can tell from a poll
alone whether the device's document is still fresh: a 304 only while more than half its lifetime is left, else the
same state is re-issued under a new version. The signed answer is cached per device like the ETag.

A signature whose only fault is its time is refused with 401, ``WWW-Authenticate: Slmops-Device
error="clock_skew"`` and ``Slmops-Server-Time`` (the server's clock, in seconds), from which the agent corrects its
clock offset. The answer sets no ``Date`` of its own: the HTTP server adds one (uvicorn does), and a second one would
make two.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops.api.fleet import (EnrolRequest, EnrolResponse, ErrorBody, ReportRequest, SessionResponse,
                              SignedDesired)
from slmops.fleet import deviceauth, hardware
from slmops.fleet.control import desired, ledger, membership
from slmops.fleet.control.blueprints import Layer
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import Device, EnrolmentToken, Group, ServerSecret
from slmops.fleet.control.reports import ReportBatcher, parse_report
from slmops.fleet.control.routes_admin import token_hash
from slmops.fleet.control.trust import STATE as TRUST
from slmops.fleet.control.trust import Trust
from slmops.fleet.control.versions import VersionAdvancer
from slmops.types.errors import InvalidInput, SlmopsError, TooLarge, Unauthenticated

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

STATE = "routes_device"  # plane.extras key of this replica's DeviceSide
OPTIONS = "routes_device.options"  # plane.extras key of DeviceOptions (tests and benchmarks set it)
TOKEN_REFUSED = ("enrolment token is unknown, used or expired; ask an operator for a new one: "
                 "`slmops fleet tokens create`")
_devices = Device.__table__
_tokens = EnrolmentToken.__table__
_secrets = ServerSecret.__table__
_MAX_PROFILE = 64 * 1024  # bytes of JSON in a hardware profile
SESSION_SECRET = "session"  # ServerSecret.purpose of the session tokens' HMAC keys
_JSON_PRIVATE = ((b"content-type", b"application/json"), (b"cache-control", b"private, no-cache"))
_QUEUE_FULL = b'{"error":"the control plane\'s report queue is full; retry after a second"}'


@dataclass(frozen=True)
class DeviceOptions:
    """Tuning of the device side; defaults suit production, tests and benchmarks put others in ``plane.extras``."""

    flush_interval_s: float = 0.1  # reports: one transaction per this long
    flush_at: int = 500  # ... or as soon as this many wait
    queue_limit: int = 20_000  # reports waiting; beyond: 503
    seen_interval_s: float = 5.0  # last-seen times are written this often
    skew_s: float = 300.0  # signature timestamps this far from the server's clock are refused
    session_s: float = deviceauth.DEFAULT_SESSION_S  # lifetime of a session token
    max_report_bytes: int = 256 * 1024
    fast_path: bool = True  # DeviceFastPath answers polls and reports; False: the FastAPI routes do (tests)


@dataclass(frozen=True, slots=True)
class Answer:
    """A response as plain values: what the FastAPI routes and the fast path both send."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""

    def response(self) -> Response:
        out = Response(self.body, status_code=self.status)
        out.raw_headers.extend(self.headers)
        return out


@dataclass(frozen=True, slots=True)
class _Issued:
    """The signed document a device holds as far as this replica knows: the one it sealed for it (``answer``), or
    the one the device's ETag names (no ``answer``). Polls naming it get 304 until ``refresh_at``, half its
    lifetime before it expires; from then on it is re-issued under a new version."""

    version: int
    digest: str  # the state's hash, as far as the ETag carries it
    tag: str
    refresh_at: float
    answer: Answer | None


@dataclass(frozen=True, slots=True)
class _Key:
    public_key: bytes
    revoked: bool


@dataclass(frozen=True, slots=True)
class _Group:
    name: str
    selector: dict[str, Any]


class DeviceSide:
    """This replica's device-facing state: caches of device keys, ETags, groups and channel releases, dropped
    when the change version moves (those of the devices a change names, or all), and the report batcher. Caches
    are filled only by a lookup that did not race with a drop (a generation counter), so nothing read before a
    change outlives it."""

    def __init__(self, plane: ControlPlane, options: DeviceOptions, session_secrets: dict[int, bytes], trust: Trust):
        self.db = plane.db
        self.clock = plane.clock
        self.options = options
        self.trust = trust
        self._half_life = trust.ttl_s / 2  # a document with less left than this is re-issued
        self.batcher = ReportBatcher(plane.db, interval=options.flush_interval_s, flush_at=options.flush_at,
                                     limit=options.queue_limit, seen_interval=options.seen_interval_s)
        self.advancer = VersionAdvancer(plane.db)
        self.candidates = desired.Candidates()
        self.issued: dict[str, _Issued] = {}  # device id -> the signed document it holds
        self.version = 0  # the change version the caches belong to
        self._keys: dict[str, _Key] = {}
        self._groups: list[_Group] | None = None
        self._layers: dict[str, Layer] | None = None  # every blueprint layer (a device's own ones too)
        self._generation = 0
        self.fast_answers = 0  # requests DeviceFastPath answered itself
        self._session_secrets = session_secrets  # epoch -> HMAC key; the newest makes new tokens
        self._session_epoch = max(session_secrets)

    def on_change(self, version: int, devices: frozenset[str] | None = None) -> None:
        """The change feed's callback: forget what the change concerns, the named devices' documents (and what
        every device's computation shares: rollouts, channels), or everything. A rollout's wave or
        revert names its devices, so the rest of the fleet keeps its 304s; without that every decision made
        every device recompute (a few ms of CPU each, which at 10,000 devices held convergence back minutes)."""
        if version == self.version:
            return
        self.version = version
        self._generation += 1
        self.candidates.clear()
        if devices is None:
            self._keys.clear()
            self.issued.clear()
            self._groups = self._layers = None
            return
        for device_id in devices:  # (keys stay: a revocation is a change of everything)
            self.issued.pop(device_id, None)

    # -- authentication --------------------------------------------------------------------------------------
    async def authenticate(self, authorization: str | None, method: str, target: str, body: bytes,
                           session: bool = True) -> str:
        """The id of the device that sent this request: its session token when it carries one (and ``session``
        allows it), else its signature (``target``: path and query as signed); Unauthenticated (or ClockSkew)
        otherwise. The device must be enrolled and not revoked either way."""
        if session and deviceauth.is_session(authorization):
            device_id = deviceauth.verify_session(authorization, self._session_secrets, self.clock()).device_id
            key = self._keys.get(device_id) or await self._load_key(device_id)
        else:
            signed = deviceauth.parse_authorization(authorization)
            device_id = signed.device_id
            key = self._keys.get(device_id) or await self._load_key(device_id)
            if key is not None:
                deviceauth.verify_request(signed, key.public_key, method, target, body, self.clock(),
                                          self.options.skew_s)
        if key is None:
            raise Unauthenticated(f"device {device_id} is not enrolled with this control plane; enrol it "
                                  "with a token from `slmops fleet tokens create`")
        if key.revoked:
            raise Unauthenticated(f"device {device_id} was revoked; enrol it again with a new token")
        return device_id

    async def session(self, authorization: str | None, target: str, body: bytes) -> SessionResponse:
        """A session token for the device that signed this request (a session token cannot renew itself)."""
        device_id = await self.authenticate(authorization, "POST", target, body, session=False)
        expires_at = int(self.clock() + self.options.session_s)
        token = deviceauth.mint_session(self._session_secrets[self._session_epoch], self._session_epoch, device_id,
                                        expires_at)
        return SessionResponse(token=token, expires_at=expires_at)

    async def _load_key(self, device_id: str) -> _Key | None:
        generation = self._generation
        async with self.db.read() as s:
            row = (await s.execute(select(_devices.c.public_key, _devices.c.revoked_at)
                                   .where(_devices.c.id == device_id))).first()
        if row is None:
            return None  # not cached: a device enrolled a moment ago must get in at once
        key = _Key(bytes(row.public_key), row.revoked_at is not None)
        if generation == self._generation:
            self._keys[device_id] = key
        return key

    # -- the two device requests, as plain values (the routes and the fast path both answer through them) ------
    async def poll(self, authorization: str | None, if_none_match: str | None, target: str) -> Answer:
        """The calling device's desired state, signed: 304 from memory when its ETag names the current state in a
        document with more than half its lifetime left, the cached signed answer when there is one, else computed
        (:meth:`issue`)."""
        device_id = await self.authenticate(authorization, "GET", target, b"")
        now = self.clock()
        self.batcher.seen(device_id, now)
        issued = self.issued.get(device_id)
        if issued is not None and now < issued.refresh_at:
            if if_none_match == issued.tag:
                return Answer(304, ((b"etag", issued.tag.encode()),))
            held = held_document(if_none_match, issued.version, issued.digest) if if_none_match else None
            if held is not None and now < held[1] - self._half_life:  # the same state, signed by another replica
                return Answer(304, ((b"etag", held[0].encode()),))
            if held is None and issued.answer is not None:  # (held: its copy is near expiry, issue a new version)
                return issued.answer
        return await self.issue(device_id, if_none_match, now, issued)

    async def issue(self, device_id: str, if_none_match: str | None, now: float, issued: _Issued | None) -> Answer:
        """Compute the device's state. 304 when the device's ETag names it in a document that is still fresh;
        else a newly signed document, valid ``ttl_s``. When the document of the current state that is out there
        (the device's, or the one cached here) has less than half its lifetime left, it is re-issued under a new
        version, as a change would be: a device never waits for an expired document to be replaced."""
        generation = self._generation
        computed, version = await self.compute(device_id)
        digest = computed.hash[:_DIGEST_CHARS]
        held = held_document(if_none_match, version, digest) if if_none_match is not None else None
        if held is not None and now < held[1] - self._half_life:
            self._keep(generation, device_id, _Issued(version, digest, held[0], held[1] - self._half_life, None))
            return Answer(304, ((b"etag", held[0].encode()),))
        if held is not None or (issued is not None and now >= issued.refresh_at
                                and (issued.version, issued.digest) == (version, digest)):
            reissued = await self._reissue(device_id, version, computed.hash)
            if reissued is None:  # the state changed under us: what is current now
                computed, version = await self.compute(device_id)
                digest = computed.hash[:_DIGEST_CHARS]
            else:
                version = reissued
        expires = math.ceil(now + self.trust.ttl_s)
        body = desired.seal(computed.document(version, int(now)), self.trust.signer, expires)
        tag = sealed_etag(version, computed.hash, expires)
        answer = Answer(200, ((b"etag", tag.encode()), *_JSON_PRIVATE), body)
        self._keep(generation, device_id, _Issued(version, digest, tag, expires - self._half_life, answer))
        return answer

    def _keep(self, generation: int, device_id: str, issued: _Issued) -> None:
        if generation == self._generation:  # computed from what is current: no change came in meanwhile
            self.issued[device_id] = issued

    async def report(self, authorization: str | None, target: str, body: bytes) -> Answer:
        """Queue a report: 202, or 503 with Retry-After when the queue is full."""
        device_id = await self.authenticate(authorization, "POST", target, body)
        report = parse_report(body)
        if not self.batcher.offer(device_id, self.clock(), report):
            return Answer(503, ((b"retry-after", b"1"), (b"content-type", b"application/json")), _QUEUE_FULL)
        return Answer(202)

    # -- desired state -----------------------------------------------------------------------------------------
    async def compute(self, device_id: str) -> tuple[desired.Computed, int]:
        """The device's state and its version. The version moves forward (in the database, so every replica
        agrees) when the state's hash differs from the one last handed out, or on a re-issue (:meth:`issue`)."""
        generation = self._generation
        async with self.db.read() as s:
            device = await s.get(Device, device_id)
            if device is None:
                raise Unauthenticated(f"device {device_id} is not enrolled with this control plane; enrol it again")
            if self._groups is None or self._layers is None:
                groups = [_Group(g.name, dict(g.selector or {})) for g in (await s.execute(select(Group))).scalars()]
                layers = await membership.all_layers(s)
                if generation == self._generation:
                    self._groups, self._layers = groups, layers
            else:
                groups, layers = self._groups, self._layers
            computed = await desired.compute(s, device, self.candidates, groups, layers)
            version, stored_hash = device.desired_version, device.desired_hash
        if computed.hash != stored_hash:  # one step forward, in the next batch (versions.VersionAdvancer)
            version = await self.advancer.advance(device_id, computed.hash)
        return computed, version

    async def _reissue(self, device_id: str, version: int, digest: str) -> int | None:
        """Move the device's version one step for the same state (``digest``), from ``version``: the new version
        (another replica's, when it got there first), or None when the state itself changed meanwhile."""
        async with self.db.write(bump=False) as s:
            await s.execute(update(_devices).where(_devices.c.id == device_id, _devices.c.desired_version == version,
                                                   _devices.c.desired_hash == digest)
                            .values(desired_version=version + 1))
            row = (await s.execute(select(_devices.c.desired_version, _devices.c.desired_hash)
                                   .where(_devices.c.id == device_id))).one()
        return int(row.desired_version) if row.desired_hash == digest else None


def path_qs(scope: dict[str, Any]) -> str:
    """The request target as the device signed it: the raw path, and ``?query`` when there is one."""
    raw = scope.get("raw_path")
    path = raw.split(b"?", 1)[0].decode("latin-1") if raw else scope["path"]
    query = scope.get("query_string") or b""
    return f"{path}?{query.decode('latin-1')}" if query else path


_DIGEST_CHARS = 24  # of the state's hash in an ETag


def sealed_etag(version: int, digest: str, expires: int) -> str:
    """The ETag of a signed document: the state's version and hash (``desired.etag``) and the document's expiry,
    so any replica can tell from a poll alone whether the document the device holds is still fresh."""
    return f'{desired.etag(version, digest)[:-1]}.{expires}"'


def held_document(if_none_match: str, version: int, digest: str) -> tuple[str, int] | None:
    """The ETag in ``If-None-Match`` naming ``version`` with ``digest`` (first characters of the state's hash),
    and the expiry it carries; None when none does. ``*`` names no document: a device must say which it holds.
    A device that lies about the expiry of its own document only keeps itself from fresh ones."""
    for candidate in if_none_match.split(","):
        tag = candidate.strip().removeprefix("W/")
        parts = tag.strip('"').split(".")
        if (len(parts) == 3 and parts[1] == digest[:_DIGEST_CHARS] and parts[0] == str(version)
                and parts[2].isascii() and parts[2].isdigit()):
            return tag, int(parts[2])
    return None


def side_of(request: Request) -> DeviceSide:
    return request.app.state.plane.extras[STATE]


SERVER_TIME = "Slmops-Server-Time"


def skew_response(err: deviceauth.ClockSkew) -> JSONResponse:
    """401 with the server's time for the agent to correct its offset from: in ``Slmops-Server-Time`` (ms
    resolution) and in the ``Date`` the HTTP server adds, not set here (two would reach the device)."""
    return JSONResponse({"error": str(err), "server_time": err.server_time}, status_code=401, headers={
        SERVER_TIME: f"{err.server_time:.3f}", "WWW-Authenticate": f'{deviceauth.SCHEME} error="clock_skew"'})


class DeviceRoute(APIRoute):
    """Answers a clock-skewed signature with the server's time, which the app's error table cannot carry."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except deviceauth.ClockSkew as err:
                return skew_response(err)

        return handle


router = APIRouter(prefix="/fleet/v1", tags=["devices"], route_class=DeviceRoute)
_UNAUTHENTICATED = {401: {"model": ErrorBody, "description": "no valid device signature or session token, a "
                                                              "revoked device, or a clock too far off (then with "
                                                              "Slmops-Server-Time)"}}


@contextlib.asynccontextmanager
async def lifespan(plane: ControlPlane) -> AsyncIterator[None]:
    """Start this replica's device side: its caches follow the change feed; the batcher writes reports until
    shutdown, then writes what is still queued."""
    keys = await session_secrets(plane.db, plane.clock())
    side = DeviceSide(plane, plane.extras.get(OPTIONS) or DeviceOptions(), keys, plane.extras[TRUST])
    side.version = await plane.db.change_version()
    plane.extras[STATE] = side
    try:
        plane.watch(side.on_change)
        async with side.batcher.running(), side.advancer.running():
            yield
    finally:
        plane.extras.pop(STATE, None)


@router.post("/enrol", response_model=EnrolResponse, responses={401: {"model": ErrorBody}})
async def enrol(body: EnrolRequest, request: Request) -> EnrolResponse:
    """Enrol a device with a one-time token and its own public key (proved by a signature over the token)."""
    plane: ControlPlane = request.app.state.plane
    public_key = deviceauth.verify_proof(body.public_key, body.token, body.proof)
    if len(json.dumps(body.hardware, default=str)) > _MAX_PROFILE:
        raise InvalidInput(f"hardware: the profile is over {_MAX_PROFILE // 1024} KiB; send what `slmops hw --json` "
                           "prints")
    now = plane.clock()
    device_id = deviceauth.new_device_id()
    async with plane.db.write(devices=(device_id,)) as s:  # a new device changes no other device's state
        token = (await s.execute(select(EnrolmentToken).where(EnrolmentToken.token_hash == token_hash(body.token))
                                 )).scalar_one_or_none()
        if token is None or token.used_at is not None or token.expires_at <= now:
            raise Unauthenticated(TOKEN_REFUSED)
        tags = {**body.tags, **(token.tags or {})}  # the operator's tags win over what the device says
        hardware_class = hardware.hardware_class(body.hardware, tags)
        claimed = await s.execute(update(_tokens).where(_tokens.c.id == token.id, _tokens.c.used_at.is_(None))
                                  .values(used_at=now, used_by=device_id))
        if claimed.rowcount != 1:  # type: ignore[attr-defined]  # another enrolment used it meanwhile
            raise Unauthenticated(TOKEN_REFUSED)
        s.add(Device(id=device_id, name=body.name, public_key=public_key, hardware=body.hardware,
                     hardware_class=hardware_class, agent_version=body.agent_version, tags=tags, enrolled_at=now,
                     last_seen=now))
        await s.flush()
        await ledger.append(s, actor=f"device:{device_id}", action="device.enrol", subject=device_id,
                            data={"name": body.name, "hardware_class": hardware_class, "tags": tags,
                                  "token": token.id, "token_by": token.created_by}, at=now)
    return EnrolResponse(device_id=device_id, hardware_class=hardware_class, poll_interval_s=plane.poll_interval_s,
                         server_time=now, trust_root=plane.extras[TRUST].root_json)


async def session_secrets(db: Database, now: float) -> dict[int, bytes]:
    """The session tokens' HMAC keys by epoch; the first replica to start makes epoch 1 (32 random bytes), the
    others find it (insert-if-absent, so replicas starting at once agree). Never logged."""
    insert = (sqlite if db.dialect == "sqlite" else postgresql).insert
    async with db.write(bump=False) as s:
        await s.execute(insert(_secrets).values(purpose=SESSION_SECRET, epoch=1, value=secrets.token_bytes(32),
                                                created_at=now).on_conflict_do_nothing())
    async with db.read() as s:
        rows = await s.execute(select(_secrets.c.epoch, _secrets.c.value).where(_secrets.c.purpose == SESSION_SECRET))
        return {int(epoch): bytes(value) for epoch, value in rows}


@router.post("/device/session", response_model=SessionResponse, responses=_UNAUTHENTICATED)
async def new_session(request: Request) -> Response:
    """A session token for the device that signed this request: later polls and reports send
    ``Authorization: Slmops-Session <token>`` (one HMAC to check instead of a signature) until it expires."""
    side = side_of(request)
    body = await read_body(request, 1024, "a session request has an empty body; send none")
    answer = await side.session(request.headers.get("authorization"), path_qs(request.scope), body)
    return Response(answer.model_dump_json(), media_type="application/json", headers={"cache-control": "no-store"})


@router.get("/device/desired", response_model=SignedDesired, responses={
    304: {"description": "the document the ETag in If-None-Match names is current and has more than half its "
                         "lifetime left"}, **_UNAUTHENTICATED})
async def poll_desired(request: Request) -> Response:
    """The calling device's desired state, signed (``SignedDesired``: a ``DesiredState`` under ``signed``), with
    an ETag; 304 when ``If-None-Match`` names it and it is not about to expire."""
    answer = await side_of(request).poll(request.headers.get("authorization"), request.headers.get("if-none-match"),
                                         path_qs(request.scope))
    return answer.response()


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined, to stand alone inside the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_REPORT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": _inline(ReportRequest.model_json_schema())}}}}


@router.post("/device/reports", status_code=202, openapi_extra=_REPORT_BODY, responses={
    202: {"description": "queued; written with the next batch"}, 400: {"model": ErrorBody},
    503: {"model": ErrorBody, "description": "the queue is full; retry after Retry-After seconds"},
    **_UNAUTHENTICATED})
async def post_report(request: Request) -> Response:
    """Report what the device runs and its aggregates (``ReportRequest``); queued and answered at once."""
    side = side_of(request)
    body = await read_body(request, side.options.max_report_bytes)
    answer = await side.report(request.headers.get("authorization"), path_qs(request.scope), body)
    return answer.response()


class DeviceFastPath:
    """ASGI middleware for the two requests that make nearly all of a control plane's traffic (polls and
    reports): answered straight from :class:`DeviceSide`, without FastAPI's routing and dependency machinery
    (most of a poll's cost otherwise). Only success is answered here; a request that fails is replayed through
    the app, so errors are answered in one place and are the same on both paths. Everything else passes by."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) not in _FAST:
            return await self.app(scope, receive, send)
        side: DeviceSide | None = scope["app"].state.plane.extras.get(STATE)
        if side is None or not side.options.fast_path:
            return await self.app(scope, receive, send)
        wanted = _wanted_headers(scope["headers"])
        body = b""
        if scope["method"] == "POST":
            body, whole = await _receive_body(receive, side.options.max_report_bytes)
            if not whole:
                return await self.app(scope, _replay(body, receive), send)
        try:
            if scope["method"] == "GET":
                answer = await side.poll(wanted.get(b"authorization"), wanted.get(b"if-none-match"), path_qs(scope))
            else:
                answer = await side.report(wanted.get(b"authorization"), path_qs(scope), body)
        except SlmopsError:
            return await self.app(scope, _replay(body, receive), send)
        side.fast_answers += 1
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())] if answer.status != 304 \
            else list(answer.headers)
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})


_FAST = {("GET", "/fleet/v1/device/desired"), ("POST", "/fleet/v1/device/reports")}
_FAST_HEADERS = (b"authorization", b"if-none-match")


def _wanted_headers(raw: list[tuple[bytes, bytes]]) -> dict[bytes, str]:
    return {k: v.decode("latin-1") for k, v in raw if k in _FAST_HEADERS}


async def _receive_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The body, and whether it was read whole within ``limit`` (else what was read, for the app to refuse)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then what the connection says (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def read_body(request: Request, limit: int,
                    refusal: str = "a report is at most {kib} KiB; send fewer windows per report") -> bytes:
    """The request's body, refused (413, ``refusal``) past ``limit`` bytes without reading all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(refusal.format(kib=limit // 1024))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(refusal.format(kib=limit // 1024))
        chunks.append(chunk)
    return b"".join(chunks)
