"""Signed desired state, TUF-style: the envelope (``slmops.fleet.metadata``), the device's trust store
(``slmops.fleet.agent.trust``) and the control plane's keys (``slmops.fleet.control.trust``).

Units first (no database): a sealed document opens with the root that names its key, and every way a document can
be wrong is refused with its reason while the store's highest version stays where it was. Then through the real
app on SQLite and PostgreSQL: a device enrols, keeps the root it is given and verifies what it polls; the freshness
attacks (an expired document by the device's clock, a replayed older version, another control plane's key, another
device's document, an altered one) are refused; a document near its expiry is re-issued under a new version, by any
replica; replicas on one database sign with the same keys; the root key file is made once, 0600, and a wrong one
stops a replica. Last, the CLI: `slmops fleet serve` makes the root key, `slmops agent enrol` keeps root.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_app import BASE_URL, eventually, run, serving
from fleet_db import fleet_db_url, postgres  # noqa: F401
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey
from sqlalchemy import select

from conftest import BIN, free_port
from procs import ServerProcess
from slmops.client import DeviceClient
from slmops.fleet import metadata
from slmops.fleet.agent.trust import Refused, TrustStore
from slmops.fleet.control import trust
from slmops.fleet.control.app import ControlPlane
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import Blueprint, Channel, Device, EnrolmentToken, Release, ServerSecret, Variant
from slmops.fleet.control.routes_admin import token_hash
from slmops.fleet.control.routes_device import STATE, DeviceSide
from slmops.fleet.deviceauth import DeviceKey
from slmops.types.errors import ConfigError

NOW = 1_760_000_000
DEVICE = "dev_0123456789ab"
PROFILE = {"cpu": {"architecture": "x86_64"}, "gpus": []}


# -- units: the envelope and the trust store ---------------------------------------------------------------------------
@dataclass
class Keys:
    root: CryptoSigner
    targets: CryptoSigner
    root_json: dict[str, Any]


def keys() -> Keys:
    root, targets = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    return Keys(root, targets, metadata.make_root(root, [targets.public_key]))


def document(version: int = 1, device_id: str = DEVICE, **extra: Any) -> dict[str, Any]:
    return {"device_id": device_id, "version": version, "issued_at": NOW, "config": {"channel": "stable"},
            "release": {"release": "smol:1.0.0", "variant": "cpu", "reference": "reg.example/smol@sha256:" + "a" * 64,
                        "manifest_digest": "sha256:" + "a" * 64, "signature": None,
                        "golden": [{"prompt": "2+2=\nanswer:", "expect": "4", "expect_regex": None, "max_tokens": 8}]},
            **extra}


def sealed(k: Keys, version: int = 1, expires: float = NOW + 3600, **kw: Any) -> bytes:
    return metadata.seal(k.targets, document(version, **kw), expires)


def test_a_sealed_document_opens_with_the_root_that_names_its_key():
    k = keys()
    data = metadata.seal(k.targets, document(3, config={"performance": {"keep_alive": 1.5, "parallel": 2.0}}),
                         NOW + 60.0)
    wire = json.loads(data)
    signed = metadata.open_envelope(metadata.load_root(k.root_json), data)
    assert signed == wire["signed"] and signed["_type"] == "slmops-desired" and signed["spec_version"] == "1.0"
    assert signed["expires"] == NOW + 60 and signed["issued_at"] == NOW  # whole seconds: canonical JSON has no floats
    assert signed["config"]["performance"] == {"keep_alive": "1.5", "parallel": 2}
    # what TUF tooling would check: the key as root.json lists it, over the OLPC canonical JSON of `signed`
    [sig] = wire["signatures"]
    key = SSlibKey.from_dict(sig["keyid"], dict(k.root_json["signed"]["keys"][sig["keyid"]]))
    key.verify_signature(Signature.from_dict(dict(sig)), encode_canonical(signed).encode())
    assert sig["keyid"] in k.root_json["signed"]["roles"]["targets"]["keyids"]

    state = TrustStore(k.root_json).check(data, DEVICE, now=NOW)
    assert (state.version, state.expires, state.release.release) == (3, NOW + 60, "smol:1.0.0")
    assert state.release.golden[0].prompt == "2+2=\nanswer:"


def test_every_bad_document_is_refused_with_its_reason_and_the_store_unchanged(tmp_path: Path):
    k, stranger = keys(), keys()
    store = TrustStore(k.root_json, folder=tmp_path)
    store.save()
    store.accept(5)
    kept = (tmp_path / "trust.json").read_bytes()

    def altered(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
        envelope = json.loads(data)
        change(envelope)
        return json.dumps(envelope).encode()

    def signed_as(signed: dict[str, Any], signer: CryptoSigner = k.targets) -> dict[str, Any]:
        return {"signed": signed, "signatures": [signer.sign(metadata.canonical(signed)).to_dict()]}

    good = sealed(k, 5)
    other_type = {**json.loads(good)["signed"], "_type": "targets"}
    no_device = {key: v for key, v in json.loads(good)["signed"].items() if key != "device_id"}
    twice = json.loads(good)
    twice["signatures"] *= 2
    cases: dict[str, tuple[bytes | dict[str, Any], str]] = {
        "expired by the device's clock": (sealed(k, 5, expires=NOW), "expired"),
        "an older version replayed": (sealed(k, 4), "rollback"),
        "another root's targets key": (metadata.seal(stranger.targets, document(6), NOW + 3600), "unknown_key"),
        "signed by the root key itself": (metadata.seal(k.root, document(6), NOW + 3600), "unknown_key"),
        "another device's document": (sealed(k, 6, device_id="dev_ffffffffffff"), "device"),
        "a reference swapped": (altered(good, lambda e: e["signed"]["release"].update(
            reference="evil.example/smol@sha256:" + "b" * 64)), "signature"),
        "a version raised": (altered(good, lambda e: e["signed"].update(version=99)), "signature"),
        "an expiry pushed out": (altered(sealed(k, 5, expires=NOW), lambda e: e["signed"].update(
            expires=NOW + 10**6)), "signature"),
        "a signature of garbage": (altered(good, lambda e: e["signatures"][0].update(sig="zz")), "signature"),
        "not JSON": (b"<html>", "malformed"),
        "a bare DesiredState": (json.dumps(document(6)).encode(), "malformed"),
        "a float slipped in": (altered(good, lambda e: e["signed"].update(issued_at=NOW + 0.5)), "malformed"),
        "another metadata type": (signed_as(other_type), "malformed"),
        "a field missing": (signed_as(no_device), "malformed"),
        "one signature twice": (twice, "malformed"),
    }
    for what, (data, reason) in cases.items():
        with pytest.raises(Refused) as refused:
            store.check(data, DEVICE, now=NOW)
        assert refused.value.reason == reason, (what, str(refused.value))
        assert "\n" not in str(refused.value), what
    assert store.highest == 5 and (tmp_path / "trust.json").read_bytes() == kept
    assert store.check(good, DEVICE, now=NOW).version == 5  # control: the untouched document passes, equal version
    assert store.check(sealed(k, 5, expires=NOW + 1), DEVICE, now=NOW).version == 5  # a second before expiry


def test_a_threshold_of_targets_keys_needs_that_many_signatures():
    root, one, two = (CryptoSigner.generate_ed25519() for _ in range(3))
    store = TrustStore(metadata.make_root(root, [one.public_key, two.public_key], threshold=2))
    envelope = json.loads(metadata.seal(one, document(1), NOW + 60))
    with pytest.raises(Refused) as refused:
        store.check(envelope, DEVICE, now=NOW)
    assert refused.value.reason == "signature" and "1 of the 2" in str(refused.value)
    envelope["signatures"].append(two.sign(metadata.canonical(envelope["signed"])).to_dict())
    assert store.check(envelope, DEVICE, now=NOW).version == 1


def test_the_store_persists_never_goes_back_and_refuses_a_bad_root(tmp_path: Path):
    k = keys()
    folder = tmp_path / "fleet"
    TrustStore(k.root_json, folder=folder).save()
    assert json.loads((folder / "root.json").read_text()) == k.root_json
    store = TrustStore.load(folder)
    assert store.highest == 0
    store.accept(3)
    store.accept(2)  # never back
    assert TrustStore.load(folder).highest == 3 == json.loads((folder / "trust.json").read_text())["highest"]
    with pytest.raises(Refused, match="older than version 3"):
        TrustStore.load(folder).check(sealed(k, 2), DEVICE, now=NOW)

    # a root whose targets key was swapped without the root key: refused when the store is made
    forged = json.loads(json.dumps(k.root_json))
    other = CryptoSigner.generate_ed25519().public_key
    forged["signed"]["keys"][other.keyid] = other.to_dict()
    forged["signed"]["roles"]["targets"]["keyids"] = [other.keyid]
    with pytest.raises(ConfigError, match="did not sign it.*enrol this device again"):
        TrustStore(forged)
    (folder / "trust.json").write_text("{not json")
    with pytest.raises(ConfigError, match="trust.json is unreadable"):
        TrustStore.load(folder)
    with pytest.raises(ConfigError, match="no trust root.*enrol it again"):
        TrustStore.load(tmp_path / "never-enrolled")


# -- through the real app ------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Plane:
    plane: ControlPlane
    transport: httpx.ASGITransport
    raw: httpx.AsyncClient

    @property
    def side(self) -> DeviceSide:
        return self.plane.extras[STATE]

    @property
    def trust(self) -> trust.Trust:
        return self.plane.extras[trust.STATE]

    def device(self, key: DeviceKey | None = None, **kw: Any) -> DeviceClient:
        return DeviceClient(BASE_URL, key or DeviceKey.generate(), transport=self.transport, **kw)

    async def enrolled(self, **kw: Any) -> tuple[DeviceClient, dict[str, Any]]:
        client = self.device(**kw)
        answer = await client.enrol(await token(self.plane.db), name="edge", hardware=PROFILE)
        assert answer.trust_root is not None
        return client, answer.trust_root

    async def fetch(self, client: DeviceClient, etag: str | None = None) -> httpx.Response:
        """One poll as sent on the wire (signed), answer unread: what an attacker could record and replay."""
        headers = {"authorization": client.key.authorization(client.device_id or "", "GET",
                                                             "/fleet/v1/device/desired", b"", int(self.plane.clock()))}
        if etag:
            headers["if-none-match"] = etag
        return await self.raw.get("/fleet/v1/device/desired", headers=headers)

    async def settled(self) -> None:
        wanted = await self.plane.db.change_version()
        await eventually(lambda: self.side.version >= wanted, "the change feed did not catch up")


@contextlib.asynccontextmanager
async def served(url: str, **kw: Any) -> AsyncIterator[Plane]:
    plane = ControlPlane(Database(url), **kw)
    try:
        async with serving(plane) as transport, httpx.AsyncClient(transport=transport, base_url=BASE_URL) as raw:
            yield Plane(plane, transport, raw)
    finally:
        await plane.db.close()  # also when the start failed (the lifespan closes it only after a clean run)


async def token(db: Database) -> str:
    secret = f"slmenrol_{secrets.token_urlsafe(24)}"
    async with db.write() as s:
        s.add(EnrolmentToken(id=f"tok_{secret[-12:].lower()}", token_hash=token_hash(secret),
                             expires_at=time.time() + 3600, tags={}, created_by="key:ops", created_at=time.time()))
    return secret


async def publish(plane: ControlPlane, version: str) -> None:
    """Release smol:<version> with a CPU variant, on the `stable` channel the baseline layer names."""
    async with plane.db.write() as s:
        release = Release(name="smol", version=version, golden=[{"prompt": "2+2=", "expect": "4"}],
                          created_by="key:ops", created_at=time.time())
        s.add(release)
        await s.flush()
        digest = "sha256:" + version.replace(".", "").rjust(64, "0")
        s.add(Variant(release_id=release.id, hardware="cpu", reference=f"reg.example/smol@{digest}",
                      manifest_digest=digest, signature=None))
        channel = await s.get(Channel, "stable")
        if channel is None:
            s.add(Channel(name="stable", release_id=release.id, updated_at=time.time()))
            s.add(Blueprint(layer="baseline", priority=0, config={"channel": "stable"}, updated_at=time.time(),
                            updated_by="key:ops"))
        else:
            channel.release_id, channel.updated_at = release.id, time.time()


async def desired_version(plane: ControlPlane, device_id: str) -> int:
    async with plane.db.read() as s:
        return (await s.get(Device, device_id)).desired_version  # type: ignore[union-attr]


def test_a_device_enrols_keeps_its_root_and_verifies_what_it_polls(fleet_db_url, tmp_path):
    async def scenario() -> None:
        async with served(fleet_db_url) as p:
            await publish(p.plane, "1.0.0")
            client, root_json = await p.enrolled()
            assert root_json == p.trust.root_json
            store = TrustStore(root_json, folder=tmp_path / "fleet")
            store.save()
            await p.settled()
            state, etag = await client.desired(None, store)
            assert state is not None and state.device_id == client.device_id and state.release is not None
            assert state.release.release == "smol:1.0.0" and state.expires is not None
            assert state.expires - state.issued_at == pytest.approx(p.plane.metadata_ttl_s, abs=1)
            store.accept(state.version)
            assert TrustStore.load(tmp_path / "fleet").highest == state.version
            assert await client.desired(etag, store) == (None, etag)
            unchecked, _ = await client.desired()  # operators' tools read the same document without a store
            assert unchecked is not None and unchecked.version == state.version

    run(scenario())


def test_freshness_attacks_are_refused_and_the_store_keeps_its_version(fleet_db_url, tmp_path):
    async def scenario() -> None:
        server, device_clock = Clock(), Clock()
        async with served(fleet_db_url, clock=server) as p, \
                served(f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}") as elsewhere:
            await publish(p.plane, "1.0.0")
            a, root_json = await p.enrolled(clock=device_clock)
            b, _ = await p.enrolled(clock=device_clock)
            store = TrustStore(root_json, folder=tmp_path / "fleet")
            store.save()
            await p.settled()
            first = await p.fetch(a)
            assert store.check(first.content, a.device_id, device_clock()).version == 1
            store.accept(1)
            await publish(p.plane, "2.0.0")  # the channel moves on: version 2
            await p.settled()
            state, _ = await a.desired(first.headers["etag"], store)
            assert state is not None and state.version == 2 and state.release.release == "smol:2.0.0"
            store.accept(2)
            second = (await p.fetch(a)).content

            def tampered(data: bytes) -> bytes:
                envelope = json.loads(data)
                envelope["signed"]["release"]["reference"] = envelope["signed"]["release"]["reference"].replace(
                    "reg.example", "evil.example")
                return json.dumps(envelope).encode()

            forged = metadata.seal(elsewhere.trust.signer, {**json.loads(second)["signed"], "version": 3},
                                   device_clock() + 3600)
            attacks = {"replayed version 1": (first.content, "rollback"),
                       "another control plane's key": (forged, "unknown_key"),
                       "b's document": ((await p.fetch(b)).content, "device"),
                       "altered in transit": (tampered(second), "signature")}
            for what, (data, reason) in attacks.items():
                with pytest.raises(Refused) as refused:
                    store.check(data, a.device_id, device_clock())
                assert refused.value.reason == reason, (what, str(refused.value))

            # a frozen control plane: its clock stopped, it keeps signing documents that are stale by the device's
            # clock; the device learns the server's offset for its requests, never for expiry
            device_clock.now += p.plane.metadata_ttl_s + 60
            with pytest.raises(Refused) as refused:
                await a.desired(None, store)
            assert refused.value.reason == "expired" and a.offset < -p.plane.metadata_ttl_s
            assert store.highest == 2 and TrustStore.load(tmp_path / "fleet").highest == 2
            assert store.check(second, a.device_id, server()).version == 2  # control: by a current clock it passes

    run(scenario())


def test_a_document_near_expiry_is_reissued_under_a_new_version_by_any_replica(fleet_db_url, tmp_path):
    async def scenario() -> None:
        clock = Clock()
        async with served(fleet_db_url, clock=clock, metadata_ttl_s=100) as p:
            await publish(p.plane, "1.0.0")
            a, root_json = await p.enrolled(clock=clock)
            store = TrustStore(root_json)
            await p.settled()
            state, etag = await a.desired(None, store)
            assert state is not None and state.version == 1 and state.expires == pytest.approx(clock.now + 100, abs=1)

            clock.now += 45  # more than half its life left: 304
            assert await a.desired(etag, store) == (None, etag)
            clock.now += 10  # less than half left: the same state under a new version, fresh
            again, etag2 = await a.desired(etag, store)
            assert again is not None and again.version == 2 and etag2 != etag
            assert (again.release, again.config) == (state.release, state.config)
            assert again.expires == pytest.approx(clock.now + 100, abs=1)
            assert await desired_version(p.plane, a.device_id) == 2
            assert await a.desired(etag2, store) == (None, etag2)

            async with served(fleet_db_url, clock=clock, metadata_ttl_s=100) as q:  # a replica that cached nothing
                via_q = q.device(a.key, device_id=a.device_id, clock=clock)
                assert await via_q.desired(etag2, store) == (None, etag2)  # fresh by the expiry its ETag carries
                clock.now += 60
                later, etag3 = await via_q.desired(etag2, store)
                assert later is not None and later.version == 3
                assert await desired_version(p.plane, a.device_id) == 3
                clock.now += 500  # offline past the expiry of what it holds: a new version, never a 304
                back, _ = await via_q.desired(etag3, store)
                assert back is not None and back.version == 4 and back.expires > clock.now

    run(scenario())


def test_replicas_on_one_database_sign_with_the_same_keys(fleet_db_url, tmp_path):
    async def scenario() -> None:
        path = tmp_path / "cp" / "fleet-root.key"
        async with served(fleet_db_url, root_key=path) as one, served(fleet_db_url) as two:
            assert path.stat().st_mode & 0o777 == 0o600
            assert one.trust.root_json == two.trust.root_json
            assert one.trust.signer.public_key == two.trust.signer.public_key
            root = metadata.load_root(one.trust.root_json)
            assert metadata.names(root, "root", trust.load_root_key(path).public_key)
            assert metadata.names(root, "targets", one.trust.signer.public_key)
            client, root_json = await one.enrolled()
            via_two = two.device(client.key, device_id=client.device_id)
            state, _ = await via_two.desired(None, TrustStore(root_json))  # signed by two, trusted from one's root
            assert state is not None and state.device_id == client.device_id
            async with one.plane.db.read() as s:
                rows = {(r.purpose, r.epoch): bytes(r.value) for r in (await s.execute(select(ServerSecret))).scalars()}
            assert set(rows) == {("session", 1), ("targets", 1), ("root", 1)} and len(rows["targets", 1]) == 32
            assert len(rows["root", 1]) > 64 and json.loads(rows["root", 1]) == root_json  # past the declared length
        async with served(fleet_db_url, root_key=path) as again:  # a restart: the same root
            assert again.trust.root_json == root_json

        wrong = tmp_path / "wrong.key"
        wrong.write_bytes(Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        wrong.chmod(0o600)
        with pytest.raises(ConfigError, match="not the root key of this fleet"):
            async with served(fleet_db_url, root_key=wrong):
                pass
        wrong.chmod(0o644)
        with pytest.raises(ConfigError, match="readable by others"):
            async with served(fleet_db_url, root_key=wrong):
                pass

    run(scenario())


def test_replicas_starting_at_once_on_a_fresh_database_agree_on_one_root(fleet_db_url, tmp_path):
    """Two replicas on two hosts (two key paths), starting together: one root metadata wins, and only the key
    that signed it is left on disk."""
    async def scenario() -> None:
        dbs = [Database(fleet_db_url), Database(fleet_db_url)]
        try:
            await dbs[0].migrate()
            paths = [tmp_path / "host-a" / "fleet-root.key", tmp_path / "host-b" / "fleet-root.key"]
            loaded = await asyncio.gather(*(trust.load(db, path, 3600, time.time()) for db, path in zip(dbs, paths)))
            assert loaded[0].root_json == loaded[1].root_json
            assert loaded[0].signer.public_key == loaded[1].signer.public_key
            left = [path for path in paths if path.exists()]
            root = metadata.load_root(loaded[0].root_json)
            assert len(left) == 1 and metadata.names(root, "root", trust.load_root_key(left[0]).public_key)
        finally:
            for db in dbs:
                await db.close()

    run(scenario())


# -- the CLI -----------------------------------------------------------------------------------------------------
def test_fleet_serve_makes_the_root_key_and_agent_enrol_keeps_the_root(tmp_path: Path):
    home, device_home = tmp_path / "cp", tmp_path / "device"
    home.mkdir()
    port = free_port()
    env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_FLEET_HOST": f"127.0.0.1:{port}", "SLMOPS_CONFIG": "",
           "SLMOPS_FLEET_DB": "", "SLMOPS_FLEET_KEY": "", "SLMOPS_FLEET_ROOT_KEY": "",
           "SLMOPS_FLEET_METADATA_TTL": "10m"}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=120, env={**env, **extra},
                              check=False)
        assert done.returncode == 0, f"slmops {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    with ServerProcess([BIN, "fleet", "serve"], home / "fleet.log", f"http://127.0.0.1:{port}", env=env) as cp:
        cp.wait_ready()
        key_file = home / "fleet-root.key"
        assert key_file.stat().st_mode & 0o777 == 0o600 and "made the fleet root key" in cp.log_tail()
        secret = asyncio.run(token_in(home / "fleet.db"))  # as `slmops fleet tokens create` would (tested there)
        cli("agent", "enrol", "--token", secret, "--name", "pi-1", SLMOPS_HOME=str(device_home))
        store = TrustStore.load(device_home / "fleet")
        assert store.highest == 0 and json.loads((device_home / "fleet" / "trust.json").read_text()) == {"highest": 0}
        assert metadata.names(store.root, "root", trust.load_root_key(key_file).public_key)
        ident = json.loads((device_home / "fleet" / "device.json").read_text())

        async def poll() -> Any:
            async with DeviceClient(cp.url, DeviceKey.load(device_home / "fleet" / "device.key"),
                                    ident["device_id"]) as client:
                return (await client.desired(None, store))[0]

        state = asyncio.run(poll())  # checked with the root the CLI kept, from the real process
        assert state.device_id == ident["device_id"] and state.expires - state.issued_at == pytest.approx(600, abs=1)

    key_file.chmod(0o644)  # a key others can read: refused in one line before anything starts
    done = subprocess.run([str(BIN), "fleet", "serve"], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert done.returncode == 1 and "readable by others" in done.stderr and "Traceback" not in done.stderr


async def token_in(path: Path) -> str:
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        return await token(db)
    finally:
        await db.close()
