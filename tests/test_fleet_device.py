"""The devices' side of the control plane on SQLite and PostgreSQL, in-process (the app's lifespan run as the server
runs it) through the device client: enrolment and its one-time tokens, signed requests, session tokens and what is
refused, the 304 poll that never reaches the database, desired versions that only move forward, and reports written
in batches (each window once) with a ledger entry when what a device runs changes. Tokens, releases, channels and
blueprints are written as rows here; their routes are tested with their owners."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx
import msgspec
import pytest
from fleet_app import BASE_URL, eventually, run, serving
from fleet_db import fleet_db_url, postgres  # noqa: F401
from sqlalchemy import event, func, select, update

from slmops.api.fleet import ReportRequest
from slmops.client import DeviceClient
from slmops.fleet import deviceauth
from slmops.fleet.control import ledger
from slmops.fleet.control.app import ControlPlane
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import (Blueprint, Channel, Device, EnrolmentToken, LedgerEntry, Release, Report,
                                         Variant)
from slmops.fleet.control.reports import Flushed, ReportBatcher, parse_report
from slmops.fleet.control.routes_admin import token_hash
from slmops.fleet.control.routes_device import (OPTIONS, SERVER_TIME, STATE, TOKEN_REFUSED, DeviceOptions,
                                                DeviceSide)
from slmops.fleet.deviceauth import DeviceKey
from slmops.types.errors import Busy, InvalidInput, Unauthenticated

PROFILE = {"cpu": {"architecture": "x86_64"}, "gpus": []}
QUIET = DeviceOptions(flush_interval_s=3600)  # the batcher writes only when the test flushes
# polls and reports are answered by DeviceFastPath; the FastAPI routes answer the same when it is off
BOTH_PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "routes"])


@dataclass
class Fleet:
    plane: ControlPlane
    side: DeviceSide
    transport: httpx.ASGITransport
    raw: httpx.AsyncClient  # unsigned requests, for what the device client would never send

    def device(self, key: DeviceKey | None = None, **kw: Any) -> DeviceClient:
        return DeviceClient(BASE_URL, key or DeviceKey.generate(), transport=self.transport, **kw)

    async def enrolled(self, tags: dict[str, str] | None = None, **kw: Any) -> DeviceClient:
        client = self.device(**kw)
        await client.enrol(await token(self.plane), name="edge", hardware=PROFILE, tags=tags)
        return client

    async def settled(self) -> None:
        """Wait until this replica's caches have followed the change feed to the database's change version."""
        wanted = await self.plane.db.change_version()
        await eventually(lambda: self.side.version >= wanted, "the change feed did not catch up")


@contextlib.asynccontextmanager
async def fleet(url: str, options: DeviceOptions | None = None, clock: Callable[[], float] = time.time
                ) -> AsyncIterator[Fleet]:
    plane = ControlPlane(Database(url), clock=clock, extras={OPTIONS: options or DeviceOptions()})
    async with serving(plane) as transport:
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as raw:
            yield Fleet(plane, plane.extras[STATE], transport, raw)


async def token(plane: ControlPlane, tags: dict[str, str] | None = None, expires_in: float = 3600) -> str:
    secret = f"slmenrol_{secrets.token_urlsafe(24)}"
    now = time.time()
    async with plane.db.write() as s:
        s.add(EnrolmentToken(id=f"tok_{secret[-12:].lower()}", token_hash=token_hash(secret), expires_at=now + expires_in,
                             tags=tags or {}, created_by="key:ops", created_at=now))
    return secret


async def publish(plane: ControlPlane, name: str, version: str, variants: dict[str, bytes | None],
                  channel: str = "stable") -> str:
    """A release with a variant per hardware key (signature bytes or None), and ``channel`` pointing at it."""
    async with plane.db.write() as s:
        release = Release(name=name, version=version, golden=[{"prompt": "2+2=", "expect": "4"}],
                          created_by="key:ops", created_at=time.time())
        s.add(release)
        await s.flush()
        for hw, signature in variants.items():
            digest = "sha256:" + f"{hash((name, version, hw)) & (2**64 - 1):016x}" * 4
            s.add(Variant(release_id=release.id, hardware=hw, reference=f"reg.example/{name}@{digest}",
                          manifest_digest=digest, signature=signature))
        found = await s.get(Channel, channel)
        if found is None:
            s.add(Channel(name=channel, release_id=release.id, updated_at=time.time()))
        else:
            found.release_id, found.updated_at = release.id, time.time()
    return f"{name}:{version}"


async def set_layer(plane: ControlPlane, layer: str, config: dict[str, Any], priority: int = 0) -> None:
    async with plane.db.write() as s:
        found = await s.get(Blueprint, layer)
        if found is None:
            s.add(Blueprint(layer=layer, priority=priority, config=config, updated_at=time.time(),
                            updated_by="key:ops"))
        else:
            found.config, found.updated_at = config, time.time()


async def row(plane: ControlPlane, device_id: str) -> Device:
    async with plane.db.read() as s:
        return await s.get(Device, device_id)  # type: ignore[return-value]


async def entries(plane: ControlPlane, action: str) -> list[LedgerEntry]:
    async with plane.db.read() as s:
        return [e for e in await ledger.entries(s, limit=10_000) if e.action == action]


def signed_get(key: DeviceKey, device_id: str, ts: int | None = None, path: str = "/fleet/v1/device/desired"
               ) -> dict[str, str]:
    return {"authorization": key.authorization(device_id, "GET", path, b"", int(time.time()) if ts is None else ts)}


# -- enrolment -------------------------------------------------------------------------------------------------------
def test_enrolment_makes_a_device_from_a_token(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            secret = await token(f.plane, tags={"site": "lyon"})
            client = f.device()
            answer = await client.enrol(secret, name="pi-17", hardware=PROFILE, agent_version="0.1.0",
                                        tags={"site": "paris", "tier": "edge"})
            assert re.fullmatch(r"dev_[0-9a-f]{12}", answer.device_id) and client.device_id == answer.device_id
            assert answer.hardware_class == "cpu-x86_64" and answer.poll_interval_s == f.plane.poll_interval_s
            device = await row(f.plane, answer.device_id)
            assert device.name == "pi-17" and device.public_key == client.key.public_raw
            assert device.tags == {"site": "lyon", "tier": "edge"}  # the token's tags win
            assert device.hardware == PROFILE and device.agent_version == "0.1.0" and device.revoked_at is None
            async with f.plane.db.read() as s:
                used = (await s.execute(select(EnrolmentToken))).scalar_one()
            assert used.used_by == answer.device_id and used.used_at is not None
            [entry] = await entries(f.plane, "device.enrol")
            assert (entry.actor, entry.subject) == (f"device:{answer.device_id}", answer.device_id)
            assert entry.data["token"] == used.id and entry.data["hardware_class"] == "cpu-x86_64"
            async with f.plane.db.read() as s:
                assert (await ledger.verify(s)).ok

    run(scenario())


def test_a_token_works_once_unexpired_and_with_a_matching_proof(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            secret = await token(f.plane)
            # a proof made with another key than the one sent: refused, and the token is not spent
            key, other = DeviceKey.generate(), DeviceKey.generate()
            r = await f.raw.post("/fleet/v1/enrol", json={"token": secret, "public_key": key.public_b64,
                                                          "proof": other.prove(secret), "name": "x"})
            assert r.status_code == 401 and "proof" in r.json()["error"]
            await f.device(key).enrol(secret, name="first")
            with pytest.raises(Unauthenticated) as reused:
                await f.device().enrol(secret, name="second")
            assert str(reused.value) == TOKEN_REFUSED
            with pytest.raises(Unauthenticated, match="unknown, used or expired"):
                await f.device().enrol(await token(f.plane, expires_in=-1), name="late")
            with pytest.raises(Unauthenticated, match="unknown, used or expired"):
                await f.device().enrol("slmenrol_never-issued", name="guess")
            malformed = await f.raw.post("/fleet/v1/enrol", json={"token": secret, "public_key": "AAAA",
                                                                  "proof": "AAAA", "name": "x"})
            assert malformed.status_code == 400 and "public_key" in malformed.json()["error"]
            async with f.plane.db.read() as s:
                assert (await s.scalar(select(func.count()).select_from(Device))) == 1

    run(scenario())


def test_two_enrolments_racing_for_one_token_one_wins(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            secret = await token(f.plane)
            clients = [f.device() for _ in range(6)]
            results = await asyncio.gather(*(c.enrol(secret, name=f"d{i}") for i, c in enumerate(clients)),
                                           return_exceptions=True)
            won = [r for r in results if not isinstance(r, BaseException)]
            lost = [r for r in results if isinstance(r, BaseException)]
            assert len(won) == 1 and all(isinstance(x, Unauthenticated) for x in lost), results
            async with f.plane.db.read() as s:
                assert (await s.scalar(select(func.count()).select_from(Device))) == 1
            assert len(await entries(f.plane, "device.enrol")) == 1

    run(scenario())


# -- signed requests -------------------------------------------------------------------------------------------------
@BOTH_PATHS
def test_signed_polls_and_what_is_refused(fleet_db_url, fast):
    async def scenario() -> None:
        async with fleet(fleet_db_url, DeviceOptions(fast_path=fast)) as f:
            a, b = await f.enrolled(), await f.enrolled()
            state, etag = await a.desired()
            assert state is not None and state.device_id == a.device_id and state.version == 1 and etag
            assert state.release is None and state.config == {}

            ok = signed_get(a.key, a.device_id)
            assert (await f.raw.get("/fleet/v1/device/desired", headers=ok)).status_code == 200
            sig = ok["authorization"]
            flipped = sig[:-3] + ("A" if sig[-3] != "A" else "B") + sig[-2:]
            for headers in ({"authorization": flipped},  # tampered signature
                            signed_get(b.key, a.device_id),  # another device's key, a's id
                            signed_get(DeviceKey.generate(), a.device_id),  # a stranger's key
                            signed_get(a.key, a.device_id, path="/fleet/v1/device/reports"),  # another route's
                            {"authorization": "Bearer slm_0123456789ab_x"}, {}):
                r = await f.raw.get("/fleet/v1/device/desired", headers=headers)
                assert r.status_code == 401, (headers, r.text)
                assert "\n" not in r.json()["error"]
            unknown = await f.raw.get("/fleet/v1/device/desired", headers=signed_get(a.key, "dev_000000000000"))
            assert unknown.status_code == 401 and "not enrolled" in unknown.json()["error"]

            skewed = await f.raw.get("/fleet/v1/device/desired",
                                     headers=signed_get(a.key, a.device_id, ts=int(time.time()) - 3600))
            assert skewed.status_code == 401 and 'error="clock_skew"' in skewed.headers["www-authenticate"]
            offset = deviceauth.server_time_offset(skewed.headers[SERVER_TIME], time.time() - 3600)
            assert 3590 < offset < 3610 and abs(skewed.json()["server_time"] - time.time()) < 60
            assert "date" not in skewed.headers  # the HTTP server adds the one Date (test_fleet_replicas.py)

            # a device whose clock is an hour behind corrects itself from the Date and keeps the offset
            late = f.device(a.key, device_id=a.device_id, clock=lambda: time.time() - 3600)
            state, _ = await late.desired()
            assert state is not None and state.device_id == a.device_id and 3590 < late.offset < 3610

    run(scenario())


def test_a_revoked_device_is_refused_on_poll_and_report(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            a, b = await f.enrolled(), await f.enrolled()
            await a.desired()  # its key is cached now
            await a.report(ReportRequest(health="ok"))
            async with f.plane.db.write() as s:
                await s.execute(update(Device).where(Device.id == a.device_id).values(revoked_at=time.time()))

            async def refused() -> bool:
                try:
                    await a.desired()
                except Unauthenticated as err:
                    return "revoked" in str(err)
                return False

            await eventually(refused, "the revocation never reached the cached key")
            with pytest.raises(Unauthenticated, match="revoked"):
                await a.report(ReportRequest(health="ok"))
            state, _ = await b.desired()  # the others go on
            assert state is not None

    run(scenario())


# -- sessions --------------------------------------------------------------------------------------------------------
class Clock:
    """A clock a test moves: the control plane's and a device's, to cross a session's expiry without waiting."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def session_header(token: str) -> dict[str, str]:
    return {"authorization": f"{deviceauth.SESSION_SCHEME} {token}"}


