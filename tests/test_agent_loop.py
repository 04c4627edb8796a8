"""The edge agent's loop against real parts but the control plane: a real registry (tiny GGUFs), the real local
server app over HTTP (a fake engine that names the model answering), the real stager and local client; the control
plane is an in-memory stand-in speaking the device client's interface, and the agent's clock is the test's, so
health and report windows pass without waiting.

What must hold: a release is staged in the idle slot, smoke-tested and switched to; the old slot stays loaded
through the health window and takes over again when the new model fails; a release that fails its golden prompts
never serves; a desired state pointing back reuses the slot that holds it (no pull); windows queue while the
control plane is away (polls back off) and go out when it is back, after a restart too; a restarted agent puts its
served name back; a document the trust store refuses changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry import BINARY, Registry
from slot_server import FakeEngine, serving, stored, tiny_models
from slmops.api.fleet import DesiredState, Golden, ReleaseTarget, ReportRequest
from slmops.client.local import LocalClient
from slmops.fleet.agent.loop import Agent, AgentOptions
from slmops.fleet.agent.staging import Stager
from slmops.fleet.agent.trust import Refused
from slmops.store.pushing import push_to_registry
from slmops.store.registry_auth import RegistryConfig
from slmops.store.store import Store
from slmops.types.errors import RunnerOutOfMemory, SourceError
from slmops.types.name import ModelName, Reference

INSECURE = RegistryConfig(insecure=True)
OPTIONS = AgentOptions(poll_interval_s=30, window_s=60, health_window_s=120, jitter=0.2)
PASSES = [Golden(prompt="the secret golden prompt", expect="done")]  # the fake engine always answers "... done"
DEVICE = "dev_000000000001"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Registry, dict[str, tuple[str, str]]]:
    """Four tiny models v0..v3 in a real registry: role -> (pinned reference, manifest digest)."""
    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    tmp = tmp_path_factory.mktemp("loop")
    reg = Registry(tmp / "registry")
    out = {}
    for i, gguf in enumerate(tiny_models(tmp / "gguf", 4)):
        name = ModelName.parse(f"{reg.host}/fleet/smol:v{i}")
        store = stored(tmp / "pusher", gguf, name.display, allow_internal_registries=True)
        push_to_registry(store, Reference.of(name), lambda *a: None, INSECURE)
        digest = str(store.manifests.digest(name))
        out[f"v{i}"] = (f"{name.display}@{digest}", digest)
    yield reg, out
    reg.stop()


class Control:
    """The control plane's device routes as the agent calls them (DeviceClient's interface), in memory."""

    def __init__(self, published: dict[str, tuple[str, str]]):
        self.published = published
        self.doc: DesiredState | None = None
        self.reports: list[ReportRequest] = []
        self.offline = False
        self.polls = 0
        self.refusal: Exception | None = None  # what the trust store says of the next documents

    def publish(self, role: str, release: str, golden: list[Golden] = PASSES) -> None:
        reference, digest = self.published[role]
        target = ReleaseTarget(release=release, variant="cpu", reference=reference, manifest_digest=digest,
                               golden=golden)
        version = self.doc.version + 1 if self.doc else 1
        self.doc = DesiredState(device_id=DEVICE, version=version, issued_at=0, release=target)

    async def desired(self, etag: str | None, trust: Any = None) -> tuple[DesiredState | None, str | None]:
        self.polls += 1
        if self.offline:
            raise SourceError("cannot reach the control plane")
        tag = f'"{self.doc.version}"' if self.doc else '"0"'
        if etag == tag:
            return None, etag
        if self.refusal is not None:
            raise self.refusal
        return self.doc, tag

    async def report(self, report: ReportRequest) -> None:
        if self.offline:
            raise SourceError("cannot reach the control plane")
        self.reports.append(report)

    async def feedback(self, records: list[Any]) -> Any:
        raise AssertionError("no blueprint here opts in to feedback")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def scenario(tmp_path: Path, published, test: Callable[..., Any]) -> None:
    """Run ``test(agent, local, control, engine, clock, url, home)`` with a fresh device: its server, its agent."""
    _, refs = published
    home = tmp_path / "device"
    store = Store(home / "models", allow_internal_registries=True)
    engine, control, clock = FakeEngine(), Control(refs), Clock()
    with serving(store, engine) as url:
        async def go() -> None:
            async with LocalClient(url) as local:
                stager = Stager(store, INSECURE)
                agent = Agent(control, local, stager, None, home, OPTIONS, clock,  # type: ignore[arg-type]
                              rng=lambda: 0.5)
                await agent.restore()
                await test(agent, local, control, engine, clock, url, home)
        asyncio.run(go())


async def served(local: LocalClient) -> tuple[str, str | None]:
    (slot,) = await local.slots()
    assert slot.served == "smol:latest"
    return slot.model, slot.release


async def loaded(local: LocalClient) -> set[str]:
    return {m["name"] for m in await local.ps()}


async def step(agent: Agent, clock: Clock) -> float:
    """A cycle at the agent's next poll (its clock moves on to it, unless it is there already)."""
    clock.now = max(clock.now, agent.next_poll)
    return await agent.cycle()


