"""Releases and channels of the control plane, on SQLite and PostgreSQL, against a real registry
(Debian's docker-registry, tests/registry.py) holding the default model pushed by slmops with real model-signing
signatures: digests resolved and pinned, signatures verified without the weights, nothing written when any variant
is refused, channels that only move forward, and a ledger entry for every change."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
from fleet_db import fleet_db_url, postgres  # noqa: F401
from sqlalchemy import func, select

from conftest import DEFAULT, link_home
from registry import BINARY, Registry
from slmops.fleet.control import ledger, operators
from slmops.fleet.control.app import ControlPlane, create_app
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import Release, Variant
from slmops.fleet.control.releases import moves_forward, version_key
from slmops.modelfile import build, parse
from slmops.security import signing
from slmops.store.pushing import push_to_registry
from slmops.store.registry_auth import RegistryConfig
from slmops.store.store import Store
from slmops.types.name import ModelName, Reference


@dataclass
class Published:
    """What the registry holds: repositories by role, their manifest digests and signature bundles."""

    registry: Registry
    refs: dict[str, str]
    digests: dict[str, str]
    bundles: dict[str, bytes]
    trusted: Path
    stranger: Path


@pytest.fixture(scope="module")
def published(tmp_path_factory, shared_home) -> Published:
    """``cpu``: the default model, ``cuda``: a model made from it (another manifest, the same weights), both
    signed with the release key; ``stranger``: the default model signed with another key; ``unsigned``: pushed
    without a signature. Pushed by slmops, so the .sig artifacts are the ones devices meet."""
    from test_signing import keypair

    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    tmp = tmp_path_factory.mktemp("releases")
    reg = Registry(tmp / "registry")
    store = Store(link_home(shared_home, tmp / "pusher") / "models", allow_internal_registries=True)
    priv, pub = keypair(tmp, "release")
    other, other_pub = keypair(tmp, "stranger")
    refs = {role: f"{reg.host}/fleet/{role}:1" for role in ("cpu", "cuda", "stranger", "unsigned")}
    names = {role: ModelName.parse(ref) for role, ref in refs.items()}
    for role in ("cpu", "stranger", "unsigned"):
        store.copy(DEFAULT, names[role])
    build.create(store, names["cuda"], parse("FROM smollm2:135m\nSYSTEM Answer in one word.\n"), tmp)
    for role, key in (("cpu", priv), ("cuda", priv), ("stranger", other)):
        signing.sign(store, names[role], key)
    for name in names.values():
        push_to_registry(store, Reference.of(name), lambda *a: None, RegistryConfig(insecure=True))
    digests = {role: str(store.manifests.digest(name)) for role, name in names.items()}
    bundles = {role: store.signature_path(names[role]).read_bytes() for role in ("cpu", "cuda", "stranger")}
    assert digests["cpu"] != digests["cuda"] and digests["cpu"] == digests["unsigned"] == digests["stranger"]
    yield Published(reg, refs, digests, bundles, pub, other_pub)
    reg.stop()


@dataclass
class Fleet:
    plane: ControlPlane
    ops: httpx.AsyncClient  # operator key
    view: httpx.AsyncClient  # viewer key
    anon: httpx.AsyncClient  # no key


@contextlib.asynccontextmanager
async def fleet(url: str, trusted: tuple[Path, ...]) -> AsyncIterator[Fleet]:
    """The app in-process (its lifespan run as the server runs it), with an operator and a viewer key."""
    plane = ControlPlane(Database(url), trusted_keys=trusted, allow_private_registries=True, registry_insecure=True)
    app = create_app(plane)
    async with app.router.lifespan_context(app):
        keys = {role: await operators.create_key(plane.db, role, role, "system") for role in ("operator", "viewer")}
        transport = httpx.ASGITransport(app=app)
        clients = [httpx.AsyncClient(transport=transport, base_url="http://fleet/fleet/v1", timeout=60,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
                   for key in (keys["operator"], keys["viewer"], None)]
        try:
            yield Fleet(plane, *clients)
        finally:
            for c in clients:
                await c.aclose()


def variant(hardware: str, ref: str, **kw: Any) -> dict[str, Any]:
    return {"hardware": hardware, "reference": ref, **kw}


def release(name: str, version: str, *variants: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"name": name, "version": version, "variants": list(variants), **kw}


async def ledger_of(plane: ControlPlane) -> list[Any]:
    async with plane.db.read() as s:
        return await ledger.entries(s, limit=1000)


async def counts(plane: ControlPlane) -> tuple[int, int]:
    async with plane.db.read() as s:
        return ((await s.scalar(select(func.count()).select_from(Release))) or 0,
                (await s.scalar(select(func.count()).select_from(Variant))) or 0)


# -- creating releases ---------------------------------------------------------------------------------------------
def test_a_signed_release_is_resolved_verified_and_recorded(published, fleet_db_url):
    p = published

    async def scenario() -> None:
        async with fleet(fleet_db_url, (p.stranger, p.trusted)) as f:  # the second key verifies
            body = release("smol", "1.0.0", variant("cpu", p.refs["cpu"], manifest_digest=p.digests["cpu"]),
                           variant("cuda-x86_64", p.refs["cuda"]),
                           golden=[{"prompt": "2+2=", "expect": "4"}], notes="first")
            r = await f.ops.post("/releases", json=body)
            assert r.status_code == 201, r.text
            info = r.json()
            assert info["release"] == "smol:1.0.0" and info["created_by"] == "key:operator"
            assert info["variants"] == [
                {"hardware": "cpu", "reference": f"{p.refs['cpu']}@{p.digests['cpu']}",
                 "manifest_digest": p.digests["cpu"], "signed": True},
                {"hardware": "cuda-x86_64", "reference": f"{p.refs['cuda']}@{p.digests['cuda']}",
                 "manifest_digest": p.digests["cuda"], "signed": True}]
            assert info["golden"] == [{"prompt": "2+2=", "expect": "4", "expect_regex": None, "max_tokens": 32}]
            shown = await f.view.get("/releases/smol/1.0.0")
            assert shown.status_code == 200 and shown.json() == info
            listed = await f.view.get("/releases", params={"name": "smol"})
            assert [x["release"] for x in listed.json()] == ["smol:1.0.0"]
            assert (await f.view.get("/releases", params={"name": "other"})).json() == []

            async with f.plane.db.read() as s:  # the bundles themselves are stored, for the devices
                stored = {v.hardware: v.signature for v in (await s.execute(select(Variant))).scalars()}
            assert stored == {"cpu": p.bundles["cpu"], "cuda-x86_64": p.bundles["cuda"]}
            entries = await ledger_of(f.plane)
            assert [(e.actor, e.action, e.subject) for e in entries] == [
                ("system", "key.create", "key:operator"), ("system", "key.create", "key:viewer"),
                ("key:operator", "release.create", "release:smol:1.0.0")]
            made = entries[-1].data["variants"]
            assert {hw: v["digest"] for hw, v in made.items()} == {"cpu": p.digests["cpu"],
                                                                 "cuda-x86_64": p.digests["cuda"]}
            assert made["cpu"]["verified_by"] == p.trusted.name

            again = await f.ops.post("/releases", json=body)
            assert again.status_code == 409 and "smol:1.0.0 exists" in again.json()["error"]
            assert len(await ledger_of(f.plane)) == 3 and await counts(f.plane) == (1, 2)
            assert (await f.view.post("/releases", json=release("smol", "2", variant("*", p.refs["cpu"])))
                    ).status_code == 403
            assert (await f.anon.get("/releases")).status_code == 401
            assert (await f.view.get("/releases/smol/9.9")).status_code == 404

    asyncio.run(scenario())


def test_a_signature_given_in_the_request_is_verified_like_the_registry_one(published, fleet_db_url):
    p = published
    b64 = {role: base64.b64encode(b).decode() for role, b in p.bundles.items()}

    async def scenario() -> None:
        async with fleet(fleet_db_url, (p.trusted,)) as f:
            # the unsigned repository holds the cpu manifest: the cpu bundle, given here, covers it
            r = await f.ops.post("/releases", json=release(
                "plain", "1", variant("cpu", p.refs["unsigned"], signature=b64["cpu"])))
            assert r.status_code == 201 and r.json()["variants"][0]["signed"] is True, r.text
            # a bundle from the trusted key over another manifest, or from another key, is refused
            r = await f.ops.post("/releases", json=release(
                "plain", "2", variant("cpu", p.refs["unsigned"], signature=b64["cuda"])))
            assert r.status_code == 403 and "over other content (it covers another manifest.json)" in r.json()["error"]
            r = await f.ops.post("/releases", json=release(
                "plain", "3", variant("cpu", p.refs["unsigned"], signature=b64["stranger"])))
            assert r.status_code == 403 and "not signed by a trusted key" in r.json()["error"]
            r = await f.ops.post("/releases", json=release(
                "plain", "4", variant("cpu", p.refs["unsigned"], signature="not base64!")))
            assert r.status_code == 400 and r.json()["error"] == "variant cpu: signature is not base64"
            assert await counts(f.plane) == (1, 1)

    asyncio.run(scenario())


def test_a_refused_variant_writes_nothing(published, fleet_db_url):
    """Every variant is resolved before the transaction: one bad variant among good ones leaves no release, no
    variant, no ledger entry and no change version behind."""
    p = published
    host = p.registry.host
    wrong = "sha256:" + "0" * 64
    cases = [
        (variant("cuda", p.refs["cuda"], manifest_digest=wrong), 400,
         f"variant cuda: the registry serves {p.digests['cuda']} for {p.refs['cuda']}, not the pinned {wrong}"),
        (variant("cuda", f"{host}/fleet/absent:1"), 400,
         f"variant cuda: {host}/fleet/absent:1 is not in the registry; push it first or check the reference"),
        (variant("cuda", p.refs["stranger"]), 403, "variant cuda (" + p.refs["stranger"]),
        (variant("cuda", p.refs["unsigned"]), 403,
         f"variant cuda: {p.refs['unsigned']}@{p.digests['unsigned']} is not signed"),
        (variant("cuda", "smollm2:135m"), 400, "names no registry"),
        (variant("cuda", f"{host}/fleet/cuda:1@{p.digests['cpu']}"), 400, "variant cuda: "),  # a pin it lacks
        (variant("cpu", p.refs["cuda"]), 400, "variant cpu is given twice"),
        (variant("GPU 1", p.refs["cuda"]), 400, "variant GPU 1: the hardware key is a hardware class"),
    ]

    async def scenario() -> None:
        async with fleet(fleet_db_url, (p.trusted,)) as f:
            before = await f.plane.db.change_version()
            for bad, status, message in cases:
                r = await f.ops.post("/releases", json=release("smol", "1.0.0", variant("cpu", p.refs["cpu"]), bad))
                assert r.status_code == status and message in r.json()["error"], (bad, r.text)
                assert "\n" not in r.json()["error"]
            assert await counts(f.plane) == (0, 0)
            assert [e.action for e in await ledger_of(f.plane)] == ["key.create", "key.create"]
            assert await f.plane.db.change_version() == before
            assert (await f.view.get("/releases")).json() == []
            r = await f.ops.post("/releases", json=release("Smol!", "1", variant("cpu", p.refs["cpu"])))
            assert r.status_code == 400 and "release name" in r.json()["error"]

    asyncio.run(scenario())


def test_without_trusted_keys_signatures_are_stored_unverified(published, fleet_db_url):
    p = published

    async def scenario() -> None:
        async with fleet(fleet_db_url, ()) as f:
            r = await f.ops.post("/releases", json=release(
                "smol", "1", variant("cpu", p.refs["unsigned"]), variant("cuda", p.refs["stranger"])))
            assert r.status_code == 201, r.text
            assert {v["hardware"]: v["signed"] for v in r.json()["variants"]} == {"cpu": False, "cuda": True}
            async with f.plane.db.read() as s:
                stored = {v.hardware: v.signature for v in (await s.execute(select(Variant))).scalars()}
            assert stored == {"cpu": None, "cuda": p.bundles["stranger"]}

    asyncio.run(scenario())


# -- channels ------------------------------------------------------------------------------------------------------
def test_channels_only_move_forward(published, fleet_db_url):
    p = published

    async def scenario() -> None:
        async with fleet(fleet_db_url, (p.trusted,)) as f:
            for label in ("smol:1.2.0", "smol:1.10.0", "smol:1.9.0", "other:0.1"):  # created in this order
                name, version = label.split(":")
                r = await f.ops.post("/releases", json=release(name, version, variant("cpu", p.refs["cpu"])))
                assert r.status_code == 201, r.text

            async def move(target: str) -> httpx.Response:
                return await f.ops.put("/channels/stable", json={"release": target})

            first = await move("smol:1.2.0")
            assert first.status_code == 200 and first.json()["release"] == "smol:1.2.0"
            assert (await move("smol:1.10.0")).status_code == 200  # 1.10 > 1.2: versions, not strings
            back = await move("smol:1.2.0")
            assert back.status_code == 409 and back.json()["error"] == (
                "channel stable is at smol:1.10.0; it only moves forward (publish a newer version, or roll back "
                "with a new version)")
            assert (await move("smol:1.9.0")).status_code == 409  # created later, but an older version
            same = await move("smol:1.10.0")  # where it is: nothing changes, nothing is recorded
            assert same.status_code == 200 and same.json()["updated_at"] == (await f.view.get(
                "/channels/stable")).json()["updated_at"]
            assert (await move("other:0.1")).status_code == 200  # another model, published after
            assert (await move("smol:1.10.0")).status_code == 409  # ...so every smol release is now behind it
            assert (await move("smol:7")).status_code == 404
            assert (await f.ops.put("/channels/Bad!", json={"release": "smol:1.2.0"})).status_code == 400
            assert (await f.ops.put("/channels/x", json={"release": "smol"})).status_code == 400
            assert (await f.view.put("/channels/canary", json={"release": "smol:1.2.0"})).status_code == 403
            assert (await f.ops.put("/channels/canary", json={"release": "smol:1.9.0"})).status_code == 200

            channels = (await f.view.get("/channels")).json()
            assert [(c["name"], c["release"]) for c in channels] == [("canary", "smol:1.9.0"), ("stable", "other:0.1")]
            assert (await f.view.get("/channels/absent")).status_code == 404
            sets = [(e.subject, e.data) for e in await ledger_of(f.plane) if e.action == "channel.set"]
            assert sets == [
                ("channel:stable", {"from": None, "to": "smol:1.2.0"}),
                ("channel:stable", {"from": "smol:1.2.0", "to": "smol:1.10.0"}),
                ("channel:stable", {"from": "smol:1.10.0", "to": "other:0.1"}),
                ("channel:canary", {"from": None, "to": "smol:1.9.0"})]
            async with f.plane.db.read() as s:
                assert (await ledger.verify(s)).ok

    asyncio.run(scenario())


def test_version_ordering():
    ordered = ["0.9", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11",
               "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2", "v1.10", "2", "2024.6.1"]
    keys = [version_key(v) for v in ordered]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert version_key("1.2.0") == version_key("1.2") == version_key("1.2.0+build.5")
    assert version_key("latest") is None and version_key("1.2.x") is None

    def rel(id_: int, name: str, version: str) -> Release:
        return Release(id=id_, name=name, version=version)
    assert moves_forward(rel(1, "smol", "1.2"), rel(2, "smol", "1.10"))
    assert not moves_forward(rel(2, "smol", "1.2.0"), rel(3, "smol", "1.2"))  # the same version: not forward
    assert moves_forward(rel(5, "smol", "beta"), rel(6, "smol", "alpha"))  # no order: creation order
    assert not moves_forward(rel(6, "smol", "beta"), rel(5, "smol", "gamma"))
    assert not moves_forward(rel(6, "a", "9"), rel(5, "b", "10"))


# -- the CLI against a real server -----------------------------------------------------------------------------------
@contextlib.contextmanager
def served(url: str, trusted: tuple[Path, ...]):  # type: ignore[no-untyped-def]
    """The control plane on a free loopback port (uvicorn in a thread), with an operator key; yields (host, key)."""
    import threading

    import uvicorn

    from conftest import free_port

    async def make_key() -> str:
        db = Database(url)
        try:
            await db.migrate()
            return await operators.create_key(db, "cli", "operator", "system")
        finally:
            await db.close()
    key = asyncio.run(make_key())
    plane = ControlPlane(Database(url), trusted_keys=trusted, allow_private_registries=True, registry_insecure=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(plane), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the control plane did not start"
            thread.join(0.05)
        yield f"127.0.0.1:{port}", key
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_cli_publishes_releases_and_moves_channels(published, tmp_path):
    import json

    from conftest import run_cli
    p = published
    golden = tmp_path / "golden.jsonl"
    golden.write_text('{"prompt": "2+2=", "expect": "4"}\n\n{"prompt": "Say hi", "expect_regex": "(?i)hi"}\n')
    with served(f"sqlite+aiosqlite:///{tmp_path / 'fleet.db'}", (p.trusted,)) as (host, key):
        def cli(*args: str):  # type: ignore[no-untyped-def]
            return run_cli("fleet", *args, home=tmp_path / "home", SLMOPS_FLEET_HOST=host, SLMOPS_FLEET_KEY=key)

        r = cli("releases", "create", "smol:1.0.0", "--variant", f"cpu={p.refs['cpu']}", "--variant",
                f"cuda={p.refs['cuda']}", "--golden", str(golden), "--notes", "first")
        assert r.returncode == 0, r.stderr
        assert "release smol:1.0.0 created" in r.stdout and f"{p.refs['cuda']}@{p.digests['cuda']}" in r.stdout
        r = cli("releases", "create", "smol:1.1.0", "--variant", f"cpu={p.refs['unsigned']}")
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
            f"Error: variant cpu: {p.refs['unsigned']}@{p.digests['unsigned']} is not signed; sign it with a "
            "trusted key (slmops sign NAME --key KEY) and push it again, or give its signature")
        golden.write_text('{"prompt": "2+2="}\n{"prompt": ""}\n')
        r = cli("releases", "create", "smol:1.1.0", "--variant", f"cpu={p.refs['cpu']}", "--golden", str(golden))
        assert r.returncode == 1 and "golden.jsonl line 2: prompt: " in r.stderr, r.stderr
        assert cli("releases", "create", "smol:0.9.0", "--variant", f"*={p.refs['cpu']}").returncode == 0

        listed = json.loads(cli("releases", "list", "--json").stdout)
        assert [(x["release"], len(x["golden"])) for x in listed] == [("smol:1.0.0", 2), ("smol:0.9.0", 0)]
        shown = cli("releases", "show", "smol:1.0.0")
        assert shown.returncode == 0 and "golden: '2+2=' -> expect '4'" in shown.stdout, shown.stdout
        r = cli("channels", "set", "stable", "smol:1.0.0")
        assert r.returncode == 0 and "channel stable -> smol:1.0.0" in r.stdout, r.stderr
        r = cli("channels", "set", "stable", "smol:0.9.0")
        assert r.returncode == 1 and "channel stable is at smol:1.0.0; it only moves forward" in r.stderr
        r = cli("channels", "list")
        assert r.returncode == 0 and r.stdout.split("\n")[1].split()[:2] == ["stable", "smol:1.0.0"], r.stdout


def test_a_trusted_key_that_cannot_be_used_stops_the_start(tmp_path):
    from test_signing import keypair

    from slmops.types.errors import ConfigError
    _, ed25519 = keypair(tmp_path, "ed", curve=None)

    async def start(key: Path) -> None:
        plane = ControlPlane(Database(f"sqlite+aiosqlite:///{tmp_path / 'fleet.db'}"), trusted_keys=(key,))
        app = create_app(plane)
        async with app.router.lifespan_context(app):
            pass
    for key, why in ((tmp_path / "absent.pub", "cannot read it"), (ed25519, "not an EC P-256 or P-384 key"),
                     (tmp_path / "fleet.db", "not a PEM public key")):
        with pytest.raises(ConfigError, match=f"trusted key {key}: .*{why}.*SLMOPS_FLEET_TRUSTED_KEYS takes EC"):
            asyncio.run(start(key))
