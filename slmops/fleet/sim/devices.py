"""Simulated devices: each an asyncio task speaking the agent's protocol to a real control plane over HTTP.

A device makes its own Ed25519 key (:mod:`slmops.fleet.deviceauth`), enrols with a one-time token, takes a session
token with one signed request (correcting its clock offset from ``Slmops-Server-Time`` when the control plane says
its clock is off, as :class:`slmops.client.device.DeviceClient` does), then polls its desired state with an ETag
and jitter. Every document is checked by the agent's own code (:class:`slmops.fleet.agent.trust.TrustStore`: the
root it was enrolled with, expiry by the device's clock, versions that only move forward, its own id) before
anything is activated. A new release is "pulled and loaded" after a delay drawn from the class model
(:mod:`slmops.fleet.sim.classes`); it then serves, and the device reports per window what the model says it
served: requests, TTFT and ITL histograms in the fleet's buckets, tokens/s, golden score, memory. A load failure is
reported against the release that failed (``Window.release``) while the device keeps serving the one before.

The devices of one process share one aiohttp session (one connection pool) and one :class:`Shared` state: the
control plane's address, timing, the new release's name, the faults, counters and the activation log from which
the runner measures convergence. aiohttp, not httpx: on two cores httpx's client manages ~200 requests/s, aiohttp
2,500-3,200 (docs/fleet.md).

Independently of the trust code, every activation is checked against what the device saw before: a document older
than one it accepted, one that had expired by its clock, or one of the injected bad documents (replayed, forged,
expired) that was accepted counts as a violation. A correct run has none.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from slmops.api.fleet import DesiredState, EnrolRequest, ReportRequest, Running, Window
from slmops.fleet import deviceauth
from slmops.fleet.deviceauth import DeviceKey
from slmops.fleet.metadata import Refused
from slmops.fleet.sim import classes
from slmops.fleet.sim.faults import Behaviour, Faults

PREFIX = "/fleet/v1"
POLL, REPORT, SESSION, ENROL = (PREFIX + p for p in ("/device/desired", "/device/reports", "/device/session",
                                                     "/enrol"))
RENEW_AT = 0.8  # share of a session's lifetime after which it is renewed (as the device client does)
MAX_WINDOWS = 64  # per report (api.fleet.ReportRequest)
_JSON = {"Content-Type": "application/json"}
_TIMED = {POLL: "poll", REPORT: "report"}
SERVER_TIME = "Slmops-Server-Time"  # routes_device.SERVER_TIME: the control plane's clock on a clock-skew refusal


@dataclass(frozen=True)
class Timing:
    poll_s: float = 2.0  # between polls, each drawn in +-20% (jitter)
    report_s: float = 2.0  # report window length
    first_window_s: float = 2.0  # the first window after a switch is reported this soon (the health window)
    delay_scale: float = 1.0  # the class model's pull and load times are multiplied by this
    http_timeout_s: float = 60.0


@dataclass
class Activation:
    """A change of what a device runs (``activated``), a document that told it to keep what it runs after it had
    been told something else (``kept``: a reverted device that never took the new release), or a failed load."""

    at: float  # true time
    device: int
    hardware_class: str
    release: str | None  # what it runs from now on (the release that failed, for ``failed``)
    previous: str | None
    version: int
    kind: str = "activated"  # activated | kept | failed


@dataclass
class Shared:
    """What the devices of one process share; the runner reads the counters, the log and ``running``."""

    session: aiohttp.ClientSession
    url: str
    timing: Timing
    faults: Faults
    new_release: str = ""  # NAME:VERSION being rolled out (set by the runner when it starts the rollout)
    rollout_started: float | None = None  # true time the rollout started
    reverted: set[str] = field(default_factory=set)  # classes whose revert the runner has seen in the ledger
    returners_left: dict[str, int] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    log: list[Activation] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    verify_cpu_s: float = 0.0  # CPU spent in the trust checks
    # during the rollout: seconds each poll and report took (connection wait included), and how late devices'
    # timers fired (this process's event loop lagging behind its devices)
    latency: dict[str, list[float]] = field(default_factory=lambda: {"poll": [], "report": []})
    lag: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    urls: dict[str, Any] = field(default_factory=dict)  # path -> parsed URL (parsed once, not per request)

    def __post_init__(self) -> None:
        from yarl import URL
        self.urls = {path: URL(self.url + path) for path in (POLL, REPORT, SESSION, ENROL)}


class SimDevice:
    """One device: identity, trust, what it runs, its report windows, and its life as one task (:meth:`run`)."""

    def __init__(self, index: int, hardware_class: str, behaviour: Behaviour, shared: Shared, seed: int):
        self.index = index
        self.cls = classes.CLASSES[hardware_class]
        self.behaviour = behaviour
        self.shared = shared
        self.rng = random.Random(seed)
        self.speed = classes.speed_factor(self.rng)
        self.key = DeviceKey.generate()
        self.device_id = ""
        self.trust: Any = None  # TrustStore over the root given at enrolment
        self.offset = 0.0  # learned: seconds to add to the local clock to match the control plane's
        self.token: str | None = None
        self._renew_at = 0.0
        self.etag: str | None = None
        self.running: str | None = None  # NAME:VERSION
        self.digest: str | None = None
        self.applied = 0  # desired version applied
        self.told: str | None = None  # the release the last accepted document named
        self.returner = False  # went offline after taking the new release, back once its class was reverted
        self.returned_at: float | None = None
        self.highest = 0  # highest version accepted
        self.first_doc: dict[str, Any] | None = None  # kept for the replay fault
        self.current_doc: dict[str, Any] | None = None  # the last one accepted
        self.attacked = False
        self.failed_version = 0  # a desired version whose release failed to load: not tried again
        self.windows: list[Window] = []  # closed, not yet reported
        self.window_start = 0.0
        self.next_report = 0.0
        self.online = True

    # -- clocks ----------------------------------------------------------------------------------------------
    def local(self) -> float:
        """The device's own clock: true time plus its fault's offset."""
        return time.time() + self.behaviour.clock_offset

    def now(self) -> float:
        """The control plane's time as the device believes it (its clock plus the offset it learned)."""
        return self.local() + self.offset

    # -- enrolment and sessions ------------------------------------------------------------------------------
    async def enrol(self, token: str, tags: dict[str, str]) -> None:
        body = EnrolRequest(token=token, public_key=self.key.public_b64, proof=self.key.prove(token),
                            name=f"sim-{self.index:05d}", hardware=self.cls.profile, agent_version="sim",
                            tags=tags)
        status, data, _ = await self._http("POST", ENROL, body.model_dump_json().encode(), _JSON)
        if status != 200:
            raise RuntimeError(f"enrolment of sim-{self.index:05d} answered {status}: {data[:200]!r}")
        answer = json.loads(data)
        self.device_id = answer["device_id"]
        self.trust = trust_store(answer.get("trust_root"))

    async def _signed(self, method: str, path: str, body: bytes, headers: dict[str, str] | None = None
                      ) -> tuple[int, bytes, Any]:
        """A request signed with the device key, sent again once with the offset a clock-skew answer teaches."""
        for attempt in (1, 2):
            auth = self.key.authorization(self.device_id, method, path, body, int(self.now()))
            self.shared.counts["signed"] += 1
            status, data, answer = await self._http(method, path, body, {**(headers or {}), "Authorization": auth})
            skew = answer.get(SERVER_TIME) if status == 401 else None
            if attempt == 1 and skew and 'error="clock_skew"' in answer.get("WWW-Authenticate", ""):
                self.offset = deviceauth.server_time_offset(skew, self.local())
                self.shared.counts["clock_corrected"] += 1
                continue
            return status, data, answer
        raise AssertionError("unreachable")

    async def _session(self) -> str:
        if self.token is not None and self.now() < self._renew_at:
            return self.token
        status, data, _ = await self._signed("POST", SESSION, b"")
        if status != 200:
            raise DeviceError(f"session refused ({status}): {data[:200]!r}")
        answer = json.loads(data)
        now = self.now()
        self.token = f"{deviceauth.SESSION_SCHEME} {answer['token']}"
        self._renew_at = now + RENEW_AT * max(0.0, answer["expires_at"] - now)
        self.shared.counts["sessions"] += 1
        return self.token

    async def _device(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, Any]:
        """A poll or report with the session token; on a 401, signed instead (which works or says why)."""
        token = await self._session()
        status, data, answer = await self._http(method, path, body, {**headers, "Authorization": token})
        if status != 401:
            return status, data, answer
        self.token = None
        return await self._signed(method, path, body, headers)

    async def _http(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, Any]:
        t0 = time.monotonic()
        async with self.shared.session.request(method, self.shared.urls[path], data=body or None,
                                               headers=headers) as r:
            answer = r.status, await r.read(), r.headers
        timed = _TIMED.get(path)
        if timed is not None and self.shared.rollout_started is not None:
            self.shared.latency[timed].append(time.monotonic() - t0)
        return answer

    # -- the device's life -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Poll, apply, report until the run stops; network errors and refusals are counted and retried later."""
        while self.token is None and not self.shared.stop.is_set():  # learns the clock offset too
            await self._guarded(self._session())
            if self.token is None:
                await asyncio.sleep(1)
        start = time.time()
        self.window_start = self.now()
        self.next_report = start + self.rng.uniform(0, self.shared.timing.report_s)
        next_poll = start + self.rng.uniform(0, self.shared.timing.poll_s)
        while not self.shared.stop.is_set():
            await self._maybe_go_offline()
            if time.time() >= next_poll:
                await self._guarded(self.poll())
                next_poll = time.time() + self.shared.timing.poll_s * self.rng.uniform(0.8, 1.2)
            if time.time() >= self.next_report:
                await self._guarded(self.report())
            wake = min(next_poll, self.next_report)
            await asyncio.sleep(max(0.0, wake - time.time()))
            if self.shared.rollout_started is not None:
                self.shared.lag.append(max(0.0, time.time() - wake))

    async def _guarded(self, work: Any) -> None:
        try:
            await work
        except (aiohttp.ClientError, TimeoutError, DeviceError) as err:
            self.shared.counts[f"error:{type(err).__name__}"] += 1

    async def _maybe_go_offline(self) -> None:
        """The offline fault: drop off for a while at the drawn moment of the rollout, once."""
        b, started = self.behaviour, self.shared.rollout_started
        if b.offline_at is None or started is None or not self.online or time.time() < started + b.offline_at:
            return
        await self._offline(lambda: time.time() >= started + b.offline_at + b.offline_for)  # type: ignore[operator]
        self.behaviour = Behaviour(clock_offset=b.clock_offset, replay=b.replay)  # once

    async def _offline(self, until: Any) -> None:
        """No requests until ``until()``; the device keeps serving, so its windows keep closing (queued)."""
        self.online = False
        self.shared.counts["offline"] += 1
        while not until() and not self.shared.stop.is_set():
            await asyncio.sleep(0.2)
            if time.time() >= self.next_report:
                await self.report()
        self.online = True
        self.shared.counts["back_online"] += 1
        self.next_report = time.time()  # report what queued up at once

    # -- desired state ---------------------------------------------------------------------------------------
    async def poll(self) -> None:
        headers = {"If-None-Match": self.etag} if self.etag else {}
        status, data, answer = await self._device("GET", POLL, b"", headers)
        self.shared.counts[f"poll:{status}"] += 1
        if status != 200:
            return
        doc = json.loads(data)
        state = self.check(doc, self.local(), "served")
        if state is None:
            return
        self.etag = answer.get("ETag")
        self.current_doc = doc
        if self.first_doc is None:
            self.first_doc = doc
        await self.apply(state)

    def check(self, doc: dict[str, Any], clock: float, kind: str) -> DesiredState | None:
        """The document as the agent's trust code judges it at device time ``clock``; None when refused."""
        t0 = time.process_time()
        try:
            state = self.trust.check(doc, self.device_id, clock)
        except Refused as err:
            self.shared.counts[f"refused:{kind}:{err.reason}"] += 1
            return None
        finally:
            self.shared.verify_cpu_s += time.process_time() - t0
        self.shared.counts["verified"] += 1
        if kind != "served":
            self._violation(kind, state, "an injected bad document was accepted")
        elif state.version < self.highest:
            self._violation("older", state, f"accepted version {state.version} after {self.highest}")
        elif state.expires is None or state.expires <= clock:
            self._violation("expired", state, f"accepted a document expired at {state.expires}")
        return state

    def _take(self, version: int) -> None:
        """Record a document as taken (activated, or acknowledged as changing nothing): from now on the trust
        store refuses anything older."""
        self.applied = max(self.applied, version)
        self.highest = max(self.highest, version)
        self.trust.accept(version)

    def _violation(self, kind: str, state: DesiredState, what: str) -> None:
        self.shared.violations.append({"device": self.device_id, "kind": kind, "version": state.version,
                                       "release": state.release.release if state.release else None, "what": what})

    async def apply(self, state: DesiredState) -> None:
        """Take the desired release: nothing to do, a modelled pull and load, or a load failure reported."""
        target = state.release
        wanted = target.release if target else None
        told, self.told = self.told, wanted
        if wanted == self.running or state.version == self.failed_version:
            if wanted == self.running and told != wanted and told is not None:
                self.shared.log.append(Activation(time.time(), self.index, self.cls.name, wanted, told,
                                                  state.version, "kept"))
            self._take(state.version)
            return
        new = wanted == self.shared.new_release
        pull, load = classes.delay(self.rng, self.cls.pull_s), classes.delay(self.rng, self.cls.load_s)
        await asyncio.sleep(self.shared.timing.delay_scale * (pull + load))
        if self.shared.stop.is_set():
            return
        at = self.now()
        self._close_window(at)
        if target is not None and self.shared.faults.fails_to_load(self.cls.name, new):
            self.failed_version = state.version  # not tried again, and the trust floor stays (TrustStore.accept)
            self.windows.append(Window(start=at, end=at + 0.001, release=wanted, load_failures=1))
            self.window_start = at + 0.001
            self.shared.log.append(Activation(time.time(), self.index, self.cls.name, wanted, self.running,
                                              state.version, "failed"))
        else:
            self.shared.log.append(Activation(time.time(), self.index, self.cls.name, wanted, self.running,
                                              state.version))
            self.running, self.digest = wanted, target.manifest_digest if target else None
            self._take(state.version)
        self.next_report = time.time()  # tell the control plane at once
        await self._guarded(self.report())
        self.next_report = time.time() + min(self.shared.timing.first_window_s, self.shared.timing.report_s)
        if new and self.running == wanted:
            await self._after_taking_new()

    async def _after_taking_new(self) -> None:
        """Faults that start once the device runs the new release: replayed, forged and expired documents, and
        the returner that goes offline until its class was reverted."""
        if self.behaviour.replay and not self.attacked and self.first_doc is not None:
            self.attacked = True
            self.attack()
        left = self.shared.returners_left.get(self.cls.name, 0)
        if left > 0:  # goes offline once it has reported a window on the new release (see report)
            self.shared.returners_left[self.cls.name] = left - 1
            self.returner = True

    async def _leave_until_reverted(self) -> None:
        """The returner: offline from its first report about the new release (so its class's gates have its
        numbers) until its class was reverted, then back."""
        cls = self.cls.name
        await self._offline(lambda: cls in self.shared.reverted)
        self.returned_at = time.time()

    def attack(self) -> None:
        """Feed the device an older signed document, a forged newer one and an expired one: all must be refused
        (a refusal leaves the device as it is)."""
        assert self.first_doc is not None
        counts = self.shared.counts
        for kind, doc, clock in self._bad_documents():
            counts[f"attack:{kind}"] += 1
            state = self.check(doc, clock, kind)
            if state is not None:  # accepted: it would be activated, which the violation already counts
                counts[f"attack_accepted:{kind}"] += 1

    def _bad_documents(self) -> list[tuple[str, dict[str, Any], float]]:
        first = self.first_doc or {}
        out = [("replayed", first, self.local())]
        current = self.current_doc
        if current is not None:
            forged = json.loads(json.dumps(current))
            signed = forged.get("signed", forged)
            signed["version"] = int(signed.get("version", 0)) + 1
            if isinstance(signed.get("release"), dict):
                signed["release"]["release"] = (first.get("signed", first).get("release") or {}).get("release")
            out.append(("forged", forged, self.local()))
            expires = current.get("signed", current).get("expires")
            if expires is not None:
                out.append(("expired", current, float(expires) + 1))
        return out

    # -- reports ---------------------------------------------------------------------------------------------
    def _close_window(self, end: float) -> None:
        seconds = end - self.window_start
        if seconds <= 0:
            return
        if self.running is None:
            self.window_start = end
            return
        serving = self.shared.faults.serving(self.cls.name, self.running == self.shared.new_release)
        n = classes.window(self.rng, serving, self.speed, seconds)
        self.windows.append(Window(  # its release named: a window sent after a switch is about the one before
            start=self.window_start, end=end, release=self.running, requests=n.requests, errors=n.errors,
            ttft_p50_ms=n.ttft.quantile(0.5), ttft_p95_ms=n.ttft.quantile(0.95), itl_p50_ms=n.itl.quantile(0.5),
            itl_p95_ms=n.itl.quantile(0.95), tokens_per_s=n.tokens_per_s, golden_score=n.golden_score,
            memory_bytes=n.memory_bytes, ttft_hist=n.ttft.to_wire(), itl_hist=n.itl.to_wire()))
        self.window_start = end

    async def report(self) -> None:
        """Close the window; send every window not sent yet (offline: keep them for when it is back)."""
        self.next_report = time.time() + self.shared.timing.report_s
        self._close_window(self.now())
        if not self.online:
            return
        windows = self.windows[-MAX_WINDOWS:]
        body = ReportRequest(running=Running(release=self.running, manifest_digest=self.digest), health="ok",
                             desired_version=self.applied, windows=windows).model_dump_json(exclude_none=True)
        status, _, headers = await self._device("POST", REPORT, body.encode(), _JSON)
        self.shared.counts[f"report:{status}"] += 1
        if status == 202:
            self.windows = self.windows[:-len(windows)] if windows else self.windows
            if len(self.windows) > 4 * MAX_WINDOWS:  # offline for long: keep the newest
                del self.windows[:-4 * MAX_WINDOWS]
            if self.returner and self.returned_at is None and any(
                    w.release == self.shared.new_release and w.requests for w in windows):
                await self._leave_until_reverted()
        elif status == 503:
            self.next_report = time.time() + float(headers.get("Retry-After", "1"))


class DeviceError(Exception):
    """A device request refused in a way the device cannot fix by itself (counted, retried later)."""


def trust_store(root: dict[str, Any] | None) -> Any:
    """The agent's own trust store (its checks, not a copy of them) over the root a device was enrolled with,
    kept in memory (no folder)."""
    from slmops.fleet.agent.trust import TrustStore

    if root is None:
        raise RuntimeError("the control plane sent no trust root at enrolment: it does not sign desired state")
    return TrustStore(root, 0, None)