def generate(url: str) -> httpx.Response:
    return httpx.post(url + "/api/generate", json={"model": "smol", "prompt": "hi", "stream": False}, timeout=30)


def registry_gets(reg: Registry) -> int:
    return len(reg.requests("GET", "/v2/fleet/"))


def test_releases_switch_stay_or_switch_back_through_the_slots(tmp_path, published):
    reg = published[0]

    async def test(agent: Agent, local, control: Control, engine: FakeEngine, clock, url, home) -> None:
        control.publish("v0", "smol:1")
        await step(agent, clock)
        assert await served(local) == ("slot/smol-a:1", "smol:1")
        assert generate(url).json()["response"] == "[slot/smol-a:1] done"

        control.publish("v1", "smol:2")
        await step(agent, clock)
        assert await served(local) == ("slot/smol-b:2", "smol:2")
        assert {"smol:latest", "slot/smol-a:1"} <= await loaded(local)  # the old slot stays for the health window
        last = control.reports[-1]
        assert (last.running.release, last.running.slot, last.health, last.desired_version) == ("smol:2", "b", "ok", 2)
        assert [w.release for w in last.windows] == ["smol:1"]  # smol:1's window closed at the switch

        # the new model's runner is killed by the OOM killer on each request
        engine.failing["slot/smol-b:2"] = RunnerOutOfMemory("killed by SIGKILL: most likely out of memory")
        assert [generate(url).status_code for _ in range(2)] == [500, 500]
        clock.now += 5
        await step(agent, clock)
        await agent.settle()
        assert await served(local) == ("slot/smol-a:1", "smol:1")  # switched back by itself
        assert "slot/smol-b:2" not in await loaded(local)
        assert generate(url).json()["response"] == "[slot/smol-a:1] done"
        failed = [w for r in control.reports for w in r.windows if w.release == "smol:2"]
        assert [(w.requests, w.errors, w.oom, w.golden_score) for w in failed] == [(2, 2, 2, 1.0)]  # passed its smoke test
        assert control.reports[-1].health == "failing" and control.reports[-1].running.release == "smol:1"

        before = registry_gets(reg)
        control.publish("v1", "smol:2")  # told again: a release that failed here is not tried again so soon
        await step(agent, clock)
        assert await served(local) == ("slot/smol-a:1", "smol:1") and registry_gets(reg) == before

        control.publish("v0", "smol:3")  # the revert: a new version holding what slot a holds
        await step(agent, clock)
        assert await served(local) == ("slot/smol-a:1", "smol:3") and registry_gets(reg) == before  # no pull
        assert control.reports[-1].health == "ok" and control.reports[-1].desired_version == 4
        assert agent.state.applied_version == 4 and agent.state.pending is None

    scenario(tmp_path, published, test)


