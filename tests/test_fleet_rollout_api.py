"""Wave rollouts through the real app on SQLite and PostgreSQL: devices of three hardware classes enrol, poll and
report (with latency histograms) through the device client, operators start and steer rollouts through the API,
and the driver is ticked by hand with the control plane's clock (no sleeping). Waves advance per class; a class
whose variant fails to load, or that gets slower than the release it ran before, is stopped and its devices are
told the previous release again under a higher version while the other classes go on; every decision is in the
ledger with its numbers. Releases are written as rows (their routes and the registry are tested with their
owner, tests/test_fleet_releases.py)."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fleet_app import BASE_URL, eventually, run, serving
from fleet_db import fleet_db_url, postgres  # noqa: F401
from sqlalchemy import event, func, select

from slmops.api.fleet import ReportRequest
from slmops.client import DeviceClient
from slmops.fleet.control import ledger, operators, rollout_driver
from slmops.fleet.control.app import ControlPlane
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import LedgerEntry, Release, RolloutAssignment, Variant
from slmops.fleet.control.routes_device import OPTIONS, STATE, DeviceOptions, DeviceSide
from slmops.fleet.deviceauth import DeviceKey
from slmops.fleet.histogram import Histogram

OLD, NEW = "smol:1.0.0", "smol:2.0.0"
X86, ARM, CUDA = "cpu-x86_64", "cpu-aarch64", "cuda-x86_64"


class Clock:
    """The control plane's clock, moved by the test (rollouts bake by it); starts at the real time so that signed
    requests stay within the allowed skew."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Fleet:
    plane: ControlPlane
    side: DeviceSide
    transport: httpx.ASGITransport
    ops: httpx.AsyncClient
    view: httpx.AsyncClient
    clock: Clock
    devices: list[DeviceClient] = field(default_factory=list)
    applied: dict[str, int] = field(default_factory=dict)  # device id -> desired version it reports applied

    async def enrol(self, n: int, hardware_class: str, site: str = "lyon") -> list[DeviceClient]:
        made = []
        for i in range(n):
            r = await self.ops.post("/tokens", json={"tags": {"site": site, "class": hardware_class}})
            assert r.status_code == 201, r.text
            client = DeviceClient(BASE_URL, DeviceKey.generate(), transport=self.transport)
            await client.enrol(r.json()["token"], name=f"{hardware_class}-{i}")
            made.append(client)
        self.devices += made
        return made

    def of(self, hardware_class: str) -> list[DeviceClient]:
        return [d for d in self.devices if d.hardware_class == hardware_class]  # type: ignore[attr-defined]

    async def settled(self) -> None:
        """Wait until this replica's caches have followed the change feed to the database's change version."""
        wanted = await self.plane.db.change_version()
        await eventually(lambda: self.side.version >= wanted, "the change feed did not catch up")

    async def tick(self, advance: float = 0.0) -> list[Any]:
        self.clock.now += advance
        return await rollout_driver.tick(self.plane, self.clock.now)


@contextlib.asynccontextmanager
async def fleet(url: str, tick_s: float = 0.0) -> AsyncIterator[Fleet]:
    """The app in-process with its lifespan (the rollout driver off unless ``tick_s``), operator and viewer keys,
    a baseline on channel ``stable`` at smol:1.0.0, and smol:2.0.0 with variants for cpu and cuda-x86_64."""
    clock = Clock()
    plane = ControlPlane(Database(url), clock=clock, rollout_tick_s=tick_s,
                         extras={OPTIONS: DeviceOptions(flush_interval_s=3600)})
    async with serving(plane) as transport:
        keys = {role: await operators.create_key(plane.db, role, role, "system") for role in ("operator", "viewer")}
        ops, view = (httpx.AsyncClient(transport=transport, base_url=f"{BASE_URL}/fleet/v1",
                                       headers={"Authorization": f"Bearer {keys[role]}"})
                     for role in ("operator", "viewer"))
        f = Fleet(plane, plane.extras[STATE], transport, ops, view, clock)
        try:
            await publish(plane, OLD, ["*"])
            await publish(plane, NEW, ["cpu", CUDA])
            assert (await ops.put("/channels/stable", json={"release": OLD})).status_code == 200
            assert (await ops.put("/blueprints/baseline", json={"config": {"channel": "stable"}})).status_code == 200
            assert (await ops.put("/groups/lyon", json={"selector": {"site": "lyon"}})).status_code == 200
            yield f
        finally:
            for d in f.devices:
                await d.aclose()
            await ops.aclose()
            await view.aclose()


