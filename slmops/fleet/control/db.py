"""The control plane's database: an async SQLAlchemy engine on SQLite (default) or PostgreSQL, its sessions, and
the change version every mutation bumps.

SQLite is one file under ``SLMOPS_HOME`` and needs no set-up; PostgreSQL is for several replicas and scale. Both
go through the same code; where they differ (write locking, LISTEN/NOTIFY) the difference is here.

On PostgreSQL every bump also sends ``NOTIFY slmops_fleet_change, '<version>'``, delivered when the transaction
commits; ``changes.ChangeFeed`` listens for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import weakref
from pathlib import Path
from collections.abc import Collection
from typing import AsyncIterator

from sqlalchemy import delete, event, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from slmops.fleet.control.models import ChangeScope, Meta
from slmops.types.errors import ConfigError

CHANGE_KEY = "change_version"
CHANGE_CHANNEL = "slmops_fleet_change"  # PostgreSQL NOTIFY channel; the payload is the new change version
MIGRATE_LOCK = int.from_bytes(b"slmops:M", "big")  # pg_advisory_xact_lock key that queues replicas' migrations
_BUMP_NOTIFY = text(
    "WITH bumped AS (UPDATE meta SET value = value + 1 WHERE key = :key RETURNING value) "
    "SELECT value, pg_notify(:channel, value::text) FROM bumped"
)
SCOPES_KEPT = 1000  # change versions whose scope is kept; a replica further behind drops everything
# Alembic keeps the running migration in module globals: two migrations interleaved on one event loop (two
# databases, or two Database objects on one) would trample each other's, so they take turns per loop.
_migrating: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def database_url(configured: str, home: Path) -> str:
    """``SLMOPS_FLEET_DB``, or SQLite at ``SLMOPS_HOME/fleet.db``."""
    if configured:
        if not configured.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ConfigError("SLMOPS_FLEET_DB must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return configured
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{home / 'fleet.db'}"


class Database:
    def __init__(self, url: str):
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        kw: dict = {}
        if self.dialect == "postgresql":
            kw.update(pool_size=10, max_overflow=10)
        self.engine: AsyncEngine = create_async_engine(url, **kw)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._sqlite_writer = asyncio.Lock()  # SQLite has one writer; queueing here beats SQLITE_BUSY retries

    async def migrate(self) -> None:
        """Bring the schema up to date (Alembic ``upgrade head``) in one transaction. Replicas that start at once
        queue on a lock (PostgreSQL: an advisory lock; SQLite: the write lock); the later ones find nothing to do."""
        from slmops.fleet.control import migrations  # Alembic costs a third of a second to import: only here

        lock = self._sqlite_writer if self.dialect == "sqlite" else contextlib.nullcontext()
        turn = _migrating.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with turn, lock, self.engine.connect() as conn:
            if self.dialect == "sqlite":
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATE_LOCK})
            await conn.run_sync(migrations.upgrade)
            await conn.commit()

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as s:
            yield s

    read = session

    @contextlib.asynccontextmanager
    async def write(self, bump: bool = True, devices: Collection[str] | None = None) -> AsyncIterator[AsyncSession]:
        """One transaction, committed when the block ends and rolled back if it raises; ``bump``: mark a change
        (everything but telemetry), of ``devices`` only when given (:meth:`bump`). On SQLite, writers queue on a
        lock and take the database's write lock at BEGIN, so two writers never deadlock upgrading a read lock."""
        lock = self._sqlite_writer if self.dialect == "sqlite" else contextlib.nullcontext()
        async with lock, self._sessions() as s:
            if self.dialect == "sqlite":
                await s.execute(text("BEGIN IMMEDIATE"))
            try:
                yield s
                if bump:
                    await self.bump(s, devices)
                await s.commit()
            except BaseException:
                await s.rollback()
                raise

    async def bump(self, s: AsyncSession, devices: Collection[str] | None = None) -> int:
        """Mark a change in the caller's transaction, and return its version: replicas drop what they cached when
        they see it (on PostgreSQL they are also told, at commit, in one round trip with the update). With
        ``devices``, the change concerns those devices' desired states only (none: shared caches alone), which
        replicas learn from ``change_scopes``; without, it concerns everything."""
        if self.dialect == "postgresql":
            version = int((await s.execute(_BUMP_NOTIFY, {"key": CHANGE_KEY, "channel": CHANGE_CHANNEL})).first()[0])
        else:
            version = int((await s.execute(update(Meta).where(Meta.key == CHANGE_KEY).values(value=Meta.value + 1)
                                           .returning(Meta.value))).scalar_one())
        if devices is not None:
            await s.execute(insert(ChangeScope).values(version=version, devices=sorted(set(devices))))
            if version % 100 == 0:
                await s.execute(delete(ChangeScope).where(ChangeScope.version <= version - SCOPES_KEPT))
        return version

    async def scopes(self, after: int, upto: int) -> frozenset[str] | None:
        """The devices the changes after version ``after`` up to ``upto`` concern, or None when one of them
        concerns everything (or is no longer known, or the version went back: a restored backup)."""
        if upto <= after or upto - after > SCOPES_KEPT:
            return None
        async with self.session() as s:
            rows = (await s.execute(select(ChangeScope.devices).where(ChangeScope.version > after,
                                                                      ChangeScope.version <= upto))).scalars().all()
        if len(rows) != upto - after:
            return None
        return frozenset(d for row in rows for d in row)

    async def change_version(self) -> int:
        async with self.session() as s:
            return int((await s.execute(select(Meta.value).where(Meta.key == CHANGE_KEY))).scalar_one())

    async def close(self) -> None:
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=10000")
    _wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _wal(cur, tries: int = 100) -> None:  # type: ignore[no-untyped-def]
    """Switch a new database file to WAL, which two replicas starting together both try: SQLite answers one of
    them "database is locked" at once, without its busy timeout (the lock upgrade would deadlock), so it waits
    and tries again; the mode persists in the file, so later connections find it set."""
    for attempt in range(tries):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:  # raised as is through SQLAlchemy's aiosqlite adapter
            if "locked" not in str(err) or attempt == tries - 1:
                raise
            time.sleep(0.05)
