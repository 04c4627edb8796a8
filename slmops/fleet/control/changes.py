"""The change feed: tells a replica that another one (or itself) changed the fleet, so it drops what it cached.

Every mutation bumps ``meta.change_version`` in its own transaction (``Database.write``). On PostgreSQL the bump
also sends ``NOTIFY slmops_fleet_change`` with the new version, which a listening replica hears as soon as the
writer commits; the feed holds one plain asyncpg connection for it, outside the engine's pool, because a pooled
connection would carry its LISTEN to whoever borrowed it next. Notifications are lost while that connection is
down and never replayed, so the feed also polls the counter every ``interval`` (on SQLite polling is all there is).

``on_change(version, devices)`` is called on the event loop, once per version seen (several bumps between two
looks are one call), and must not block. ``devices`` is what the changes since the last call concern: a set of
device ids when each of them named its devices (``Database.bump``; read from ``change_scopes`` before the call),
else None, everything. A version that goes down (a restored backup) is a change of everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable

from slmops.fleet.control.db import CHANGE_CHANNEL, Database

OnChange = Callable[[int, "frozenset[str] | None"], None]

log = logging.getLogger("slmops.fleet")
_RECONNECT_S = (0.5, 5.0)  # first and longest wait before the LISTEN connection is made again


class ChangeFeed:
    def __init__(self, db: Database, on_change: OnChange, interval: float = 0.25):
        self.db = db
        self.on_change = on_change
        self.interval = interval
        self.version = 0  # the last version delivered
        self.listening = False  # PostgreSQL: the LISTEN connection is up
        self._wanted = 0  # the last version seen, delivered by _deliver once its scope is read
        self._wake = asyncio.Event()
        self._heard = 0  # notifications handled; a poll that overlapped one is stale
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> ChangeFeed:
        self.version = self._wanted = await self.db.change_version()
        self._tasks.append(asyncio.create_task(self._deliver(), name="fleet-change-deliver"))
        self._tasks.append(asyncio.create_task(self._poll(), name="fleet-change-poll"))
        if self.db.dialect == "postgresql":
            self._tasks.append(asyncio.create_task(self._listen(), name="fleet-change-listen"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def _seen(self, version: int) -> None:
        if version != self._wanted:
            self._wanted = version
            self._wake.set()

    async def _deliver(self) -> None:
        """Tell ``on_change`` of each version seen, with the devices the changes since the last one concern."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.version != self._wanted:
                version = self._wanted
                try:
                    devices = await self.db.scopes(self.version, version)
                except Exception as err:  # noqa: BLE001 - the database is away: drop everything rather than wait
                    log.warning("change feed: cannot read what change %d concerns: %s", version, err)
                    devices = None
                self.version = version
                try:
                    self.on_change(version, devices)
                except Exception:  # noqa: BLE001 - one bad subscriber must not stop the feed for the others
                    log.exception("change feed: on_change(%d) failed", version)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._look()
            except Exception as err:  # noqa: BLE001 - the database may be restarting; keep looking
                log.warning("change feed: cannot read the change version: %s", err)

    async def _look(self) -> None:
        heard = self._heard
        version = await self.db.change_version()
        if heard == self._heard:  # a notification that came in meanwhile may be newer than what this read saw
            self._seen(version)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._heard += 1
        try:
            version = int(payload)
        except ValueError:
            return
        if version > self._wanted:  # commits arrive in order, but never step back on a notification
            self._seen(version)

    async def _listen(self) -> None:
        """Hold a LISTEN connection, reconnecting with back-off; after each (re)connect, look once, since what was
        notified while down is gone."""
        import asyncpg

        args, kwargs = self.db.engine.dialect.create_connect_args(self.db.engine.url)
        delay = _RECONNECT_S[0]
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(*args, timeout=10, **kwargs)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANGE_CHANNEL, self._notified)
                self.listening, delay = True, _RECONNECT_S[0]
                await self._look()
                await lost.wait()
            except Exception as err:  # noqa: BLE001 - down, restarting, refusing: polling covers it meanwhile
                log.warning("change feed: LISTEN connection failed, polling meanwhile: %s", err)
            finally:
                self.listening = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_S[1])
