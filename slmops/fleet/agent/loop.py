"""The edge agent's loop: poll the desired state, apply it through A/B slots, watch the health window, report.

Each cycle: a poll when one is due, with the ETag last applied (a 304 costs the control plane nothing), its
document checked by the device's trust store before anything is acted on; then the health window of a recent
switch, the report window, and the queued reports. Poll intervals carry jitter (±20% by default) so a fleet
restarted together does not poll in step, and grow (doubling, up to ``backoff_max_s``) while the control plane
cannot be reached or refuses the device; the served model keeps serving meanwhile, and windows queue (bounded,
persisted) until the control plane answers again.

Applying a release (a document whose release the device does not serve yet):

1. stage it in the idle slot (:mod:`.staging`: digest-pinned pull of only the missing blobs, checks), unless that
   slot already holds the same manifest (a release pointing back at the previous one: no pull);
2. warm-load it in the running server under its hidden slot name;
3. run its golden prompts (:mod:`.smoke`); below the threshold the release does not serve: the served name never
   moved, the failure is reported as a window about that release (``load_failures`` or ``golden_score``) with
   health ``failing``, and the same release is not tried again for ``retry_failed_s``;
4. switch: one ``PUT /api/slots/{served}``; requests in flight finish on the old slot, the next ones get the new
   (the release's first report window carries its smoke score, which ``golden_score`` gates read);
5. the health window: the old slot stays loaded for ``health_window_s``; load failures or crashes of the new
   model, or an error rate above ``max_error_rate``, switch back to it (and count as the release's failure);
   otherwise it is unloaded (kept in the store, so a later revert to it needs no pull).

A document pointing back at the release the old slot still holds (a revert) switches back at once. A document
whose release is already served (by manifest digest) only relabels the slot. Refused documents (:mod:`.trust`)
activate nothing and never stop serving. Transient failures (registry or local server unreachable) leave the
document unapplied, to be tried on the next cycle; everything applied is recorded in :mod:`.state` first.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slmops.api.fleet import DesiredState, ReleaseTarget, ReportRequest, Running, Window
from slmops.client.local import LocalClient
from slmops.fleet import privacy
from slmops.fleet.agent import feedback, smoke, telemetry
from slmops.fleet.agent.staging import Stager
from slmops.fleet.agent.state import QUEUE_LIMIT, AgentState, Pending, SlotState, state_file
from slmops.fleet.agent.telemetry import Counters
from slmops.fleet.agent.trust import Refused
from slmops.types.errors import NotFound, SlmopsError, SourceError
from slmops.types.name import ModelName

if TYPE_CHECKING:
    from slmops.client.device import DeviceClient
    from slmops.fleet.agent.trust import TrustStore

log = logging.getLogger("slmops.agent")


@dataclass(frozen=True)
class AgentOptions:
    poll_interval_s: float = 30.0
    jitter: float = 0.2  # each wait is off by up to this share, either way
    window_s: float = 60.0  # report window
    health_window_s: float = 120.0  # the old slot is kept this long after a switch
    smoke_threshold: float = 1.0  # share of golden prompts that must pass
    max_error_rate: float = 0.1  # of the new model's requests in the health window
    backoff_max_s: float = 300.0
    retry_failed_s: float = 3600.0  # a release that failed here is not tried again before this
    queue_limit: int = QUEUE_LIMIT
    report_batch: int = 64  # windows per report (the control plane's limit)


class Agent:
    def __init__(self, control: DeviceClient, local: LocalClient, stager: Stager, trust: TrustStore | None,
                 home: Path, options: AgentOptions = AgentOptions(), clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random):
        """``home``: SLMOPS_HOME, shared with ``slmops serve`` (the agent's state, the privacy opt-in)."""
        self.control = control
        self.local = local
        self.stager = stager
        self.trust = trust
        self.home = home
        self.state_path = state_file(home)
        self.options = options
        self.clock = clock
        self.rng = rng
        self.state = AgentState.load(self.state_path)
        self.failures = 0  # control-plane requests failed in a row
        self._base: Counters | None = None  # the active model's counters when its window began
        self._health_base: Counters | None = None  # ... when it started serving (health window)
        self._golden: float | None = None  # the smoke test's score, for the first window of a release switched to
        self._unloading: dict[str, asyncio.Task[None]] = {}  # model -> its unload under way
        self._window_start = clock()
        self.next_poll = 0.0  # when the control plane is asked next (device clock; backed off while it fails)

    # -- running -----------------------------------------------------------------------------------------------
    async def run(self, once: bool = False) -> None:
        """Cycle until cancelled; ``once``: restore, one cycle with its window closed and reported, return."""
        await self.restore()
        try:
            while True:
                wait = await self.cycle(final=once)
                if once:
                    return
                await asyncio.sleep(wait)
        finally:
            await self.settle()

    async def settle(self) -> None:
        """Wait for the unloads under way (each waits for the requests still running on its model)."""
        if self._unloading:
            await asyncio.gather(*self._unloading.values(), return_exceptions=True)

    async def cycle(self, final: bool = False) -> float:
        """A poll (and apply) when one is due, the health check, the report window, and the reports while the
        control plane answers; the seconds to wait before the next cycle."""
        polled = final or self.clock() >= self.next_poll
        changed = await self.poll() if polled else False
        if polled:
            self.next_poll = self.clock() + self._poll_delay()
        try:
            await self.check_health()
        except SlmopsError as err:  # the local server is away: the next cycle looks again
            self._note_error(f"health check: {err}")
        await self.close_window(force=final)
        if self.failures == 0 and (changed or final or self.state.queue):
            await self.send_reports()
        if polled and self.failures == 0:
            await self._upload_feedback()
        return self.next_wait()

    async def restore(self) -> None:
        """After a (re)start: the server serves the active slot again if it lost it; counting starts now."""
        slot = self.state.slot(self.state.active)
        if slot is not None and self.state.served:
            try:
                current = {s.served: s.model for s in await self.local.slots()}
                if current.get(_display(self.state.served)) != slot.model:
                    await self.local.put_slot(self.state.served, slot.model, slot.release)
                    log.info("served name %s restored to %s (%s)", self.state.served, slot.model, slot.release)
            except SlmopsError as err:
                log.warning("could not restore the served slot: %s", err)
        self._base = await self._counters()
        self._health_base = self._base
        self._window_start = self.clock()

    # -- polling and applying ----------------------------------------------------------------------------------
    async def poll(self) -> bool:
        """Poll and apply; True when what the device runs or reports changed."""
        try:
            doc, etag = await self.control.desired(self.state.etag, trust=self.trust)
        except Refused as err:  # activates nothing; the device keeps serving what it runs
            self._note_error(f"desired state refused ({err.reason}): {err}")
            return False
        except SlmopsError as err:
            self.failures += 1
            self._note_error(f"control plane: {err}")
            return False
        self.failures = 0
        self.state.last_poll = self.clock()
        if doc is None:
            return False
        try:
            return await self.apply(doc, etag)
        except SlmopsError as err:  # the local server went away mid-way: applied again on the next poll
            self._note_error(f"applying desired version {doc.version}: {err}")
            return False

    async def apply(self, doc: DesiredState, etag: str | None) -> bool:
        """Bring the device to ``doc``; the document counts as applied unless a transient failure says to try
        again (then False and nothing recorded)."""
        target = doc.release
        if target is not None:
            served = str(doc.config.get("model") or target.release.partition(":")[0])
            done = await self._apply_target(target, served)
            if done is None:
                return False
            if done:
                self.state.health = "ok"
        privacy.apply(self.home, doc.config)  # the blueprint's opt-in for rated feedback, for the server
        self.state.applied_version, self.state.etag = doc.version, etag
        if self.trust is not None:
            self.trust.accept(doc.version)
        self._save()
        return True

    async def _apply_target(self, target: ReleaseTarget, served: str) -> bool | None:
        """True: serving ``target``; False: it failed here (reported); None: try again later."""
        s = self.state
        holder = s.holding(target.manifest_digest)
        if holder is not None and holder == s.active:
            current = s.slots[holder]
            if current.release != target.release or _display(s.served or "") != _display(served):
                await self._point(served, holder, target.release)
            return True
        if holder is not None and s.pending is not None and holder == s.pending.previous:
            await self._switch_back(f"the desired state points back at {target.release}")
            await self._point(served, holder, target.release)
            return True
        failed_at = s.failed.get(_key(target))
        if failed_at is not None and self.clock() - failed_at < self.options.retry_failed_s:
            return False  # reported when it failed; not tried again yet
        return await self._bring_up(target, served)

    async def _bring_up(self, target: ReleaseTarget, served: str) -> bool | None:
        """Stage (unless the idle slot holds it), warm-load, smoke-test, switch."""
        slot, started = self.state.idle, self.clock()
        model = await self._stage(target, slot, started)
        if model is None or model is False:
            return model
        if model in self._unloading:  # back to a model being unloaded: let that finish, then load it again
            await self._unloading[model]
        try:
            await self.local.load(model)
        except SourceError as err:
            self._note_error(f"local server: {err}")
            return None
        except SlmopsError as err:
            return self._failed(target, started, f"did not load: {err}", load_failures=1)
        result = await smoke.run(target.golden, lambda p, n: self.local.chat(model, p, n),
                                 self.options.smoke_threshold)
        if not result.passed:
            await self._unload(model)
            return self._failed(target, started, result.describe(), golden_score=result.score,
                                errors=result.errors)
        await self._switch_to(served, slot, target.release)
        self._golden = result.score
        log.info("release %s %s; %s now serves %s", target.release, result.describe(), served, model)
        return True

    async def _stage(self, target: ReleaseTarget, slot: str, started: float) -> str | bool | None:
        """The idle slot's model holding ``target`` (staged now unless it is there already); False when the
        release must not run here (reported), None to try again later."""
        s = self.state
        held = s.slot(slot)
        if held is not None and held.digest == target.manifest_digest:
            s.slots[slot] = SlotState(held.model, target.release, held.digest)
            return held.model
        if s.pending is not None:  # the idle slot still backs a recent switch: that window ends now
            await self._end_health_window()
        try:
            name = await asyncio.to_thread(self.stager.stage, target, slot, held.model if held else None)
        except (SourceError, OSError) as err:  # the registry is away, the disk full: worth another try
            self._note_error(f"pulling {target.release}: {err}")
            return None
        except SlmopsError as err:
            return self._failed(target, started, f"cannot be staged: {err}", load_failures=1)
        s.slots[slot] = SlotState(name.display, target.release, target.manifest_digest)
        self._save()
        return name.display

    async def _switch_to(self, served: str, slot: str, release: str) -> None:
        """Serve ``slot`` under ``served``: the window of the release serving until now closes first."""
        await self.close_window(force=True)
        s = self.state
        previous = s.active
        await self._point(served, slot, release)
        s.active = slot
        s.pending = Pending(release, self.clock(), previous)
        s.health = "ok"
        self._base = self._health_base = await self._counters()
        self._window_start = self.clock()
        self._save()

    async def _point(self, served: str, slot: str, release: str) -> None:
        """The server's slot table: ``served`` -> ``slot``'s model, labelled ``release`` (and a served name the
        device used before, if another, no longer served)."""
        s = self.state
        held = s.slots[slot]
        s.slots[slot] = SlotState(held.model, release, held.digest)
        await self.local.put_slot(served, held.model, release)
        if s.served and _display(s.served) != _display(served):
            try:
                await self.local.delete_slot(s.served)
            except NotFound:
                pass
        s.served = served
        self._save()

    def _failed(self, target: ReleaseTarget, started: float, why: str, **numbers: float | None) -> bool:
        """Record and report a release that will not serve here; the device keeps serving what it served."""
        log.warning("release %s %s", target.release, why)
        now = self.clock()
        self.state.failed[_key(target)] = now
        self.state.health = "failing"
        self._queue(telemetry.failure_window(started, now, target.release, **numbers))  # type: ignore[arg-type]
        self._save()
        return False

    # -- the health window -------------------------------------------------------------------------------------
    async def check_health(self) -> None:
        """During a health window: switch back on failures of the new model, or end the window once it passed."""
        pending = self.state.pending
        if pending is None:
            return
        active = self.state.slot(self.state.active)
        counts = (await self._counters()).minus(self._health_base) if active is not None else Counters()
        crashes = sum(counts.failures.get(kind, 0) for kind in ("load", "oom", "crash"))
        requests = counts.finished + counts.errors
        if crashes or (counts.errors and counts.errors > self.options.max_error_rate * requests):
            why = (f"{crashes} load failure(s), out-of-memory kill(s) or crash(es)" if crashes else
                   f"{counts.errors} of {requests} requests failed") + " in its health window"
            if pending.previous is not None:
                self.state.failed[f"{pending.release}@{active.digest if active else ''}"] = self.clock()
                await self._switch_back(why)
            else:
                log.warning("release %s: %s; no previous release to go back to", pending.release, why)
                self.state.pending = None
            self.state.health = "failing"
            self._save()
        elif self.clock() - pending.since >= self.options.health_window_s:
            await self._end_health_window()

    async def _switch_back(self, why: str) -> None:
        """Serve the previous slot again (still loaded, still in the store); the other one is unloaded."""
        s = self.state
        pending = s.pending
        assert pending is not None and pending.previous is not None
        leaving = s.slot(s.active)
        await self.close_window(force=True)  # the numbers of the release that is leaving
        back = s.slots[pending.previous]
        await self.local.put_slot(s.served or "", back.model, back.release)
        log.warning("switched %s back to %s (%s): %s", s.served, back.model, back.release, why)
        s.active, s.pending = pending.previous, None
        if leaving is not None:
            await self._unload(leaving.model)
        self._base = self._health_base = await self._counters()
        self._window_start = self.clock()
        self._save()

    async def _end_health_window(self) -> None:
        """The new release held: the old slot is unloaded, its model kept in the store for a revert."""
        pending = self.state.pending
        self.state.pending = None
        old = self.state.slot(pending.previous) if pending else None
        if old is not None:
            await self._unload(old.model)
            log.info("release %s passed its health window; %s unloaded", pending.release if pending else "", old.model)
        self._save()

    # -- telemetry and reports ---------------------------------------------------------------------------------
    async def close_window(self, force: bool = False) -> bool:
        """Queue the window of the serving model once it is ``window_s`` long (or now, with ``force``)."""
        now = self.clock()
        if not force and now - self._window_start < self.options.window_s:
            return False
        active = self.state.slot(self.state.active)
        if active is None:
            self._window_start = now
            return False
        counters = await self._counters()
        memory = await self._memory()
        self._queue(telemetry.window(self._window_start, now, active.release, counters.minus(self._base),
                                     memory=memory, golden_score=self._golden))
        self._base, self._window_start, self._golden = counters, now, None
        self._save()
        return True

    async def send_reports(self) -> None:
        """Send the queued windows (in batches) with what the device runs; kept for later when that fails."""
        s = self.state
        while True:
            batch = s.queue[:self.options.report_batch]
            active = s.slot(s.active)
            running = Running(release=active.release, manifest_digest=active.digest, slot=s.active) if active \
                else Running()
            report = ReportRequest(running=running, health=s.health, desired_version=s.applied_version,
                                   windows=[Window.model_validate(w) for w in batch])
            try:
                await self.control.report(report)
            except SlmopsError as err:
                self.failures += 1
                self._note_error(f"report: {err}")
                return
            del s.queue[:len(batch)]
            self._save()
            if not s.queue:
                return

    def _poll_delay(self) -> float:
        """The poll interval, doubled per failure in a row up to the cap, off by up to ``jitter`` either way."""
        o = self.options
        delay = min(o.backoff_max_s, o.poll_interval_s * 2 ** min(self.failures, 16))
        return delay * (1 + o.jitter * (2 * self.rng() - 1))

    def next_wait(self) -> float:
        """Seconds to the next cycle: the next poll, or sooner when the report or health window ends."""
        now = self.clock()
        ends = [self.next_poll, self._window_start + self.options.window_s]
        if self.state.pending is not None:
            ends.append(self.state.pending.since + self.options.health_window_s)
        return max(0.05, min(ends) - now)

    # -- helpers -----------------------------------------------------------------------------------------------
    async def _counters(self) -> Counters:
        """The serving model's counters now; zeros when the server cannot say (the next scrape catches up)."""
        active = self.state.slot(self.state.active)
        if active is None:
            return Counters()
        try:
            return telemetry.parse(await self.local.metrics()).get(active.model, Counters())
        except SlmopsError as err:
            log.warning("could not read the local server's metrics: %s", err)
            return Counters()

    async def _memory(self) -> int | None:
        try:
            models = await self.local.ps()
        except SlmopsError:
            return None
        served = _display(self.state.served or "")
        return next((int(m.get("size", 0)) for m in models if m.get("name") == served), None)

    async def _upload_feedback(self) -> None:
        """Rated feedback, only where the blueprint opted in (:mod:`.feedback` decides); kept for later on failure."""
        try:
            await feedback.upload_pending(self.control, self.home)
        except SlmopsError as err:
            self._note_error(f"feedback upload: {err}")

    async def _unload(self, model: str) -> None:
        """Unload ``model`` in the background: the server frees it once its requests in flight finish, which may
        take a while, and the loop must go on polling meanwhile."""
        async def unload() -> None:
            try:
                await self.local.unload(model)
            except SlmopsError as err:  # not loaded, or gone: nothing to free
                log.info("unloading %s: %s", model, err)
        def forget(done: asyncio.Task[None]) -> None:
            if self._unloading.get(model) is done:
                del self._unloading[model]

        task = asyncio.get_running_loop().create_task(unload())
        self._unloading[model] = task
        task.add_done_callback(forget)

    def _queue(self, window: Window) -> None:
        self.state.enqueue([window.model_dump()], self.options.queue_limit)

    def _note_error(self, message: str) -> None:
        if message != self.state.last_error:
            log.warning("%s", message)
        self.state.last_error = message
        self._save()

    def _save(self) -> None:
        self.state.save(self.state_path)


def _key(target: ReleaseTarget) -> str:
    return f"{target.release}@{target.manifest_digest}"


def _display(served: str) -> str:
    """A served name as the server's slot table spells it."""
    try:
        return ModelName.parse(served).display
    except SlmopsError:
        return served


__all__ = ["Agent", "AgentOptions"]