async def publish(plane: ControlPlane, release: str, hardware: list[str]) -> None:
    name, version = release.split(":")
    async with plane.db.write() as s:
        row = Release(name=name, version=version, golden=[{"prompt": "2+2=", "expect": "4"}], created_by="key:ops",
                      created_at=time.time())
        s.add(row)
        await s.flush()
        for hw in hardware:
            digest = "sha256:" + secrets.token_hex(32)
            s.add(Variant(release_id=row.id, hardware=hw, reference=f"reg.example/{name}@{digest}",
                          manifest_digest=digest))


async def told(device: DeviceClient) -> tuple[int, str | None]:
    """The version of the device's desired state and the release it names (a signed document's ``signed`` part
    when the control plane signs)."""
    state, _ = await device.desired()
    doc = state.model_dump() if hasattr(state, "model_dump") else dict(state)  # type: ignore[union-attr]
    doc = doc.get("signed", doc)
    release = doc.get("release")
    return doc["version"], release["release"] if release else None


def latencies(ms: float, requests: int = 20) -> list[int]:
    """A wire histogram of ``requests`` latencies around ``ms``."""
    h = Histogram()
    h.add(ms * 0.8, requests // 2)
    h.add(ms, requests - requests // 2 - requests // 10)
    h.add(ms * 1.5, requests // 10)
    return h.to_wire()


Behaviour = Callable[[DeviceClient, str | None], tuple[str | None, list[dict[str, Any]], bool]]


def healthy(ms: Callable[[DeviceClient, str | None], float] = lambda d, r: 100.0) -> Behaviour:
    """Devices that run what they are told and report ``ms`` of TTFT."""
    def report(d: DeviceClient, release: str | None) -> tuple[str | None, list[dict[str, Any]], bool]:
        return release, [{"requests": 20, "errors": 0, "ttft_hist": latencies(ms(d, release)),
                          "itl_hist": latencies(20.0), "tokens_per_s": 50.0, "golden_score": 1.0}], True
    return report


async def report_round(f: Fleet, how: Behaviour, devices: list[DeviceClient] | None = None) -> dict[str, str | None]:
    """Every device polls, then reports a window ending now; the batcher writes them. Device id -> release told."""
    await f.settled()
    now = f.clock.now
    seen = {}
    for d in devices if devices is not None else f.devices:
        version, release = await told(d)
        seen[d.device_id] = release
        running, windows, applied = how(d, release)
        if applied:
            f.applied[d.device_id] = version  # type: ignore[index]
        body = {"running": {"release": running}, "health": "ok", "desired_version": f.applied.get(d.device_id, 0),
                "windows": [{"start": now - 10, "end": now, **w} for w in windows]}
        await d.report(ReportRequest.model_validate(body))
    await f.side.batcher.flush()
    return seen


async def entries(plane: ControlPlane, action: str | None = None) -> list[LedgerEntry]:
    async with plane.db.read() as s:
        found = await ledger.entries(s, limit=100_000)
    return [e for e in found if action is None or e.action == action]


def classes(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["hardware_class"]: c for c in info["classes"]}


# -- the whole story -----------------------------------------------------------------------------------------------
def test_waves_advance_per_class_and_a_failing_class_is_reverted(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            for cls, n in ((X86, 10), (ARM, 3), (CUDA, 4)):
                for d in await f.enrol(n, cls):
                    d.hardware_class = cls  # type: ignore[attr-defined]
            f.clock.now += 5
            before = await report_round(f, healthy())  # the hour before: what the last wave compares with
            assert set(before.values()) == {OLD}
            versions = {d.device_id: (await told(d))[0] for d in f.devices}

            f.clock.now += 5
            r = await f.ops.post("/rollouts", json={"release": NEW, "group": "lyon", "waves": [10, 50, 100],
                                                    "bake": "30s"})
            assert r.status_code == 201, r.text
            info = r.json()
            rid, started = info["id"], f.clock.now
            assert info["status"] == "running" and info["plan"]["previous"] == {X86: OLD, ARM: OLD, CUDA: OLD}
            assert {c: (v["wave"], v["share"], v["devices"]["total"], v["devices"]["targeted"])
                    for c, v in classes(info).items()} == {X86: (1, 0.1, 10, 1), ARM: (1, 0.1, 3, 1),
                                                           CUDA: (1, 0.1, 4, 1)}
            assert (await f.ops.post("/rollouts", json={"release": NEW, "group": "lyon"})).status_code == 409

            # wave 1: one device per class is told the new release under a new version; the others are unchanged
            arm_fails = healthy()

            def wave1(d: DeviceClient, release: str | None) -> Any:
                if d.hardware_class == ARM and release == NEW:  # type: ignore[attr-defined]
                    return OLD, [{"release": NEW, "load_failures": 1}], False  # keeps serving the old one
                return arm_fails(d, release)

            f.clock.now += 1
            seen = await report_round(f, wave1)
            targeted = {i for i, rel in seen.items() if rel == NEW}
            assert len(targeted) == 3
            for d in f.devices:
                version, _ = await told(d)
                assert version == versions[d.device_id] + (1 if d.device_id in targeted else 0)

            # live gate values before any tick; the ARM class fails at once (fail fast), the others bake
            live = classes((await f.view.get(f"/rollouts/{rid}")).json())
            arm_gate = next(g for g in live[ARM]["gates"] if g["gate"].startswith("load_failure_rate"))
            assert (arm_gate["outcome"], arm_gate["value"]) == ("fail", 1.0)
            version_before = await f.plane.db.change_version()
            decisions = await f.tick(1)
            assert [(d.action, d.hardware_class) for d in decisions] == [("gate_failed", ARM), ("revert", ARM)]
            assert await f.plane.db.change_version() > version_before
            arm = f.of(ARM)
            arm_target = next(d for d in arm if d.device_id in targeted)
            await f.settled()
            version, release = await told(arm_target)
            assert release == OLD and version == versions[arm_target.device_id] + 2  # back, under a higher version
            failed = await entries(f.plane, "rollout.gate_failed")
            assert len(failed) == 1 and failed[0].subject == f"rollout:{rid}" and failed[0].actor == "system"
            numbers = failed[0].data
            assert numbers["hardware_class"] == ARM and numbers["devices"] == 1 and numbers["wave"] == 1
            assert any(g["gate"].startswith("load_failure_rate") and g["value"] == 1.0 and g["outcome"] == "fail"
                       for g in numbers["gates"])
            reverted = await entries(f.plane, "device.reverted")
            assert [(e.subject, e.data["rollout"], e.data["from"], e.data["to"]) for e in reverted] == [
                (f"device:{arm_target.device_id}", rid, NEW, OLD)]

            # a tick that decides nothing leaves every cached desired state alone
            version_before = await f.plane.db.change_version()
            assert await f.tick(1) == []
            assert await f.plane.db.change_version() == version_before

            # bake over: x86 and cuda pass wave 1 and move to 50%
            f.clock.now += 30
            await report_round(f, healthy())
            cached = dict(f.side.issued)  # every device polled: each one's signed document is held in memory
            assert len(cached) == len(f.devices)
            decisions = await f.tick(1)
            assert sorted((d.action, d.hardware_class) for d in decisions) == [("wave_advanced", X86),
                                                                              ("wave_advanced", CUDA)]
            advanced = {e.data["hardware_class"]: e.data for e in await entries(f.plane, "rollout.wave_advanced")}
            # the change names the devices the wave took in: only their documents are dropped, every other
            # device's next poll is answered from memory as before
            await f.settled()
            moved = set(advanced[X86]["assigned"]) | set(advanced[CUDA]["assigned"])
            assert moved and not moved & set(f.side.issued)
            assert {i for i, held in f.side.issued.items() if held is cached[i]} == set(cached) - moved
            assert advanced[X86]["to_wave"] == 2 and len(advanced[X86]["assigned"]) == 4  # 5 of 10, one already
            assert (advanced[CUDA]["devices"], advanced[CUDA]["requests"]) == (1, 40)  # two windows since wave 1
            assert all(g["outcome"] == "pass" for g in advanced[CUDA]["gates"])

            # wave 2: cuda's new devices are slower than the ones still on the old release (the control group)
            def wave2(d: DeviceClient, release: str | None) -> float:
                return 300.0 if d.hardware_class == CUDA and release == NEW else 100.0  # type: ignore[attr-defined]

            f.clock.now += 1
            seen = await report_round(f, healthy(wave2))
            assert sum(rel == NEW for i, rel in seen.items() if i in {d.device_id for d in f.of(CUDA)}) == 2
            decisions = await f.tick(1)
            assert [(d.action, d.hardware_class) for d in decisions] == [("gate_failed", CUDA), ("revert", CUDA)]
            failed = (await entries(f.plane, "rollout.gate_failed"))[-1].data
            ttft = next(g for g in failed["gates"] if g["gate"].startswith("ttft_p95"))
            assert ttft["outcome"] == "fail" and ttft["value"] > 2 * ttft["threshold"] / 1.2
            assert len(await entries(f.plane, "device.reverted")) == 3
            await f.settled()
            for d in f.of(CUDA) + f.of(ARM):
                assert (await told(d))[1] == OLD

            # x86 goes on alone: 100%, then done; the last wave has no control group left, so it is compared
            # with the hour before the rollout started
            f.clock.now += 30
            await report_round(f, healthy())
            assert [(d.action, d.hardware_class) for d in await f.tick(1)] == [("wave_advanced", X86)]
            f.clock.now += 31
            seen = await report_round(f, healthy())
            assert all(seen[d.device_id] == NEW for d in f.of(X86))
            assert [(d.action, d.hardware_class) for d in await f.tick(1)] == [("class_completed", X86),
                                                                            ("completed", None)]
            info = (await f.view.get(f"/rollouts/{rid}")).json()
            assert info["status"] == "completed"
            assert {c: v["status"] for c, v in classes(info).items()} == {X86: "done", ARM: "failed", CUDA: "failed"}
            assert classes(info)[X86]["devices"] == {"total": 10, "targeted": 10, "applied": 10, "running": 10,
                                                     "failing": 0, "reverted": 0}
            assert classes(info)[CUDA]["devices"]["reverted"] == 2 and classes(info)[CUDA]["devices"]["targeted"] == 0
            assert classes(info)[ARM]["devices"]["failing"] == 1  # it reported failing to load the release
            assert await f.tick(100) == []  # a completed rollout is not judged again

            listed = (await f.view.get("/rollouts")).json()
            assert [r["id"] for r in listed] == [rid] and listed[0]["status"] == "completed"
            actions = [e.action for e in await entries(f.plane) if e.subject == f"rollout:{rid}"]
            assert actions == ["rollout.started", "rollout.gate_failed", "rollout.reverted", "rollout.wave_advanced",
                               "rollout.wave_advanced", "rollout.gate_failed", "rollout.reverted",
                               "rollout.wave_advanced", "rollout.class_completed", "rollout.completed"]
            assert started < f.clock.now
            async with f.plane.db.read() as s:
                assert (await ledger.verify(s)).ok

    run(scenario())


# -- by hand -------------------------------------------------------------------------------------------------------
def test_pause_resume_promote_and_abort_by_hand(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            for cls, n in ((X86, 4), (CUDA, 4)):
                for d in await f.enrol(n, cls):
                    d.hardware_class = cls  # type: ignore[attr-defined]
            await report_round(f, healthy())
            versions = {d.device_id: (await told(d))[0] for d in f.devices}
            r = await f.ops.post("/rollouts", json={"release": NEW, "group": "lyon", "base_percent": 25,
                                                    "increment_factor": 2, "bake": "0s", "gates": []})
            assert r.status_code == 201, r.text
            rid = r.json()["id"]
            assert r.json()["plan"]["waves"] == [0.25, 0.5, 1.0] and r.json()["plan"]["gates"] == []

            assert (await f.view.post(f"/rollouts/{rid}/pause")).status_code == 403  # viewers only read
            paused = await f.ops.post(f"/rollouts/{rid}/pause")
            assert paused.status_code == 200 and paused.json()["status"] == "paused"
            assert (await f.ops.post(f"/rollouts/{rid}/pause")).json()["error"].endswith("cannot pause it")
            await report_round(f, healthy())
            assert await f.tick(60) == []  # nothing moves while paused, though the gates (none) would pass

            assert (await f.ops.post(f"/rollouts/{rid}/resume")).json()["status"] == "running"
            promoted = await f.ops.post(f"/rollouts/{rid}/promote", json={"hardware_class": CUDA})
            assert promoted.status_code == 200, promoted.text
            shown = classes(promoted.json())
            assert (shown[CUDA]["wave"], shown[CUDA]["devices"]["targeted"]) == (3, 4)
            assert (shown[X86]["wave"], shown[X86]["devices"]["targeted"]) == (1, 1)
            bad = await f.ops.post(f"/rollouts/{rid}/promote", json={"hardware_class": "npu-x86_64"})
            assert bad.status_code == 409 and "not active" in bad.json()["error"]
            assert (await f.ops.post(f"/rollouts/{rid}/promote", json={"class": CUDA})).status_code == 400

            await f.settled()
            on_new = {d.device_id for d in f.devices if (await told(d))[1] == NEW}
            assert len(on_new) == 5
            aborted = await f.ops.post(f"/rollouts/{rid}/abort")
            assert aborted.status_code == 200 and aborted.json()["status"] == "aborted"
            assert {c["status"] for c in aborted.json()["classes"]} == {"aborted"}
            assert (await f.ops.post(f"/rollouts/{rid}/resume")).status_code == 409
            await f.settled()
            for d in f.devices:  # everyone on the old release; those that had the new one under a newer version
                version, release = await told(d)
                assert release == OLD and version == versions[d.device_id] + (2 if d.device_id in on_new else 0)

            by_rollout = [(e.actor, e.action) for e in await entries(f.plane) if e.subject == f"rollout:{rid}"]
            assert by_rollout == [("key:operator", a) for a in (
                "rollout.started", "rollout.paused", "rollout.resumed", "rollout.promoted", "rollout.aborted",
                "rollout.reverted", "rollout.reverted")]
            reverted = await entries(f.plane, "device.reverted")
            assert sorted(e.subject for e in reverted) == sorted(f"device:{i}" for i in on_new)
            assert {(e.data["from"], e.data["to"], e.data["reason"]) for e in reverted} == {(NEW, OLD, "aborted")}
            async with f.plane.db.read() as s:
                live = await s.scalar(select(func.count()).select_from(RolloutAssignment)
                                      .where(RolloutAssignment.reverted_at.is_(None)))
            assert live == 0

            # after an abort the group is free for another rollout
            assert (await f.ops.post("/rollouts", json={"release": NEW, "group": "lyon"})).status_code == 201

    run(scenario())


@pytest.mark.parametrize("body,status,needle", [
    ({"release": "smol:9.9.9", "group": "lyon"}, 404, "release smol:9.9.9 not found"),
    ({"release": NEW, "group": "paris"}, 404, 'no group "paris"'),
    ({"release": "smol", "group": "lyon"}, 400, "is not NAME:VERSION"),
    ({"release": NEW, "group": "lyon", "gates": ["latency < 3"]}, 400, "unknown metric latency"),
    ({"release": NEW, "group": "lyon", "waves": [10, 50]}, 400, "the last wave must cover the whole group"),
    ({"release": NEW, "group": "lyon", "waves": [50, 10, 100]}, 400, "waves must be increasing"),
    ({"release": NEW, "group": "lyon", "waves": [10, 100], "base_percent": 5, "increment_factor": 2}, 400,
     "not both"),
    ({"release": NEW, "group": "lyon", "base_percent": 5}, 400, "go together"),
    ({"release": NEW, "group": "lyon", "bake": "soon"}, 400, "bake: 'soon' is not a duration"),
    ({"release": NEW, "group": "lyon", "stages": 3}, 400, "stages: Extra inputs are not permitted"),
    ({"release": "tiny:1.0", "group": "lyon"}, 409, "has no device of a hardware class"),
])
def test_what_a_start_refuses(body, status, needle, tmp_path):
    async def scenario() -> None:
        async with fleet(f"sqlite+aiosqlite:///{tmp_path / 'fleet.db'}") as f:
            await f.enrol(1, X86)
            await publish(f.plane, "tiny:1.0", ["cuda"])
            r = await f.ops.post("/rollouts", json=body)
            assert (r.status_code, needle in r.json()["error"]) == (status, True), r.text
            assert (await f.view.get("/rollouts")).json() == []
            assert (await f.view.get("/rollouts/ro_000000000000")).status_code == 404
            assert await entries(f.plane, "rollout.started") == []

    run(scenario())


# -- overlaps and the channel ----------------------------------------------------------------------------------------
def test_a_completed_rollout_holds_its_devices_until_the_channel_moves(fleet_db_url):
    """Newest rollout wins while two hold a device; a completed one keeps its devices on its release (versions only
    move forward) until an operator moves their channel."""
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            for d in await f.enrol(2, X86):
                d.hardware_class = X86  # type: ignore[attr-defined]
            await publish(f.plane, "smol:3.0.0", ["*"])
            r = await f.ops.post("/rollouts", json={"release": NEW, "group": "lyon", "waves": [100], "bake": "0s",
                                                    "gates": []})
            first = r.json()["id"]
            f.clock.now += 1
            await report_round(f, healthy())
            assert [d.action for d in await f.tick(1)] == ["class_completed", "completed"]
            await f.settled()
            assert {(await told(d))[1] for d in f.devices} == {NEW}

            # a second group holding one of the devices: its newer rollout wins for that device
            one = f.devices[0]
            assert (await f.ops.patch(f"/devices/{one.device_id}/tags", json={"tags": {"ring": "0"}})).status_code == 200
            assert (await f.ops.put("/groups/ring0", json={"selector": {"ring": "0"}})).status_code == 200
            r = await f.ops.post("/rollouts", json={"release": "smol:3.0.0", "group": "ring0", "waves": [100],
                                                    "gates": []})
            assert r.status_code == 201, r.text
            assert r.json()["plan"]["previous"] == {X86: OLD}  # the channel's release, not the rollout's
            second = r.json()["id"]
            await f.settled()
            assert [(await told(d))[1] for d in f.devices] == ["smol:3.0.0", NEW]
            abort = await f.ops.post(f"/rollouts/{second}/abort")
            assert abort.status_code == 200
            back = [e.data for e in await entries(f.plane, "device.reverted")]
            assert back == [{"rollout": second, "from": "smol:3.0.0", "to": NEW, "hardware_class": X86,
                             "reason": "aborted"}]  # back to what the first rollout holds it on
            await f.settled()
            assert {(await told(d))[1] for d in f.devices} == {NEW}

            # the operator moves the channel: the completed rollout lets its devices go
            f.clock.now += 5
            assert (await f.ops.put("/channels/stable", json={"release": "smol:3.0.0"})).status_code == 200
            await f.settled()
            assert {(await told(d))[1] for d in f.devices} == {"smol:3.0.0"}
            assert (await f.view.get(f"/rollouts/{first}")).json()["status"] == "completed"

    run(scenario())


def test_the_driver_ticks_on_its_own(fleet_db_url):
    async def scenario() -> None:
        async with fleet(fleet_db_url, tick_s=0.05) as f:
            await f.enrol(2, X86)
            r = await f.ops.post("/rollouts", json={"release": NEW, "group": "lyon", "waves": [50, 100],
                                                    "bake": "0s", "gates": []})
            rid = r.json()["id"]
            assert classes(r.json())[X86]["devices"]["targeted"] == 1
            for wave, status in ((2, "running"), (2, "completed")):
                f.clock.now += 1
                await report_round(f, healthy())  # the class needs a device reporting to be judged
                await eventually(lambda w=wave, st=status: _at(f, rid, w, st),  # type: ignore[misc]
                                 f"the driver did not reach wave {wave} {status}")
            info = (await f.view.get(f"/rollouts/{rid}")).json()
            assert classes(info)[X86]["devices"]["targeted"] == 2

    run(scenario())


async def _at(f: Fleet, rid: str, wave: int, status: str) -> bool:
    info = (await f.view.get(f"/rollouts/{rid}")).json()
    return info["status"] == status and classes(info)[X86]["wave"] == wave


def test_devices_of_a_rollout_share_one_read_of_it_per_change(fleet_db_url):
    """After a rollout moves, every device polls again: the rollouts' assignments and release are read once for
    all of them, not once per device."""
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            await f.enrol(6, X86)
            r = await f.ops.post("/rollouts", json={"release": NEW, "group": "lyon", "waves": [50, 100],
                                                    "gates": []})
            assert r.status_code == 201
            await f.settled()
            statements: list[str] = []
            event.listen(f.plane.db.engine.sync_engine, "before_cursor_execute",
                         lambda conn, cursor, sql, *args: statements.append(sql))
            told_now = [(await told(d))[1] for d in f.devices]
            assert sorted(told_now, key=str) == [OLD] * 3 + [NEW] * 3
            assert sum("rollout_assignments" in q for q in statements) == 1
            assert sum("FROM rollouts" in q for q in statements) == 1

    run(scenario())