def test_a_session_is_issued_only_to_a_signed_request(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            a = await f.enrolled()
            path = "/fleet/v1/device/session"

            def signed(key: DeviceKey, device_id: str, body: bytes = b"") -> dict[str, str]:
                return {"authorization": key.authorization(device_id, "POST", path, body, int(time.time()))}

            good = await f.raw.post(path, headers=signed(a.key, a.device_id))
            assert good.status_code == 200 and good.headers["cache-control"] == "no-store", good.text
            answer = good.json()
            assert answer["token"].startswith(a.device_id + ".")
            assert abs(answer["expires_at"] - (time.time() + deviceauth.DEFAULT_SESSION_S)) < 60
            sig = signed(a.key, a.device_id)["authorization"]
            for headers in ({},  # nothing
                            {"authorization": sig[:-3] + ("A" if sig[-3] != "A" else "B") + sig[-2:]},  # tampered
                            signed(DeviceKey.generate(), a.device_id),  # a stranger's key
                            session_header(answer["token"]),  # a session cannot renew itself
                            {"authorization": a.key.authorization(a.device_id, "POST", "/fleet/v1/device/reports",
                                                                  b"", int(time.time()))}):  # another route's
                r = await f.raw.post(path, headers=headers)
                assert r.status_code == 401 and "\n" not in r.json()["error"], (headers, r.text)
            skewed = await f.raw.post(path, headers={"authorization": a.key.authorization(
                a.device_id, "POST", path, b"", int(time.time()) - 3600)})
            assert skewed.status_code == 401 and SERVER_TIME in skewed.headers

            # the token it got works for polls and reports of that device
            polled = await f.raw.get("/fleet/v1/device/desired", headers=session_header(answer["token"]))
            assert polled.status_code == 200 and polled.json()["signed"]["device_id"] == a.device_id
            body = report("smol:1.0.0").model_dump_json().encode()
            sent = await f.raw.post("/fleet/v1/device/reports", content=body, headers=session_header(answer["token"]))
            assert sent.status_code == 202

    run(scenario())


@BOTH_PATHS
def test_forged_expired_altered_and_foreign_tokens_are_refused(fleet_db_url, fast, tmp_path):
    async def scenario() -> None:
        clock = Clock()
        async with fleet(fleet_db_url, DeviceOptions(fast_path=fast), clock=clock) as f:
            a, b = await f.enrolled(clock=clock), await f.enrolled(clock=clock)
            token = (await a.new_session()).token
            device_id, expires, epoch, mac = token.split(".")
            assert device_id == a.device_id and epoch == "1"
            other = deviceauth.mint_session(b"\x00" * 32, 1, a.device_id, int(expires))
            refused = {
                "forged": other,  # MACed with another secret
                "other device": f"{b.device_id}.{expires}.{epoch}.{mac}",  # a's MAC, b's id
                "longer life": f"{device_id}.{int(expires) + 3600}.{epoch}.{mac}",
                "unknown epoch": f"{device_id}.{expires}.2.{mac}",
                "altered MAC": f"{device_id}.{expires}.{epoch}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BA'}",
                "malformed": token + "x",
            }
            async with fleet(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}") as elsewhere:  # another control plane
                c = await elsewhere.enrolled()
                refused["another control plane"] = (await c.new_session()).token
            body = report(None).model_dump_json().encode()
            for what, bad in refused.items():
                for r in (await f.raw.get("/fleet/v1/device/desired", headers=session_header(bad)),
                          await f.raw.post("/fleet/v1/device/reports", content=body, headers=session_header(bad))):
                    assert r.status_code == 401 and "session" in r.json()["error"], (what, r.text)
            assert (await f.raw.get("/fleet/v1/device/desired", headers=session_header(token))).status_code == 200

            clock.now = int(expires) + 1  # the control plane's clock (and the device's) past the expiry
            late = await f.raw.get("/fleet/v1/device/desired", headers=session_header(token))
            assert late.status_code == 401 and "expired" in late.json()["error"]
            assert len(f.side.batcher) == 0  # nothing refused was queued

    run(scenario())


def test_a_revoked_device_is_refused_at_once_with_a_live_token(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            a = await f.enrolled()
            token = (await a.new_session()).token
            assert (await f.raw.get("/fleet/v1/device/desired", headers=session_header(token))).status_code == 200
            async with f.plane.db.write() as s:
                await s.execute(update(Device).where(Device.id == a.device_id).values(revoked_at=time.time()))
            await f.settled()  # the change feed dropped the cached key: the next request reads the row again
            r = await f.raw.get("/fleet/v1/device/desired", headers=session_header(token))
            assert r.status_code == 401 and "revoked" in r.json()["error"]
            with pytest.raises(Unauthenticated, match="revoked"):
                await a.new_session()

    run(scenario())


def test_the_client_prefers_a_session_renews_it_and_signs_when_refused(fleet_db_url):
    async def scenario() -> None:
        server, device = Clock(), Clock()
        async with fleet(fleet_db_url, DeviceOptions(session_s=100), clock=server) as f:
            a = await f.enrolled(clock=device)
            _, etag = await a.desired()
            for _ in range(5):
                assert await a.desired(etag) == (None, etag)
                await a.report(report(None))
            assert a.signed == 1 and a.session is not None  # one signed request: the session's
            first = a.session.token

            server.now += 81
            device.now += 81  # past 80% of its lifetime: renewed before it runs out
            assert await a.desired(etag) == (None, etag)
            assert a.signed == 2 and a.session.token != first

            # the device's clock falls 1000 s behind: its session, current by its clock, has expired by the control
            # plane's; refused, the request is signed instead (corrected for the skew), then a session taken again
            server.now += 1000
            assert await a.desired(etag) == (None, etag)
            assert a.signed == 4 and a.session is None and 990 < a.offset < 1010  # skewed, then signed again
            await a.report(report(None))
            assert a.signed == 5 and a.session is not None and a.session.expires_at > server.now

            signing = f.device(a.key, device_id=a.device_id, clock=server, sessions=False)  # every request signed
            for _ in range(3):
                await signing.desired(etag)
            assert signing.signed == 3 and signing.session is None

    run(scenario())


def test_replicas_share_the_session_secret(fleet_db_url):
    """Two control planes (replicas) on one database: the first to start made the secret, the other found it, so a
    token from one is good on the other."""
    async def scenario() -> None:
        async with fleet(fleet_db_url) as one, fleet(fleet_db_url) as two:
            a = await one.enrolled()
            token = (await a.new_session()).token
            r = await two.raw.get("/fleet/v1/device/desired", headers=session_header(token))
            assert r.status_code == 200 and r.json()["signed"]["device_id"] == a.device_id
            from slmops.fleet.control.models import ServerSecret
            async with one.plane.db.read() as s:
                rows = (await s.execute(select(ServerSecret).where(ServerSecret.purpose == "session"))).scalars().all()
            assert [(x.purpose, x.epoch, len(x.value)) for x in rows] == [("session", 1, 32)]
        async with fleet(fleet_db_url) as again:  # a restart keeps it: tokens outlive a restart
            r = await again.raw.get("/fleet/v1/device/desired", headers=session_header(token))
            assert r.status_code == 200

    run(scenario())


# -- the desired state -----------------------------------------------------------------------------------------------
@BOTH_PATHS
def test_an_unchanged_state_is_answered_304_without_the_database(fleet_db_url, fast):
    async def scenario() -> None:
        async with fleet(fleet_db_url, replace(QUIET, fast_path=fast)) as f:
            await publish(f.plane, "smol", "1.0.0", {"cpu": None})
            await set_layer(f.plane, "baseline", {"channel": "stable"})
            a = await f.enrolled()
            await f.settled()
            state, etag = await a.desired()
            assert state is not None and state.release is not None

            mine = asyncio.current_task()
            statements: list[str] = []

            def count(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
                if asyncio.current_task() is mine:  # what the polls below ask; change feeds poll on their own
                    statements.append(statement)

            event.listen(f.plane.db.engine.sync_engine, "before_cursor_execute", count)
            try:
                for _ in range(25):
                    again, tag = await a.desired(etag)
                    assert again is None and tag == etag
                assert statements == []
                assert (f.side.fast_answers >= 25) is fast  # the fast path answered them, or the routes did
                full, _ = await a.desired()  # without an ETag: the signed answer cached with the ETag
                assert full is not None and full.version == state.version and statements == []
                await set_layer(f.plane, "group:elsewhere", {"performance": {"keep_alive": "1m"}})  # a change ...
                await f.settled()
                statements.clear()
                again, tag = await a.desired(etag)  # control: ... drops the cache: recomputed (seen), still 304
                assert again is None and tag == etag and statements
            finally:
                event.remove(f.plane.db.engine.sync_engine, "before_cursor_execute", count)

            # the polls were noted in memory and are written with the next batch
            before = (await row(f.plane, a.device_id)).last_seen
            await f.side.batcher.flush()
            assert (await row(f.plane, a.device_id)).last_seen > before

    run(scenario())


def test_changes_move_the_desired_version_forward_only(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            a = await f.enrolled(tags={"site": "lyon"})
            first, etag = await a.desired()
            assert first is not None and first.version == 1 and first.release is None

            one = await publish(f.plane, "smol", "1.0.0", {"cuda": b"cuda-bundle", "cpu": b"cpu-bundle"})
            await set_layer(f.plane, "baseline", {"channel": "stable", "performance": {"keep_alive": "5m"}})
            await f.settled()
            state, etag2 = await a.desired(etag)
            assert state is not None and state.version == 2 and etag2 != etag
            assert state.release is not None and state.release.release == one and state.release.variant == "cpu"
            assert base64.b64decode(state.release.signature or "") == b"cpu-bundle"
            assert state.release.reference.endswith(state.release.manifest_digest)
            assert [g.prompt for g in state.release.golden] == ["2+2="]
            assert state.config["channel"] == "stable" and state.config["performance"]["keep_alive"] == "5m"
            assert (await row(f.plane, a.device_id)).desired_version == 2

            # a change that does not concern this device: recomputed, same state, same version, 304
            await set_layer(f.plane, "group:paris", {"performance": {"keep_alive": "1m"}})
            await f.settled()
            unchanged, tag = await a.desired(etag2)
            assert unchanged is None and tag == etag2

            versions = [2]
            two = await publish(f.plane, "smol", "2.0.0", {"cuda": None})  # nothing for a CPU device
            await f.settled()
            state, etag3 = await a.desired(etag2)
            assert state is not None and state.release is None and state.config["channel"] == "stable"
            versions.append(state.version)
            async with f.plane.db.write() as s:  # the channel back to 1.0.0: the same content as version 2 ...
                rel = (await s.execute(select(Release).where(Release.version == "1.0.0"))).scalar_one()
                await s.execute(update(Channel).values(release_id=rel.id))
            await f.settled()
            state, _ = await a.desired(etag3)
            assert state is not None and state.release is not None and state.release.release == one
            versions.append(state.version)  # ... under a new version: a device never sees one go back
            assert versions == [2, 3, 4] and two == "smol:2.0.0"

    run(scenario())


def test_desired_versions_move_in_batches(fleet_db_url):
    """Devices polling at once (after a wave is assigned, all of them within a poll interval) get their versions
    moved in a few shared transactions, not one each; a device asked for with two states in one burst gets
    them one batch apart, each with its own version."""
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            devices = [await f.enrolled() for _ in range(12)]
            await f.settled()
            before = f.side.advancer.batches
            states = await asyncio.gather(*(d.desired() for d in devices))
            assert all(state is not None and state.version == 1 for state, _ in states)
            assert 1 <= f.side.advancer.batches - before <= 3  # 12 devices, a transaction each before
            assert {(await row(f.plane, d.device_id)).desired_version for d in devices} == {1}

            one = devices[0].device_id
            first, second = await asyncio.gather(f.side.advancer.advance(one, "h" * 64),
                                                 f.side.advancer.advance(one, "i" * 64))
            assert (first, second) == (2, 3)
            assert await f.side.advancer.advance(one, "i" * 64) == 3  # the same state again: no step
    run(scenario())


# -- reports ---------------------------------------------------------------------------------------------------------
def window(i: int, **kw: Any) -> dict[str, Any]:
    return {"start": 1000.0 + 10 * i, "end": 1010.0 + 10 * i, "requests": 5, "errors": i % 2, "ttft_p95_ms": 80.5,
            **kw}


_WINDOWS = itertools.count()


def report(release: str | None, windows: int = 2, health: str = "ok", first: int | None = None,
           applied: int = 0) -> ReportRequest:
    """A report of ``windows`` windows, from window ``first`` on (by default ones no report used before)."""
    digest = None if release is None else "sha256:" + "ab" * 32
    start = next(_WINDOWS) * 100 if first is None else first
    return ReportRequest.model_validate({"running": {"release": release, "manifest_digest": digest},
                                         "health": health, "desired_version": applied,
                                         "windows": [window(start + i) for i in range(windows)]})


@BOTH_PATHS
def test_reports_are_written_in_batches_with_a_ledger_entry_per_change(fleet_db_url, fast):
    async def scenario() -> None:
        async with fleet(fleet_db_url, replace(QUIET, fast_path=fast)) as f:
            a, b = await f.enrolled(), await f.enrolled()
            commits: list[int] = []
            event.listen(f.plane.db.engine.sync_engine, "commit", lambda conn: commits.append(1))
            await asyncio.gather(*(c.report(report("smol:1.0.0")) for c in (a, b, a, b, a, b)))
            assert len(f.side.batcher) == 6
            done = await f.side.batcher.flush()
            assert len(commits) == 1 and (done.reports, done.rows, done.ledger) == (6, 12, 2)
            async with f.plane.db.read() as s:
                rows = (await s.execute(select(Report).order_by(Report.id))).scalars().all()
            assert len(rows) == 12 and {r.device_id for r in rows} == {a.device_id, b.device_id}
            assert all(r.release == "smol:1.0.0" and r.hardware_class == "cpu-x86_64" and r.requests == 5
                       for r in rows)
            device = await row(f.plane, a.device_id)
            assert (device.health, device.running_release, device.running_digest) == ("ok", "smol:1.0.0",
                                                                                    "sha256:" + "ab" * 32)
            changes = await entries(f.plane, "device.running")
            assert sorted((e.subject, e.data["from"], e.data["to"]) for e in changes) == sorted(
                [(a.device_id, None, "smol:1.0.0"), (b.device_id, None, "smol:1.0.0")])

            # the same release again: rows, no entry; then a move to another release: one entry
            await a.report(report("smol:1.0.0", health="degraded"))
            await a.report(report("smol:2.0.0", windows=0))
            await f.side.batcher.flush()
            changes = await entries(f.plane, "device.running")
            assert len(changes) == 3 and (changes[-1].data["from"], changes[-1].data["to"]) == ("smol:1.0.0",
                                                                                              "smol:2.0.0")
            assert (await row(f.plane, a.device_id)).running_release == "smol:2.0.0"
            async with f.plane.db.read() as s:
                assert (await s.scalar(select(func.count()).select_from(Report))) == 14
                assert (await ledger.verify(s)).ok

    run(scenario())


@BOTH_PATHS
def test_a_window_is_stored_once_and_the_applied_version_only_moves_forward(fleet_db_url, fast):
    async def scenario() -> None:
        async with fleet(fleet_db_url, replace(QUIET, fast_path=fast)) as f:
            a, b = await f.enrolled(), await f.enrolled()
            await a.report(report("smol:1.0.0", windows=3, first=0, applied=2))
            await a.report(report("smol:1.0.0", windows=3, first=1, applied=2))  # windows 1, 2 again, and 3
            await b.report(report("smol:1.0.0", windows=2, first=0))  # the same starts, another device
            assert (await f.side.batcher.flush()).rows == 6  # the batch itself: each window once

            # a replay of the very same signed request, within the skew window: accepted, not stored twice
            body = report("smol:1.0.0", windows=2, first=3, applied=3).model_dump_json().encode()
            headers = {"authorization": a.key.authorization(a.device_id, "POST", "/fleet/v1/device/reports", body,
                                                            int(time.time())), "content-type": "application/json"}
            for _ in range(2):
                assert (await f.raw.post("/fleet/v1/device/reports", content=body, headers=headers)).status_code == 202
                await f.side.batcher.flush()  # the second against the stored rows
            await a.report(report("smol:1.0.0", windows=1, first=0, applied=1))  # late: an older version applied
            await f.side.batcher.flush()
            async with f.plane.db.read() as s:
                rows = (await s.execute(select(Report.device_id, Report.window_start))).all()
            assert sorted(rows) == sorted([(a.device_id, 1000.0 + 10 * i) for i in range(5)] +
                                          [(b.device_id, 1000.0), (b.device_id, 1010.0)])
            assert (await row(f.plane, a.device_id)).applied_version == 3
            assert (await row(f.plane, b.device_id)).applied_version == 0

    run(scenario())


REPORT_BODIES = [
    b"{}", b'{"health": "ok", "desired_version": 7}',
    (b'{"running": {"release": "smol:1", "manifest_digest": "sha256:ab", "slot": "a"}, "windows": [{"start": 1, '
     b'"end": 2.5, "requests": 3, "errors": 0, "load_failures": 1, "oom": 0, "ttft_p50_ms": 1.5, "ttft_p95_ms": 2, '
     b'"itl_p50_ms": 0, "itl_p95_ms": 0.5, "tokens_per_s": 30, "golden_score": 1, "memory_bytes": 123456789}]}'),
    b'{"windows": [{"start": 1, "end": 2, "golden_score": 1.01}]}',
    b'{"windows": [{"start": 1, "end": 2, "requests": -1}]}',
    b'{"windows": [{"start": 1, "end": 2, "requests": 2147483648}]}',
    b'{"windows": [{"start": 1, "end": 2, "memory_bytes": 9223372036854775808}]}',
    b'{"windows": [{"start": 1e999, "end": 2}]}', b'{"windows": [{"start": NaN, "end": 2}]}',
    b'{"windows": [{"end": 2}]}', b'{"windows": [{"start": 1, "end": 2, "requests": 2.0}]}',
    b'{"windows": [{"start": 1, "end": 2, "requests": "2"}]}', b'{"windows": [{"start": 1, "end": 2, "x": 1}]}',
    b'{"desired_version": -1}', b'{"desired_version": 99999999999999999999}', b'{"desired_version": true}',
    b'{"health": "great"}', b'{"running": {"release": "' + b"x" * 161 + b'"}}',
    b'{"running": {"release": "' + b"x" * 160 + b'"}}', b'{"running": {"slot": 5}}', b'{"running": null}',
    b'{"windows": ' + json.dumps([{"start": i, "end": i + 1} for i in range(65)]).encode() + b"}",
    b'{"windows": ' + json.dumps([{"start": i, "end": i + 1} for i in range(64)]).encode() + b"}",
    b"[]", b"not json", b"", b'{"windows": null}', b'{"extra": 1}',
]


@pytest.mark.parametrize("body", REPORT_BODIES, ids=range(len(REPORT_BODIES)))
def test_the_fast_report_decoder_agrees_with_the_wire_type(body):
    """Reports are decoded with msgspec and, when it refuses, with pydantic: the result is what pydantic alone
    makes of the body (the same report, or the same refusal)."""
    try:
        expected: Any = ReportRequest.model_validate_json(body).model_dump()
    except ValueError:
        expected = None
    try:
        decoded = parse_report(body)
    except InvalidInput:
        assert expected is None
        return
    got = decoded.model_dump() if isinstance(decoded, ReportRequest) else msgspec.to_builtins(decoded)
    assert got == expected


def test_the_batcher_writes_on_its_own_and_at_shutdown(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            a = await f.enrolled()
            for _ in range(5):
                await a.report(report("smol:1.0.0", windows=1))

            async def landed() -> bool:
                async with f.plane.db.read() as s:
                    return (await s.scalar(select(func.count()).select_from(Report))) == 5

            await eventually(landed, "the batcher did not write the queued reports")
        async with fleet(fleet_db_url, QUIET) as f:  # stopped with reports still queued: written on the way out
            a = await f.enrolled()
            await a.report(report("smol:1.0.0", windows=3))
            assert len(f.side.batcher) == 1
        db = Database(fleet_db_url)
        try:
            async with db.read() as s:
                assert (await s.scalar(select(func.count()).select_from(Report))) == 8
        finally:
            await db.close()

    run(scenario())


@BOTH_PATHS
def test_a_full_queue_answers_503_and_bad_reports_400(fleet_db_url, fast):
    async def scenario() -> None:
        async with fleet(fleet_db_url, DeviceOptions(flush_interval_s=3600, queue_limit=2, fast_path=fast)) as f:
            a = await f.enrolled()
            await a.report(report(None))
            await a.report(report(None))
            body = report(None).model_dump_json().encode()
            headers = {"authorization": a.key.authorization(a.device_id, "POST", "/fleet/v1/device/reports", body,
                                                            int(time.time())), "content-type": "application/json"}
            full = await f.raw.post("/fleet/v1/device/reports", content=body, headers=headers)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            with pytest.raises(Busy, match="queue is full"):
                await a.report(report(None))
            await f.side.batcher.flush()
            await a.report(report(None))  # room again

            for bad, says in ((b'{"health": "great"}', "health"), (b"not json", "invalid JSON"),
                              (b'{"running": {"release": "' + b"x" * 200 + b'"}}', "running.release"),
                              (b'{"surprise": 1}', "surprise")):
                headers = {"authorization": a.key.authorization(a.device_id, "POST", "/fleet/v1/device/reports",
                                                                bad, int(time.time()))}
                r = await f.raw.post("/fleet/v1/device/reports", content=bad, headers=headers)
                assert r.status_code == 400 and says in r.json()["error"], r.text
            unsigned = await f.raw.post("/fleet/v1/device/reports", content=b"{}")
            assert unsigned.status_code == 401
            huge = b'{"windows": [' + b" " * (300 * 1024) + b"]}"
            r = await f.raw.post("/fleet/v1/device/reports", content=huge, headers={
                "authorization": a.key.authorization(a.device_id, "POST", "/fleet/v1/device/reports", huge,
                                                     int(time.time()))})
            assert r.status_code == 413 and "KiB" in r.json()["error"]

    run(scenario())


# -- the clients' one error table ------------------------------------------------------------------------------------
def test_answers_map_to_the_error_tree_with_the_servers_message():
    from slmops.client import errors
    from slmops.types import errors as e

    def answer(status: int, body: bytes = b'{"error": "what to do"}', **headers: str) -> httpx.Response:
        return httpx.Response(status, content=body, headers=headers)

    for status, cls in ((400, e.InvalidInput), (401, e.Unauthenticated), (403, e.Forbidden), (404, e.NotFound),
                        (409, e.Conflict), (413, e.TooLarge), (503, e.Busy)):
        err = errors.error_for(answer(status), "http://cp")
        assert type(err) is cls and str(err) == "what to do", status
    limited = errors.error_for(answer(429, **{"retry-after": "7"}), "http://cp")
    assert isinstance(limited, e.RateLimited) and str(limited) == "what to do"
    for status in (500, 502, 418):
        err = errors.error_for(answer(status, b"<html>oops</html>"), "http://cp")
        assert type(err) is e.SourceError
        assert str(err) == f"control plane at http://cp answered {status}: <html>oops</html>"
    assert str(errors.error_for(answer(404, b""), "http://cp")) == "Not Found"  # no body: the reason phrase
    ok = answer(200)
    assert errors.checked(ok, "http://cp") is ok
    with pytest.raises(e.Forbidden, match="what to do"):
        errors.checked(answer(403), "http://cp")


# -- the batcher on its own (a real SQLite database) ----------------------------------------------------------------
async def _devices_db(tmp_path: Any, n: int = 3) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'batch.db'}")
    await db.migrate()
    async with db.write() as s:
        for i in range(n):
            s.add(Device(id=f"dev_{i:012x}", name=f"d{i}", public_key=bytes(32), hardware_class="cpu-x86_64",
                         enrolled_at=1.0, last_seen=1.0))
    return db


async def _count(db: Database) -> int:
    async with db.read() as s:
        return (await s.scalar(select(func.count()).select_from(Report))) or 0


def test_the_batcher_writes_last_seen_times_when_due(tmp_path):
    async def scenario() -> None:
        db = await _devices_db(tmp_path)
        try:
            batcher = ReportBatcher(db, seen_interval=3600)
            batcher.seen("dev_000000000000", 50.0)
            batcher.seen("dev_000000000000", 40.0)  # an older time never wins
            assert await batcher.flush(everything=False) == Flushed(0, 0, 0)  # not due: nothing written
            assert batcher.offer("dev_000000000001", 60.0, report("smol:1", windows=1))
            done = await batcher.flush(everything=False)
            assert (done.reports, done.rows, done.seen) == (1, 1, 0)
            assert (await batcher.flush()).seen == 2
            async with db.read() as s:
                seen = dict((await s.execute(select(Device.id, Device.last_seen))).all())
            assert seen == {"dev_000000000000": 50.0, "dev_000000000001": 60.0, "dev_000000000002": 1.0}
        finally:
            await db.close()

    run(scenario())


def test_the_batcher_keeps_what_it_could_not_write(tmp_path):
    async def scenario() -> None:
        db = await _devices_db(tmp_path)
        try:
            batcher = ReportBatcher(db)
            for i in range(3):
                batcher.offer(f"dev_{i:012x}", 10.0 + i, report("smol:1", windows=2))
            async with db.engine.begin() as conn:  # the table is away: the write fails and is rolled back
                await conn.exec_driver_sql("ALTER TABLE reports RENAME TO reports_away")
            assert await batcher.flush() == Flushed(0, 0, 0) and len(batcher) == 3
            async with db.engine.begin() as conn:
                await conn.exec_driver_sql("ALTER TABLE reports_away RENAME TO reports")
            assert (await batcher.flush()).rows == 6 and await _count(db) == 6

            # a write cancelled while it waits for the database (shutdown) is queued again, not lost
            batcher.offer("dev_000000000000", 20.0, report("smol:1", windows=1))
            holding, release = asyncio.Event(), asyncio.Event()

            async def hold_the_writer() -> None:
                async with db.write(bump=False):
                    holding.set()
                    await release.wait()

            holder = asyncio.create_task(hold_the_writer())
            await holding.wait()
            flushing = asyncio.create_task(batcher.flush())
            await asyncio.sleep(0.05)
            flushing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await flushing
            release.set()
            await holder
            assert len(batcher) == 1 and (await batcher.flush()).rows == 1 and await _count(db) == 7
            async with db.read() as s:
                assert len([e for e in await ledger.entries(s) if e.action == "device.running"]) == 3
        finally:
            await db.close()

    run(scenario())
