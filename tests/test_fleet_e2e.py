"""A fleet end to end, every part real: a `slmops fleet serve` process (SQLite), a real docker-registry, and two
devices, each with its own SLMOPS_HOME, its own `slmops serve` and its own `slmops agent run`; the releases are the
real default model (Q4_1) and its Q8_0 variant, pushed by slmops.

1. Release smollm2:1 (Q4_1) on the channel: both devices pull it (device A only the blobs it lacks: none) and serve
   it under the served name ``smollm2``.
2. A rollout of smollm2:2 (Q8_0) to both, gated on its golden prompt. Device A stages it in its idle slot and
   switches while streaming requests run: one that began on Q4_1 completes after the switch. Device B's class gets
   a variant that cannot answer the golden prompt (a stop word cuts the answer): its smoke test fails, it never
   stops serving smollm2:1, reports the failure, and the control plane's gate stops and reverts its class.
3. The operator aborts the rollout: device A goes back to smollm2:1 from the slot that still holds it (no pull),
   and the control plane sees both devices on smollm2:1. The ledger holds every decision.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import BIN, DEFAULT, Server, free_port, link_home, run_cli
from procs import ServerProcess
from registry import BINARY, Registry
from slmops.api.fleet import RolloutRequest
from slmops.client.fleet import FleetClient
from slmops.modelfile import build, parse
from slmops.ops.quantize import quantize_model
from slmops.store.pushing import push_to_registry
from slmops.store.registry_auth import RegistryConfig
from slmops.store.store import Store
from slmops.types.name import ModelName, Reference

pytestmark = pytest.mark.slow

GOLDEN = [{"prompt": "What is the capital of France?", "expect": "paris", "max_tokens": 16}]
COUNTING = {"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "raw": True, "stream": True,
            "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 24}}
ALLOW = {"SLMOPS_ALLOW_PRIVATE_REGISTRIES": "true", "SLMOPS_CONFIG": ""}


class ControlPlane(ServerProcess):
    def __init__(self, home: Path, **env: str):
        port = free_port()
        self.env = {**os.environ, **ALLOW, "SLMOPS_HOME": str(home), "SLMOPS_FLEET_HOST": f"127.0.0.1:{port}",
                    "SLMOPS_FLEET_DB": "", "SLMOPS_FLEET_KEY": "", **env}
        super().__init__([BIN, "fleet", "serve", "--insecure-registries"], home / "fleet.log",
                         f"http://127.0.0.1:{port}", env=self.env)
        self.wait_ready()


@dataclass
class Device:
    name: str
    home: Path
    id: str = ""
    server: Server | None = None
    agent: ServerProcess | None = None
    procs: list[Any] = field(default_factory=list)

    def slot(self) -> dict[str, Any] | None:
        assert self.server is not None
        slots = httpx.get(self.server.url + "/api/slots", timeout=10).json()["slots"]
        return slots[0] if slots else None

    def release(self) -> str | None:
        slot = self.slot()
        return slot["release"] if slot else None

    def logs(self) -> str:
        return "".join(f"\n--- {p.log_path.name} of {self.name}:\n{p.log_tail(2500)}" for p in self.procs)


def until(check: Callable[[], Any], what: str, devices: list[Device], within: float = 150.0) -> Any:
    """Wait for ``check`` to hold (a deadline for a hang, not a speed check); fail with the devices' logs."""
    deadline = time.monotonic() + within
    while True:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within:.0f} s" + "".join(d.logs() for d in devices))
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, shared_home):
    """The default model (Q4_1), its Q8_0 variant, and the Q8_0 with a stop word that cuts the golden answer."""
    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    tmp = tmp_path_factory.mktemp("e2e")
    reg = Registry(tmp / "registry")
    store = Store(link_home(shared_home, tmp / "pusher") / "models", allow_internal_registries=True)
    names = {role: ModelName.parse(f"{reg.host}/fleet/smollm2:{role}") for role in ("q4_1", "q8_0", "cut")}
    store.copy(DEFAULT, names["q4_1"])
    quantize_model(store, DEFAULT, names["q8_0"], "q8_0", allow_requantize=True)
    build.create(store, names["cut"], parse(f"FROM {names['q8_0'].display}\nPARAMETER stop Paris\n"), tmp)
    for name in names.values():
        push_to_registry(store, Reference.of(name), lambda *a: None, RegistryConfig(insecure=True))
    model_blobs = {role: store.manifest(name).layer("application/vnd.ollama.image.model").digest
                   for role, name in names.items()}
    yield reg, {role: n.display for role, n in names.items()}, model_blobs
    reg.stop()