def test_failed_golden_prompts_keep_the_old_release_and_a_passed_health_window_frees_it(tmp_path, published):
    reg = published[0]

    async def test(agent: Agent, local, control: Control, engine, clock, url, home) -> None:
        control.publish("v0", "smol:1")
        await step(agent, clock)
        control.publish("v1", "smol:2", golden=[*PASSES, Golden(prompt="the capital of France?", expect="paris")])
        await step(agent, clock)
        await agent.settle()
        assert await served(local) == ("slot/smol-a:1", "smol:1")  # never switched
        assert await loaded(local) == {"smol:latest"}  # the failed one was unloaded again
        (window,) = [w for r in control.reports for w in r.windows if w.release == "smol:2"]
        assert (window.golden_score, window.requests, window.load_failures) == (0.5, 0, 0)
        assert control.reports[-1].health == "failing"
        assert "secret golden" not in json.dumps([r.model_dump() for r in control.reports])  # numbers, never text

        control.publish("v2", "smol:3")  # staged in slot b over the failed release
        await step(agent, clock)
        assert await served(local) == ("slot/smol-b:3", "smol:3")
        assert {m.name.display for m in Store(home / "models").list()} == {"slot/smol-a:1", "slot/smol-b:3"}
        clock.now += OPTIONS.health_window_s + 1
        await step(agent, clock)
        await agent.settle()
        assert agent.state.pending is None and await loaded(local) == {"smol:latest"}  # the old slot unloaded...
        assert Store(home / "models").exists(ModelName.parse("slot/smol-a:1"))  # ...and kept for a revert

        control.publish("v3", "smol:4")
        await step(agent, clock)
        assert await served(local) == ("slot/smol-a:4", "smol:4") and agent.state.pending is not None
        before = registry_gets(reg)
        control.publish("v2", "smol:5")  # points back while the health window is open: at once, no pull
        await step(agent, clock)
        await agent.settle()
        assert await served(local) == ("slot/smol-b:3", "smol:5") and registry_gets(reg) == before
        assert agent.state.pending is None and "slot/smol-a:4" not in await loaded(local)

    scenario(tmp_path, published, test)


def test_windows_queue_while_the_control_plane_is_away_and_a_restart_restores_the_slot(tmp_path, published):
    async def test(agent: Agent, local: LocalClient, control: Control, engine, clock, url, home) -> None:
        control.publish("v0", "smol:1")
        await step(agent, clock)
        control.offline = True
        for _ in range(3):
            assert generate(url).status_code == 200
        polls = control.polls
        for _ in range(3):  # at 61, 122 and 183 s: polls at 61 (then 60 s off) and 122 (then 120 s off) only
            clock.now += OPTIONS.window_s + 1
            await agent.cycle()
        assert control.polls - polls == 2 and agent.failures == 2  # backing off while it is away
        assert len(agent.state.queue) == 3  # a window a minute, kept
        assert await served(local) == ("slot/smol-a:1", "smol:1")  # serving all along

        await local.delete_slot("smol")  # the server lost its table; the agent restarts
        again = Agent(control, local, agent.stager, None, home, OPTIONS, clock,  # type: ignore[arg-type]
                      rng=lambda: 0.5)
        await again.restore()
        assert await served(local) == ("slot/smol-a:1", "smol:1") and len(again.state.queue) == 3
        sent = len(control.reports)
        control.offline = False
        await step(again, clock)
        delivered = [w for r in control.reports[sent:] for w in r.windows]
        assert [w.requests for w in delivered] == [3, 0, 0] and again.state.queue == []
        assert again.failures == 0 and again.next_poll - clock.now == OPTIONS.poll_interval_s  # back to normal

        control.publish("v1", "smol:2")
        control.refusal = Refused("expired", "desired state version 2 expired 5 s ago by this device's clock")
        await step(again, clock)  # a refused document activates nothing and stops nothing
        assert await served(local) == ("slot/smol-a:1", "smol:1") and again.state.applied_version == 1
        assert "refused (expired)" in (again.state.last_error or "") and again.failures == 0
        control.refusal = None
        await again.run(once=True)  # `slmops agent run --once`: one poll and apply, one report
        assert await served(local) == ("slot/smol-b:2", "smol:2")
        assert control.reports[-1].desired_version == 2 and control.reports[-1].running.release == "smol:2"

    scenario(tmp_path, published, test)
