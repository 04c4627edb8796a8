"""One simulation run, end to end: real processes, a fleet of simulated devices, a rollout, and its measurement.

1. Start a ``docker-registry`` and push two releases of a small model (one variant per hardware class, each
   signed with a model-signing key the control plane is told to trust), then ``slmops fleet serve`` on SQLite,
   a throw-away PostgreSQL cluster, or a database URL; make an admin key on its database as an operator would.
2. Through the operators' API: a group of the simulated devices, a baseline blueprint on channel ``stable``, both
   releases, ``stable`` -> the first. One enrolment token per device from the admin API; every device enrols with
   its own key through the device API (concurrently, as a factory would).
3. Run every device (:mod:`slmops.fleet.sim.devices`) until all run the first release, then start the rollout of
   the second. (Relative gates compare with the devices of each class not yet in the wave, over the same time.)
4. Watch: devices per release every quarter second and the ledger as it grows; tell returning devices when their
   class was reverted. The run ends when the rollout is over and every device runs its final release (or at the
   deadline); the devices report one more window and stop, and the ledger is read to its end for the checks in
   :mod:`slmops.fleet.sim.measure`. With ``probe_changes``, changes that alter nobody's desired state are then
   timed: what one change costs the control plane per device.

The fd limit is raised first (10,000 devices share a pool of connections, but PostgreSQL, the registry and the
logs take descriptors too), and uvloop runs the event loop where it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.api.fleet import RolloutRequest
from slmops.fleet.sim import classes, measure, services
from slmops.fleet.sim.devices import Shared, SimDevice, Timing
from slmops.fleet.sim.faults import DEFAULT, Faults, behaviours
from slmops.types.errors import InvalidInput

NAME = "sim"  # the model's name; releases sim:1.0.0 and sim:2.0.0
PREVIOUS, NEW = f"{NAME}:1.0.0", f"{NAME}:2.0.0"
GROUP, TAGS = "sim", {"fleet": "sim"}
Say = Callable[[str], None]


@dataclass(frozen=True)
class Scenario:
    devices: int = 1000
    db: str = "sqlite"  # sqlite | postgresql | a database URL
    waves: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)
    bake_s: float = 5.0
    faults: Faults = field(default_factory=lambda: Faults.parse(DEFAULT))
    timing: Timing = field(default_factory=Timing)
    mix: dict[str, float] = field(default_factory=lambda: classes.parse_mix(""), hash=False)
    tick_s: float = 0.5  # the control plane's rollout driver period (SLMOPS_FLEET_TICK)
    min_devices: int = 1
    min_requests: int = 0
    gates: tuple[str, ...] | None = None  # None: the control plane's defaults
    warmup_s: float = 1.0  # after every device runs the first release, before the rollout starts
    deadline_s: float = 300.0  # the rollout gives up this long after it started
    connections: int = 64  # aiohttp pool size
    enrol_concurrency: int = 4  # SQLite takes one writer at a time: more only queue (measured 4 best)
    seed: int = 0
    probe_changes: int = 0  # after the rollout: changes that alter no desired state, each timed (the change storm)

    def __post_init__(self) -> None:
        """Refuse a bad scenario before anything starts (the same words the rollout API would use)."""
        if self.devices < 1:
            raise InvalidInput("--devices: simulate at least one device")
        if self.bake_s < 0 or self.warmup_s < 0 or self.deadline_s <= 0:
            raise InvalidInput("bake, warm-up and deadline are durations of 0 s or more")
        if self.db not in ("sqlite", "postgresql") and "://" not in self.db:
            raise InvalidInput(f"--db {self.db!r}: use sqlite, postgresql (a throw-away cluster) or a database URL")
        if self.timing.poll_s <= 0 or self.timing.report_s <= 0:
            raise InvalidInput("--poll and --report: intervals above 0 s")
        from slmops.fleet.control.rollouts import Plan

        Plan.from_percent(self.waves, bake_s=self.bake_s)  # the waves' own checks (increasing, ending at 100%)


def raise_fd_limit(wanted: int = 20_000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run(scenario: Scenario, say: Say = lambda _: None, folder: Path | None = None) -> measure.Result:
    """Run ``scenario`` in a fresh event loop (uvloop when installed); its measured result."""
    raise_fd_limit()
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(simulate(scenario, say, folder))


async def simulate(scenario: Scenario, say: Say = lambda _: None, folder: Path | None = None) -> measure.Result:
    """The whole run (module docstring); everything it started is stopped before it returns or raises."""
    own = folder is None
    root = Path(tempfile.mkdtemp(prefix="slmops-sim-")) if own else folder
    assert root is not None
    try:
        async with contextlib.AsyncExitStack() as stack:
            db_url, db_kind, db_cpu = _database(scenario.db, root, stack)
            plane, key = await _start_services(root, db_url, scenario.tick_s, say, stack)
            result = await _with_fleet(scenario, plane, key, (db_kind, db_cpu), say)
    except BaseException:
        if own:
            shutil.rmtree(root, ignore_errors=True)
        raise
    if own and not result.failures():
        shutil.rmtree(root, ignore_errors=True)
    else:
        result.folder = str(root)
    return result


def _database(db: str, root: Path, stack: contextlib.AsyncExitStack) -> tuple[str, str, services.CpuMeter]:
    """The database URL, its kind, and how to read the CPU its own processes used (PostgreSQL started here;
    SQLite works inside the control plane's process, counted there)."""
    if db == "sqlite":
        return f"sqlite+aiosqlite:///{root / 'fleet.db'}", "sqlite", lambda: None
    if db == "postgresql":
        pg = services.Postgres()
        stack.callback(pg.stop)
        return pg.url, "postgresql", pg.cpu_seconds
    return db, db.split(":", 1)[0].split("+", 1)[0], lambda: None


async def _start_services(root: Path, db_url: str, tick_s: float, say: Say,
                          stack: contextlib.AsyncExitStack) -> tuple[services.ControlPlane, str]:
    """Registry with both releases pushed and signed, control plane (starting meanwhile), admin key, group,
    baseline blueprint, releases, channel."""
    say("starting a registry and slmops fleet serve; pushing and signing the releases' variants")
    registry = services.Registry(root / "registry")
    stack.callback(registry.stop)
    signer = services.SigningKey.make(root)
    plane = services.ControlPlane(root / "control-plane", db_url, tick_s, signer.public)
    stack.callback(plane.stop)
    variants = await asyncio.to_thread(lambda: {r: _push(registry, signer, r) for r in (PREVIOUS, NEW)})
    await asyncio.to_thread(plane.wait_ready, "/health", within=120)
    key = await services.admin_key(db_url)

    def publish() -> None:
        with services.admin(plane.url, key) as ops:
            ops.put_group(GROUP, TAGS)
            ops.put_blueprint("baseline", {"channel": "stable"})
            for release, specs in variants.items():
                name, version = release.split(":")
                ops.create_release(name, version, specs, golden=[{"prompt": "What is 2+2?", "expect": "4"}])
            ops.set_channel("stable", PREVIOUS)

    await asyncio.to_thread(publish)
    return plane, key


def _push(registry: services.Registry, signer: services.SigningKey, release: str) -> list[dict[str, Any]]:
    version = release.split(":")[1]
    out = []
    for name in classes.CLASSES:
        repo = f"sim/{NAME}-{name.replace('_', '-')}"
        model = f"GGUF simulated {release} for {name}\n".encode() + random.randbytes(4096)
        manifest, blobs = registry.push(repo, version, model)
        out.append({"hardware": name, "reference": f"{registry.host}/{repo}:{version}",
                    "signature": signer.sign(manifest, blobs)})
    return out


async def _with_fleet(scenario: Scenario, plane: services.ControlPlane, key: str,
                      db: tuple[str, services.CpuMeter], say: Say) -> measure.Result:
    import aiohttp

    rng = random.Random(scenario.seed)
    kinds = classes.assign(scenario.devices, scenario.mix)
    connector = aiohttp.TCPConnector(limit=scenario.connections, limit_per_host=scenario.connections)
    timeout = aiohttp.ClientTimeout(total=scenario.timing.http_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                     skip_auto_headers=("User-Agent", "Accept-Encoding")) as session:
        shared = Shared(session, plane.url, scenario.timing, scenario.faults,
                        returners_left={c: scenario.faults.returning for c in scenario.faults.ttft_regression})
        devices = [SimDevice(i, k, b, shared, rng.getrandbits(32))
                   for i, (k, b) in enumerate(zip(kinds, behaviours(kinds, scenario.faults, rng)))]
        result = measure.Result(scenario=_describe(scenario, db[0]))
        tasks: list[asyncio.Task[None]] = []
        try:
            await _enrol(devices, session, plane.url, key, scenario.enrol_concurrency, result, say)
            tasks += [asyncio.create_task(d.run(), name=f"sim-{d.index}") for d in devices]
            watch = measure.Watch(plane.proc.pid, shared, db[1])
            await _rollout(scenario, plane, key, devices, shared, watch, result, say)
        finally:
            shared.stop.set()
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [repr(o) for o in outcomes if isinstance(o, BaseException)
                   and not isinstance(o, asyncio.CancelledError)]
        result.crashed = crashed[:5]
        result.crashed_count = len(crashed)
    say("reading the ledger and the devices the control plane knows")
    with services.admin(plane.url, key) as ops:
        await asyncio.to_thread(watch.read, ops)  # to its end (what the run read already is not read again)
        known = await asyncio.to_thread(lambda: {d.id: d.running_release for d in ops.all_devices(page_size=1000)})
    measure.finish(result, devices, shared, watch.entries, known, scenario.faults, PREVIOUS, NEW)
    return result


def _describe(s: Scenario, db_kind: str) -> dict[str, Any]:
    return {"devices": s.devices, "db": db_kind, "waves": list(s.waves), "bake_s": s.bake_s,
            "faults": s.faults.describe(), "poll_s": s.timing.poll_s, "report_s": s.timing.report_s,
            "tick_s": s.tick_s, "min_devices": s.min_devices, "min_requests": s.min_requests,
            "gates": list(s.gates) if s.gates is not None else "default", "classes": dict(s.mix)}


async def _enrol(devices: list[SimDevice], session: Any, url: str, key: str, concurrency: int,
                 result: measure.Result, say: Say) -> None:
    """A token per device from the admin API, then the device's own enrolment, ``concurrency`` at a time. The
    devices start polling only once all are enrolled: an enrolment costs the control plane ~9 ms of CPU (two
    write transactions with a ledger entry each), and the polls and reports of those enrolled first would
    otherwise slow the rest several-fold."""
    say(f"enrolling {len(devices)} devices")
    queue = list(reversed(devices))
    auth = {"Authorization": f"Bearer {key}"}

    async def worker() -> None:
        while queue:
            device = queue.pop()
            async with session.post(url + "/fleet/v1/tokens", json={"expires_in": "1h", "tags": TAGS},
                                    headers=auth) as r:
                if r.status != 201:
                    raise RuntimeError(f"token refused ({r.status}): {(await r.text())[:200]}")
                token = (await r.json())["token"]
            await device.enrol(token, {})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.setup["enrol_s"] = time.perf_counter() - t0
    result.setup["enrol_per_s"] = len(devices) / result.setup["enrol_s"]


async def _rollout(scenario: Scenario, plane: services.ControlPlane, key: str, devices: list[SimDevice],
                   shared: Shared, watch: measure.Watch, result: measure.Result, say: Say) -> None:
    t0 = time.perf_counter()
    say("waiting until every device runs the first release")
    await _until(lambda: all(d.running == PREVIOUS for d in devices), scenario.deadline_s, "baseline")
    result.setup["baseline_s"] = time.perf_counter() - t0
    await asyncio.sleep(scenario.warmup_s)
    with services.admin(plane.url, key) as ops:
        say(f"rolling {NEW} out to {len(devices)} devices")
        request = RolloutRequest(release=NEW, group=GROUP, waves=list(scenario.waves), bake=f"{scenario.bake_s:g}s",
                                 min_devices=scenario.min_devices, min_requests=scenario.min_requests,
                                 gates=list(scenario.gates) if scenario.gates is not None else None)
        shared.new_release, shared.rollout_started = NEW, time.time()
        watch.begin()
        info = await asyncio.to_thread(ops.start_rollout, request)
        result.rollout_id = info.id
        await _watch(scenario, ops, info.id, devices, shared, watch, say)
        await asyncio.sleep(scenario.timing.report_s + 1.0)  # the last windows reach the control plane
        watch.end()
        result.rollout = (await asyncio.to_thread(ops.rollout, info.id)).model_dump(mode="json")
        watch.store(result)
        if scenario.probe_changes:
            say(f"timing {scenario.probe_changes} unrelated change(s): every device's next poll recomputes")
            result.load.update(await watch.probe(lambda i: ops.put_group(f"probe-{i}", {"probe": str(i)}),
                                                 scenario.probe_changes, len(devices)))


async def _watch(scenario: Scenario, ops: Any, rollout_id: str, devices: list[SimDevice], shared: Shared,
                 watch: measure.Watch, say: Say) -> None:
    """Sample until the rollout is over and every device runs its final release, or the deadline passes. What
    the rollout decided comes from the ledger as it grows (cheap: an index range), not from the rollout's status
    (which computes its gates anew on every read)."""
    deadline = time.time() + scenario.deadline_s
    subject = f"rollout:{rollout_id}"
    over = False
    while time.time() < deadline:
        watch.sample(devices)
        for e in await asyncio.to_thread(watch.read, ops):
            if e["subject"] != subject:
                continue
            if e["action"] == "rollout.reverted":
                say(f"gate failed: {e['data'].get('hardware_class')} reverted")
                shared.reverted.add(e["data"].get("hardware_class"))
            over = over or e["action"] in ("rollout.completed", "rollout.aborted")
        if over and _settled(devices, shared):
            return
        await asyncio.sleep(0.25)
    say("deadline passed before the rollout converged")


def _settled(devices: list[SimDevice], shared: Shared) -> bool:
    """Every device online and on its final release: the new one for classes that were not stopped."""
    return all(d.online and d.running == (PREVIOUS if d.cls.name in shared.reverted else NEW) for d in devices)


async def _until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {within:.0f} s")
        await asyncio.sleep(0.1)


def counts_of(devices: list[SimDevice]) -> Counter:
    return Counter(d.running for d in devices)
