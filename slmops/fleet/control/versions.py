"""Devices' desired versions, moved in batches: one write transaction for every device whose state changed since
the last one, not one per device.

A device's version moves forward exactly when the hash of its desired state changes (``desired``). After a wave
is assigned, thousands of devices poll within one poll interval and each needs its version moved before its new
document can be signed; one transaction each queued them all on SQLite's single writer (and behind the report
batcher's transactions): at 10,000 simulated devices, about 45 devices a second got their new document and polls
waited past a minute. Here polls wait for the next batch instead (``interval``, 10 ms), and a batch of hundreds
costs about what one transaction did.

A device appears once per batch: a second request for it with another hash (a change came in between) waits for
the next batch, so each request is answered with the version its own hash was given. Rows are updated in id
order, so two replicas' batches on PostgreSQL lock them in the same order and never deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from sqlalchemy import bindparam, select, update

from slmops.fleet.control.db import Database
from slmops.fleet.control.models import Device
from slmops.types.errors import Unauthenticated

log = logging.getLogger("slmops.fleet")
_devices = Device.__table__
_MOVE = (update(_devices)
         .where(_devices.c.id == bindparam("b_id"), _devices.c.desired_hash != bindparam("b_hash"))
         .values(desired_version=_devices.c.desired_version + 1, desired_hash=bindparam("b_hash")))


class VersionAdvancer:
    def __init__(self, db: Database, interval: float = 0.01, most: int = 2000):
        self.db = db
        self.interval = interval  # a poll waits at most this long for its batch to start
        self.most = most  # devices per transaction
        self.batches = 0  # transactions written
        self._waiting: dict[tuple[str, str], list[asyncio.Future[int]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flying: dict[tuple[str, str], list[asyncio.Future[int]]] = {}  # the batch being written

    async def advance(self, device_id: str, digest: str) -> int:
        """Move the device's version one step for a state hashing to ``digest`` (unless a replica already did)
        and return the version that state now has."""
        if self._task is None:  # not running (a tool outside the app): one transaction of its own
            return (await self._write([(device_id, digest)]))[device_id]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((device_id, digest), []).append(future)
        self._wake.set()
        return await future

    def _take(self) -> dict[tuple[str, str], list[asyncio.Future[int]]]:
        """The next batch: at most ``most`` devices, each once, first come first served."""
        batch: dict[tuple[str, str], list[asyncio.Future[int]]] = {}
        devices: set[str] = set()
        for key in list(self._waiting):
            if len(batch) >= self.most:
                break
            if key[0] not in devices:
                devices.add(key[0])
                batch[key] = self._waiting.pop(key)
        return batch

    async def _write(self, entries: list[tuple[str, str]]) -> dict[str, int]:
        entries = sorted(entries)
        async with self.db.write(bump=False) as s:
            await s.execute(_MOVE, [{"b_id": i, "b_hash": h} for i, h in entries])
            rows = await s.execute(select(_devices.c.id, _devices.c.desired_version)
                                   .where(_devices.c.id.in_([i for i, _ in entries])))
            return {i: int(v) for i, v in rows}

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.interval)  # let the polls of this moment join the batch
            self._wake.clear()
            while self._waiting:
                batch = self._flying = self._take()
                try:
                    versions = await self._write(list(batch))
                except Exception as err:  # noqa: BLE001 - each waiting poll fails (500) rather than hangs
                    log.warning("moving %d desired versions failed: %s", len(batch), err)
                    for futures in batch.values():
                        for f in futures:
                            if not f.done():
                                f.set_exception(err)
                    continue
                self.batches += 1
                for (device_id, _), futures in batch.items():
                    for f in futures:
                        if not f.done():
                            if device_id in versions:
                                f.set_result(versions[device_id])
                            else:
                                f.set_exception(Unauthenticated(f"device {device_id} is not enrolled with this "
                                                                "control plane; enrol it again"))
                self._flying = {}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[VersionAdvancer]:
        self._task = asyncio.create_task(self._run(), name="fleet-desired-versions")
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            for futures in (*self._waiting.values(), *self._flying.values()):
                for f in futures:
                    f.cancel()
            self._waiting.clear()