def start_device(d: Device, plane: ControlPlane, fleet: FleetClient, hw_class: str) -> None:
    token = fleet.create_token("10m", {"fleet": "e2e", "class": hw_class}).token
    enrolled = run_cli("agent", "enrol", "--token", token, "--control", plane.url, "--name", d.name, home=d.home,
                       **ALLOW)
    assert enrolled.returncode == 0, enrolled.stderr
    d.id = json.loads((d.home / "fleet" / "device.json").read_text())["device_id"]
    d.server = Server(d.home, SLMOPS_CONTEXT_LENGTH="1024", **ALLOW)
    env = {**os.environ, **ALLOW, "SLMOPS_HOME": str(d.home)}
    d.agent = ServerProcess([BIN, "agent", "run", "--serve-url", d.server.url, "--insecure-registries", "--poll",
                             "0.5s", "--window", "2s", "--health-window", "3s"], d.home / "agent.log",
                            d.server.url, env=env)
    d.procs += [d.server, d.agent]


class Streams:
    """Two threads running counting streams back to back, staggered, so one is always mid-generation; each
    stream's (first piece time, done time, completed cleanly)."""

    def __init__(self, url: str):
        self.url = url
        self.done: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()
        self.generating = threading.Event()  # set once a first piece came
        self.threads = [threading.Thread(target=self._run, args=(i * 1.0,), daemon=True) for i in range(2)]
        for t in self.threads:
            t.start()

    def _run(self, delay: float) -> None:
        time.sleep(delay)
        while not self.stop.is_set():
            first, ok = None, False
            with httpx.stream("POST", self.url + "/api/generate", json=COUNTING, timeout=120) as r:
                for line in r.iter_lines():
                    piece = json.loads(line)
                    first = first or time.time()
                    self.generating.set()
                    ok = r.status_code == 200 and "error" not in piece and piece.get("done") is True
            self.done.append((first or 0.0, time.time(), ok))

    def finish(self) -> list[tuple[float, float, bool]]:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        return self.done


def ledger_actions(fleet: FleetClient) -> list[tuple[str, str]]:
    return [(e.action, e.subject) for e in fleet.ledger(limit=1000)]


