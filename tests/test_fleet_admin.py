"""The operators' side of the control plane, in process (the real app, its lifespan and change feed) on SQLite and
on a real PostgreSQL 15: keys and roles, enrolment tokens, devices and their filters, groups, blueprint layers and
the effective config with provenance, revocation, and a ledger entry for every change."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
from fleet_app import BASE_URL, eventually, run, serving
from fleet_db import fleet_db_url, postgres  # noqa: F401
from sqlalchemy import func, select

from slmops.fleet.control import membership, operators
from slmops.fleet.control.app import ControlPlane
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import Blueprint, Device, EnrolmentToken, Group, LedgerEntry

NOW = 1_750_000_000.0
V1 = "/fleet/v1"


@dataclass
class Fleet:
    transport: httpx.ASGITransport
    plane: ControlPlane
    keys: dict[str, str]  # role -> key
    clients: list[httpx.AsyncClient]

    def as_(self, role: str | None = None, key: str | None = None) -> httpx.AsyncClient:
        """A client sending the key of ``role`` (or ``key``; neither: no key at all)."""
        key = key or (self.keys[role] if role else None)
        c = httpx.AsyncClient(transport=self.transport, base_url=BASE_URL,
                              headers={"Authorization": f"Bearer {key}"} if key else {})
        self.clients.append(c)
        return c

    @property
    def db(self) -> Database:
        return self.plane.db


@contextlib.asynccontextmanager
async def fleet(url: str, keys: bool = True) -> AsyncIterator[Fleet]:
    """One replica of the control plane over ``url``, started as a server starts it, with a key per role."""
    plane = ControlPlane(Database(url), clock=lambda: NOW)
    async with serving(plane) as transport:
        made = {}
        if keys:
            for role in ("admin", "operator", "viewer"):
                made[role] = await operators.create_key(plane.db, role, role, "host:test", now=NOW)
        f = Fleet(transport, plane, made, [])
        try:
            yield f
        finally:
            for c in f.clients:
                await c.aclose()


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json() if r.content else None


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    return body["error"]


def device(device_id: str, **kw: Any) -> Device:
    fields: dict[str, Any] = dict(name=device_id.removeprefix("dev_"), public_key=b"\x01" * 32, hardware={},
                                  hardware_class="cpu-x86_64", agent_version="1.0", tags={}, enrolled_at=NOW - 86400,
                                  last_seen=NOW - 60, health="ok")
    fields.update(kw)
    return Device(id=device_id, **fields)


async def add_devices(db: Database, *devices: Device) -> None:
    async with db.write() as s:
        s.add_all(devices)


async def ledger_rows(db: Database) -> list[LedgerEntry]:
    async with db.read() as s:
        return list((await s.execute(select(LedgerEntry).order_by(LedgerEntry.seq))).scalars())


async def count(db: Database, model: Any) -> int:
    async with db.read() as s:
        return int((await s.execute(select(func.count()).select_from(model))).scalar_one())


# -- keys and roles ---------------------------------------------------------------------------------------------

def test_keys_and_roles(fleet_db_url: str) -> None:
    async def go() -> None:
        async with fleet(fleet_db_url) as f:
            nobody, view, ops, adm = f.as_(), f.as_("viewer"), f.as_("operator"), f.as_("admin")
            assert "slmops fleet keys create" in error(await nobody.get(f"{V1}/devices"), 401)
            assert (await nobody.get(f"{V1}/devices")).headers["www-authenticate"] == "Bearer"
            error(await f.as_(key="slm_000000000000_" + "A" * 43).get(f"{V1}/devices"), 401)  # unknown id
            forged = f.keys["viewer"][:-4] + "AAAA"  # right id, wrong secret
            error(await f.as_(key=forged).get(f"{V1}/devices"), 401)
            sig = await f.as_().get(f"{V1}/devices", headers={"Authorization": "Slmops-Device id=\"x\""})
            error(sig, 401)  # a device's signature is not an operator key

            assert ok(await view.get(f"{V1}/devices")) == {"devices": [], "next": None}
            msg = error(await view.post(f"{V1}/tokens", json={}), 403)
            assert msg == "role viewer cannot create token; needs operator"
            assert "needs admin" in error(await ops.post(f"{V1}/keys", json={"name": "x", "role": "viewer"}), 403)
            assert "needs admin" in error(await ops.get(f"{V1}/keys"), 403)

            made = ok(await adm.post(f"{V1}/keys", json={"name": "ci", "role": "operator"}), 201)
            assert made["key"].startswith("slm_") and made["role"] == "operator"
            listed = ok(await adm.get(f"{V1}/keys"))
            assert [k["name"] for k in listed] == ["admin", "ci", "operator", "viewer"]  # by time, then name
            assert all(k["key"] is None for k in listed)
            ci = f.as_(key=made["key"])
            assert ok(await ci.put(f"{V1}/groups/edge", json={"selector": {"tier": "edge"}}))["name"] == "edge"
            error(await adm.post(f"{V1}/keys", json={"name": "ci", "role": "viewer"}), 409)  # names never reused
            error(await adm.post(f"{V1}/keys", json={"name": "no way", "role": "viewer"}), 400)
            error(await adm.post(f"{V1}/keys", json={"name": "x", "role": "root"}), 400)

            revoked = ok(await adm.delete(f"{V1}/keys/ci"))
            assert revoked["revoked"] is True
            error(await ci.get(f"{V1}/groups"), 401)  # at once on this replica
            error(await adm.delete(f"{V1}/keys/nobody"), 404)

            rows = await ledger_rows(f.db)
            assert [(r.actor, r.action, r.subject) for r in rows[3:]] == [
                ("key:admin", "key.create", "key:ci"), ("key:ci", "group.put", "group:edge"),
                ("key:admin", "key.revoke", "key:ci")]
            assert made["key"] not in json.dumps([r.data for r in rows])
    run(go())


def test_a_revoked_key_stops_working_on_every_replica(fleet_db_url: str) -> None:
    """Two replicas over one database, each with the key cached; revoked on one (and on the host, directly in the
    database, as `slmops fleet keys revoke` does), refused by both once the change feed runs."""
    async def go() -> None:
        async with fleet(fleet_db_url) as a, fleet(fleet_db_url, keys=False) as b:
            a.keys = b.keys = {**a.keys, "second": await operators.create_key(a.db, "second", "viewer", "host:t")}
            for f in (a, b):  # fill both caches
                for role in ("viewer", "second"):
                    ok(await f.as_(role).get(f"{V1}/groups"))
            ok(await a.as_("admin").delete(f"{V1}/keys/viewer"))
            await operators.revoke_key(b.db, "second", "host:test")  # b's own database handle: like the CLI

            async def refused(f: Fleet, role: str) -> bool:
                return (await f.as_(role).get(f"{V1}/groups")).status_code == 401
            for f in (a, b):
                for role in ("viewer", "second"):
                    await eventually(lambda f=f, role=role: refused(f, role), f"{role} still accepted")
            ok(await b.as_("operator").get(f"{V1}/groups"))  # the others still work
    run(go())


# -- enrolment tokens -------------------------------------------------------------------------------------------

def test_tokens_show_their_secret_once(fleet_db_url: str) -> None:
    async def go() -> None:
        async with fleet(fleet_db_url) as f:
            ops = f.as_("operator")
            made = ok(await ops.post(f"{V1}/tokens", json={"expires_in": "2d12h", "tags": {"site": "lyon"}}), 201)
            assert made["expires_at"] == NOW + 2.5 * 86400
            async with f.db.read() as s:
                row = await s.get(EnrolmentToken, made["id"])
            assert row.token_hash == hashlib.sha256(made["token"].encode()).hexdigest()
            assert row.tags == {"site": "lyon"} and row.created_by == "key:operator"

            listed = (await f.as_("viewer").get(f"{V1}/tokens"))
            assert made["token"] not in listed.text and made["token"].split("_", 1)[1] not in listed.text
            assert [(t["id"], t["tags"], t["used_by"]) for t in listed.json()] == [(made["id"], {"site": "lyon"},
                                                                                    None)]
            before = len(await ledger_rows(f.db))
            for bad in ("30s", "31d", "soon", "-1h", "nan"):
                assert "expires_in" in error(await ops.post(f"{V1}/tokens", json={"expires_in": bad}), 400)
            error(await ops.post(f"{V1}/tokens", json={"tags": {"Bad Key": "x"}}), 400)
            error(await ops.post(f"{V1}/tokens", json={"expires": "1h"}), 400)  # unknown field
            assert await count(f.db, EnrolmentToken) == 1 and len(await ledger_rows(f.db)) == before

            error(await f.as_("viewer").delete(f"{V1}/tokens/{made['id']}"), 403)
            ok(await ops.delete(f"{V1}/tokens/{made['id']}"), 204)
            error(await ops.delete(f"{V1}/tokens/{made['id']}"), 404)
            assert ok(await ops.get(f"{V1}/tokens")) == []
            rows = await ledger_rows(f.db)
            assert [(r.action, r.subject) for r in rows[3:]] == [("token.create", f"token:{made['id']}"),
                                                                 ("token.delete", f"token:{made['id']}")]
            assert made["token"] not in json.dumps([r.data for r in rows])
    run(go())


# -- devices ----------------------------------------------------------------------------------------------------

def test_device_filters_and_pages(fleet_db_url: str) -> None:
    async def go() -> None:
        async with fleet(fleet_db_url) as f:
            await add_devices(
                f.db,
                device("dev_000000000001", tags={"site": "lyon", "tier": "edge"}, running_release="chat:1.0"),
                device("dev_000000000002", tags={"site": "lyon"}, hardware_class="cuda-x86_64",
                       running_release="chat:1.1", health="degraded"),
                device("dev_000000000003", tags={"site": "paris", "tier": "edge"}, last_seen=NOW - 7200,
                       running_release="chat_x:1.0"),
                device("dev_000000000004", tags={"site": "lyon", "tier": "edge"}, revoked_at=NOW - 10,
                       health="failing"),
                device("dev_000000000005", tags={"tier": "edge"}, hardware_class="cpu-aarch64", health="unknown"))
            view = f.as_("viewer")
            ok(await f.as_("operator").put(f"{V1}/groups/lyon-edge",
                                           json={"selector": {"site": "lyon", "tier": "edge"}}))

            async def ids(**params: Any) -> list[str]:
                page = ok(await view.get(f"{V1}/devices", params=params))
                return [d["id"][-1] for d in page["devices"]]
            assert await ids() == ["1", "2", "3", "4", "5"]
            assert await ids(group="lyon-edge") == ["1", "4"]
            assert await ids(group="lyon-edge", revoked="false") == ["1"]
            assert await ids(revoked="true") == ["4"]
            assert await ids(hardware_class="cuda-x86_64") == ["2"]
            assert await ids(release="chat:1.0") == ["1"]
            assert await ids(release="chat") == ["1", "2"]  # any version; not chat_x
            assert await ids(health="degraded") == ["2"]
            assert await ids(seen_within="1h") == ["1", "2", "4", "5"]
            assert await ids(seen_within="3h", hardware_class="cpu-x86_64", revoked="false") == ["1", "3"]

            pages, after = [], None
            while True:
                page = ok(await view.get(f"{V1}/devices", params={"limit": 2, **({"after": after} if after else {})}))
                pages.append([d["id"][-1] for d in page["devices"]])
                after = page["next"]
                if after is None:
                    break
            assert pages == [["1", "2"], ["3", "4"], ["5"]]

            one = ok(await view.get(f"{V1}/devices/dev_000000000001"))
            assert one["groups"] == ["lyon-edge"] and one["tags"] == {"site": "lyon", "tier": "edge"}
            assert "slmops fleet devices" in error(await view.get(f"{V1}/devices/dev_nothere"), 404)
            error(await view.get(f"{V1}/devices", params={"group": "nope"}), 404)
            for bad in ({"health": "great"}, {"limit": 0}, {"limit": 5000}, {"seen_within": "lately"}):
                error(await view.get(f"{V1}/devices", params=bad), 400)
    run(go())


def test_groups_follow_tags(fleet_db_url: str) -> None:
    async def go() -> None:
        async with fleet(fleet_db_url) as f:
            await add_devices(f.db, device("dev_00000000000a", tags={"site": "lyon"},
                                           hardware={"cpu": {"architecture": "x86_64"}}))
            ops, view = f.as_("operator"), f.as_("viewer")
            assert ok(await ops.put(f"{V1}/groups/edge", json={"selector": {"tier": "edge"}}))["devices"] == 0
            assert ok(await ops.put(f"{V1}/groups/lyon", json={"selector": {"site": "lyon"}}))["devices"] == 1
            error(await view.put(f"{V1}/groups/x", json={"selector": {}}), 403)
            error(await ops.put(f"{V1}/groups/Not_OK", json={"selector": {}}), 400)

            tagged = ok(await ops.patch(f"{V1}/devices/dev_00000000000a/tags",
                                        json={"tags": {"tier": "edge", "class": "npu-x86_64"}}))
            assert tagged["groups"] == ["edge", "lyon"] and tagged["hardware_class"] == "npu-x86_64"
            assert [g["devices"] for g in ok(await view.get(f"{V1}/groups"))] == [1, 1]
            untagged = ok(await ops.patch(f"{V1}/devices/dev_00000000000a/tags",
                                          json={"tags": {"site": None, "class": None}}))
            assert untagged["groups"] == ["edge"] and untagged["tags"] == {"tier": "edge"}
            assert untagged["hardware_class"] == "cpu-x86_64"  # from the profile again
            error(await ops.patch(f"{V1}/devices/dev_00000000000a/tags", json={"tags": {"BAD KEY": "x"}}), 400)
            assert ok(await view.get(f"{V1}/devices/dev_00000000000a"))["tags"] == {"tier": "edge"}

            # the selector moves: membership is computed, nothing to keep in step
            assert ok(await ops.put(f"{V1}/groups/lyon", json={"selector": {"tier": "edge"}}))["devices"] == 1
            ok(await ops.put(f"{V1}/blueprints/group:lyon", json={"config": {"channel": "stable"}}))
            assert "blueprints rm group:lyon" in error(await ops.delete(f"{V1}/groups/lyon"), 409)
            ok(await ops.delete(f"{V1}/blueprints/group:lyon"), 204)
            ok(await ops.delete(f"{V1}/groups/lyon"), 204)
            error(await view.get(f"{V1}/groups/lyon"), 404)

            rows = await ledger_rows(f.db)
            assert [(r.actor, r.action, r.subject) for r in rows[3:]] == [
                ("key:operator", "group.put", "group:edge"), ("key:operator", "group.put", "group:lyon"),
                ("key:operator", "device.tag", "device:dev_00000000000a"),
                ("key:operator", "device.tag", "device:dev_00000000000a"),
                ("key:operator", "group.put", "group:lyon"), ("key:operator", "blueprint.put", "blueprint:group:lyon"),
                ("key:operator", "blueprint.delete", "blueprint:group:lyon"),
                ("key:operator", "group.delete", "group:lyon")]
            assert rows[5].data == {"set": {"tier": "edge", "class": "npu-x86_64"}, "removed": []}
            assert rows[6].data == {"set": {}, "removed": ["class", "site"]}
    run(go())


def test_membership_is_pure() -> None:
    groups = [Group(name="b", selector={"site": "lyon"}), Group(name="a", selector={"site": "lyon", "tier": "x"}),
              Group(name="all", selector={})]
    assert membership.groups_of({"site": "lyon", "tier": "x", "more": "1"}, groups) == ["a", "all", "b"]
    assert membership.groups_of({"site": "paris"}, groups) == ["all"]
    assert membership.groups_of({}, groups[:2]) == []


# -- blueprints and the effective config ------------------------------------------------------------------------

def test_blueprints_and_effective_config(fleet_db_url: str) -> None:
    async def go() -> None:
        async with fleet(fleet_db_url) as f:
            await add_devices(f.db, device("dev_0000000000b1", tags={"site": "lyon", "tier": "edge"}),
                              device("dev_0000000000b2", tags={"site": "paris"}))
            ops, view = f.as_("operator"), f.as_("viewer")
            for name, sel in (("lyon", {"site": "lyon"}), ("edge", {"tier": "edge"})):
                ok(await ops.put(f"{V1}/groups/{name}", json={"selector": sel}))
            layers = {
                "baseline": (0, {"channel": "stable", "performance": {"parallel_requests": 2, "keep_alive": "5m"},
                                 "optimization": {"max_context": 2048}}),
                "group:lyon": (10, {"performance": {"parallel_requests": 4}, "optimization": {"quantization": "Q8_0"}}),
                "group:edge": (5, {"performance": {"parallel_requests": 3, "kv_cache_type": "q8_0"},
                                   "channel": "canary"}),
                "device:dev_0000000000b1": (0, {"optimization": {"max_context": 1024}}),
            }
            for layer, (prio, config) in layers.items():
                stored = ok(await ops.put(f"{V1}/blueprints/{layer}", json={"priority": prio, "config": config}))
                assert stored["updated_by"] == "key:operator"
            assert ok(await view.get(f"{V1}/blueprints/group:lyon"))["config"]["optimization"] == \
                {"quantization": "q8_0"}  # normalised as a deployment config reads it
            assert [b["layer"] for b in ok(await view.get(f"{V1}/blueprints"))] == \
                ["baseline", "group:edge", "group:lyon", "device:dev_0000000000b1"]

            eff = ok(await view.get(f"{V1}/devices/dev_0000000000b1/config"))
            assert eff["config"] == {"channel": "canary", "performance": {"parallel_requests": 4, "keep_alive": "5m",
                                                                        "kv_cache_type": "q8_0"},
                                     "optimization": {"max_context": 1024, "quantization": "q8_0"}}
            assert eff["sources"] == {"channel": "group:edge", "performance.parallel_requests": "group:lyon",
                                      "performance.keep_alive": "baseline", "performance.kv_cache_type": "group:edge",
                                      "optimization.max_context": "device:dev_0000000000b1",
                                      "optimization.quantization": "group:lyon"}
            other = ok(await view.get(f"{V1}/devices/dev_0000000000b2/config"))
            assert set(other["sources"].values()) == {"baseline"}

            # a type error: refused with its key path, nothing written, no ledger entry, no change version
            async with f.db.read() as s:
                before = [(b.layer, b.priority, b.config) for b in (await s.execute(select(Blueprint))).scalars()]
            entries, version = len(await ledger_rows(f.db)), await f.db.change_version()
            bad = {"priority": 1, "config": {"performance": {"parallel_requests": "many"}, "channel": "stable"}}
            msg = error(await ops.put(f"{V1}/blueprints/group:lyon", json=bad), 400)
            assert msg.startswith("group:lyon: performance.parallel_requests") and "many" in msg
            assert "unknown key perfomance" in error(await ops.put(
                f"{V1}/blueprints/baseline", json={"config": {"perfomance": {}}}), 400)
            assert "priority" in error(await ops.put(f"{V1}/blueprints/baseline",
                                                     json={"priority": 3, "config": {}}), 400)
            error(await ops.put(f"{V1}/blueprints/group:nope", json={"config": {}}), 404)
            error(await ops.put(f"{V1}/blueprints/device:dev_nope", json={"config": {}}), 404)
            error(await ops.put(f"{V1}/blueprints/site:lyon", json={"config": {}}), 400)
            error(await view.put(f"{V1}/blueprints/baseline", json={"config": {}}), 403)
            async with f.db.read() as s:
                after = [(b.layer, b.priority, b.config) for b in (await s.execute(select(Blueprint))).scalars()]
            assert after == before
            assert len(await ledger_rows(f.db)) == entries and await f.db.change_version() == version

            ok(await ops.delete(f"{V1}/blueprints/device:dev_0000000000b1"), 204)
            error(await ops.delete(f"{V1}/blueprints/device:dev_0000000000b1"), 404)
            eff = ok(await view.get(f"{V1}/devices/dev_0000000000b1/config"))
            assert eff["sources"]["optimization.max_context"] == "baseline"
            rows = await ledger_rows(f.db)
            put = [r for r in rows if r.action == "blueprint.put"]
            assert [r.subject for r in put] == [f"blueprint:{layer}" for layer in layers]
            assert put[0].data == {"priority": 0, "config": layers["baseline"][1]}
            assert rows[-1].action == "blueprint.delete"
    run(go())


# -- revocation and the ledger ----------------------------------------------------------------------------------

def test_revoking_a_device_and_the_ledger(fleet_db_url: str) -> None:
    async def go() -> None:
        async with fleet(fleet_db_url) as f:
            await add_devices(f.db, device("dev_0000000000c1"))
            ops, adm, view = f.as_("operator"), f.as_("admin"), f.as_("viewer")
            assert "needs admin" in error(await ops.post(f"{V1}/devices/dev_0000000000c1/revoke"), 403)
            version = await f.db.change_version()
            gone = ok(await adm.post(f"{V1}/devices/dev_0000000000c1/revoke"))
            assert gone["revoked"] is True and await f.db.change_version() > version
            async with f.db.read() as s:
                assert (await s.get(Device, "dev_0000000000c1")).revoked_at == NOW
            ok(await adm.post(f"{V1}/devices/dev_0000000000c1/revoke"))  # again: no second entry
            error(await adm.post(f"{V1}/devices/dev_nope/revoke"), 404)

            entries = ok(await view.get(f"{V1}/ledger"))
            assert [(e["seq"], e["actor"], e["action"], e["subject"]) for e in entries] == [
                (1, "host:test", "key.create", "key:admin"), (2, "host:test", "key.create", "key:operator"),
                (3, "host:test", "key.create", "key:viewer"),
                (4, "key:admin", "device.revoke", "device:dev_0000000000c1")]
            assert [e["seq"] for e in ok(await view.get(f"{V1}/ledger", params={"after": 1, "limit": 2}))] == [2, 3]
            assert [e["seq"] for e in ok(await view.get(f"{V1}/ledger",
                                                        params={"subject": "key:viewer"}))] == [3]
            assert entries[3]["prev"] == entries[2]["hash"]
            assert ok(await view.get(f"{V1}/ledger/verify")) == {"ok": True, "entries": 4, "problem": None}
            error(await f.as_().get(f"{V1}/ledger/verify"), 401)
            assert all(f.keys[r] not in json.dumps(entries) for r in f.keys)

            async with f.db.write(bump=False) as s:  # tamper: the route reports it, with the entry
                row = await s.get(LedgerEntry, 4)
                row.actor = "key:viewer"
            verdict = ok(await view.get(f"{V1}/ledger/verify"))
            assert verdict["ok"] is False and verdict["problem"].startswith("ledger entry 4")
    run(go())