def test_a_rollout_switches_slots_gates_a_failing_class_and_reverts(pushed, tmp_path):
    reg, refs, model_blobs = pushed
    plane_home = tmp_path / "plane"
    plane_home.mkdir()
    plane = ControlPlane(plane_home)
    a = Device("device-a", link_home(Path(os.environ.get("SLMOPS_TEST_CACHE", Path.home() / ".cache" /
                                                       "slmops-tests")) / "home", tmp_path / "a"))
    b = Device("device-b", tmp_path / "b")
    devices = [a, b]
    try:
        key = run_cli("fleet", "keys", "create", "root", "--role", "admin", home=plane_home,
                      SLMOPS_FLEET_HOST=plane.env["SLMOPS_FLEET_HOST"], SLMOPS_FLEET_DB="").stdout.strip()
        fleet = FleetClient(plane.url, key)
        fleet.put_group("edge", {"fleet": "e2e"})
        fleet.put_blueprint("baseline", {"channel": "stable"})
        fleet.create_release("smollm2", "1", [{"hardware": "*", "reference": refs["q4_1"]}], GOLDEN)
        fleet.create_release("smollm2", "2", [{"hardware": "cpu-a", "reference": refs["q8_0"]},
                                              {"hardware": "cpu-b", "reference": refs["cut"]}], GOLDEN)
        fleet.set_channel("stable", "smollm2:1")
        model_gets_before = len(reg.requests("GET", model_blobs["q4_1"]))
        start_device(a, plane, fleet, "cpu-a")
        start_device(b, plane, fleet, "cpu-b")

        # 1. both serve release 1 under the served name; A had its blobs, B pulled them
        until(lambda: a.release() == "smollm2:1" and b.release() == "smollm2:1", "both devices serve smollm2:1",
              devices)
        assert len(reg.requests("GET", model_blobs["q4_1"])) - model_gets_before == 1  # B's pull only
        for d in devices:
            answer = httpx.post(d.server.url + "/api/generate", json={**COUNTING, "stream": False}, timeout=120)
            assert answer.status_code == 200 and answer.json()["model"] == "smollm2"

        # 2. the rollout: A switches under streaming load; B's variant fails its golden prompt
        streams = Streams(a.server.url)
        until(streams.generating.is_set, "streams started", devices)
        rollout = fleet.start_rollout(RolloutRequest(release="smollm2:2", group="edge", waves=[100], bake="10m",
                                                     gates=["golden_score >= 0.8"]))
        switched = until(lambda: (s := a.slot()) and s["release"] == "smollm2:2" and s, "A switches to smollm2:2",
                         devices)
        time.sleep(0.5)  # let the streams in flight at the switch run into their next pieces
        done = streams.finish()
        assert done and all(ok for _, _, ok in done), done  # every request completed, none failed
        assert any(first < switched["updated_at"] < end for first, end, _ in done), (switched, done)
        assert switched["model"] == "slot/smollm2-b:2"

        until(lambda: any(c.hardware_class == "cpu-b" and c.status == "failed"
                          for c in fleet.rollout(rollout.id).classes), "the gate stops class cpu-b", devices)
        assert b.release() == "smollm2:1"  # never stopped serving it
        status = json.loads(run_cli("agent", "status", "--json", home=b.home).stdout)
        assert any(k.startswith("smollm2:2@") for k in status["failed"])
        with sqlite3.connect(plane_home / "fleet.db") as db:
            rows = db.execute("SELECT release, golden_score FROM reports WHERE device_id = ? AND release = ?",
                              (b.id, "smollm2:2")).fetchall()
        assert rows and all(score == 0.0 for _, score in rows)
        actions = ledger_actions(fleet)
        assert ("rollout.gate_failed", f"rollout:{rollout.id}") in actions
        assert ("device.reverted", f"device:{b.id}") in actions

        # 3. the operator aborts: A goes back to the slot that still holds release 1, without a pull
        blob_gets = len(reg.requests("GET", "/blobs/"))
        fleet.rollout_action(rollout.id, "abort")
        until(lambda: a.release() == "smollm2:1", "A returns to smollm2:1", devices)
        assert a.slot()["model"] == "slot/smollm2-a:1" and b.release() == "smollm2:1"
        assert len(reg.requests("GET", "/blobs/")) == blob_gets
        answer = httpx.post(a.server.url + "/api/generate", json={**COUNTING, "stream": False}, timeout=120)
        assert answer.status_code == 200
        until(lambda: all(fleet.device(d.id).running_release == "smollm2:1" for d in devices),
              "the control plane sees both on smollm2:1", devices)
        actions = ledger_actions(fleet)
        assert ("rollout.aborted", f"rollout:{rollout.id}") in actions
        assert ("device.reverted", f"device:{a.id}") in actions
    finally:
        for d in devices:
            for p in reversed(d.procs):
                p.stop()
        plane.stop()
