"""The control plane's data layer on real SQLite and a real PostgreSQL 15: Alembic migrations (up, down, and in
agreement with models.py), the hash-chained ledger and what tampering it notices, appends racing from two
replicas, and the change feed."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import subprocess
import sqlite3
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Awaitable, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fleet_db import fleet_db_url, postgres  # noqa: F401
from sqlalchemy import inspect, select, text

from slmops.fleet.control import ledger, migrations
from slmops.fleet.control.changes import ChangeFeed
from slmops.fleet.control.db import SCOPES_KEPT, Database
from slmops.fleet.control.models import Base, LedgerEntry, Meta
from slmops.security.audit import GENESIS, canonical
from slmops.types.errors import InvalidInput

T = TypeVar("T")
HEAD = ScriptDirectory.from_config(migrations.config()).get_current_head()
TABLES = set(Base.metadata.tables)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def _revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await conn.run_sync(migrations.current)


async def _meta(db: Database) -> dict[str, int]:
    async with db.read() as s:
        return {k: v for k, v in (await s.execute(select(Meta.key, Meta.value))).all()}


async def _append(db: Database, n: int, subject: str = "device:dev_000000000001", start: int = 0) -> None:
    for i in range(start, start + n):
        async with db.write() as s:
            await ledger.append(s, actor="key:ops", action="device.tag", subject=subject, data={"i": i, "x": [1.5]},
                                at=1700000000.25 + i)


async def _raw(db: Database, sql: str, **params: Any) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(sql), params)


# --- migrations -------------------------------------------------------------------------------------------------

def test_migrate_creates_the_schema_from_empty(fleet_db_url: str) -> None:
    async def go() -> None:
        db = Database(fleet_db_url)
        try:
            assert await _tables(db) == set()
            await db.migrate()
            assert await _tables(db) == TABLES | {"alembic_version"}
            assert await _revision(db) == HEAD
            assert await _meta(db) == {"change_version": 0, "ledger_seq": 0}
            await db.migrate()  # at head already: nothing happens, nothing is inserted twice
            assert await _meta(db) == {"change_version": 0, "ledger_seq": 0}
            async with db.write() as s:
                s.add(Meta(key="probe", value=1))
            assert await db.change_version() == 1
        finally:
            await db.close()
    run(go())


def test_downgrade_to_base_and_up_again(fleet_db_url: str) -> None:
    async def go() -> None:
        db = Database(fleet_db_url)
        try:
            await db.migrate()
            async with db.engine.begin() as conn:
                await conn.run_sync(migrations.downgrade, "base")
            assert await _tables(db) == {"alembic_version"}  # Alembic keeps its own table, empty
            assert await _revision(db) is None
            await db.migrate()
            assert await _tables(db) == TABLES | {"alembic_version"}
            assert await _meta(db) == {"change_version": 0, "ledger_seq": 0}
        finally:
            await db.close()
    run(go())


def test_migrated_schema_matches_the_models(fleet_db_url: str) -> None:
    """What ``alembic check`` does: autogenerate against the migrated database finds nothing to change."""
    async def go() -> list[Any]:
        db = Database(fleet_db_url)
        try:
            await db.migrate()
            async with db.engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}),
                                               Base.metadata))
        finally:
            await db.close()
    assert run(go()) == []


def test_two_replicas_migrate_at_once(fleet_db_url: str) -> None:
    """Two processes, released together once imported, migrate one empty database: both succeed, one does the work."""
    procs = [subprocess.Popen([sys.executable, "-c", _REPLICA, fleet_db_url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout
            line = p.stdout.readline().strip()
            if line != "ready":  # say why: its stderr (it exited) rather than an empty line
                _, err = p.communicate(timeout=30)
                pytest.fail(f"a replica did not start: {err.strip() or repr(line)}")
        for p in procs:
            assert p.stdin
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    async def check() -> None:
        db = Database(fleet_db_url)
        try:
            assert await _revision(db) == HEAD
            assert await _meta(db) == {"change_version": 0, "ledger_seq": 0}
        finally:
            await db.close()
    run(check())


def test_sqlite_wal_switch_waits_for_a_writer(tmp_path: Path) -> None:
    """A second replica opening a new SQLite file while the first holds its write lock: SQLite refuses the switch
    to WAL at once (no busy timeout applies to it), so the replica waits for the lock instead of failing to start.
    The lock is held as two replicas starting together hold it, for a moment."""
    path = tmp_path / "fleet.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE first_write (i INTEGER)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO first_write VALUES (1)")
    release = threading.Timer(0.3, writer.execute, ("COMMIT",))
    release.start()

    async def go() -> str:
        db = Database(f"sqlite+aiosqlite:///{path}")
        try:
            await db.migrate()
            async with db.engine.connect() as conn:
                return (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
        finally:
            await db.close()
    try:
        assert run(go()) == "wal"
    finally:
        release.join()
        writer.close()


_REPLICA = """
import asyncio, sys
from slmops.fleet.control.db import Database

async def main():
    db = Database(sys.argv[1])
    async with db.engine.connect():
        pass  # connected, so the two start migrating as close together as they can
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        await db.migrate()
    finally:
        await db.close()

asyncio.run(main())
"""


# --- ledger -----------------------------------------------------------------------------------------------------

def test_ledger_chains_entries_and_verifies_in_pages(fleet_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "PAGE", 3)  # 10 entries: four pages

    async def go() -> None:
        db = Database(fleet_db_url)
        try:
            await db.migrate()
            assert await _verify(db) == ledger.Verdict(True, 0, None)
            await _append(db, 7)
            async with db.write() as s:
                batch = await ledger.append_many(s, [
                    {"actor": "device:dev_000000000002", "action": "device.running", "subject": "device:dev_2",
                     "data": {"release": f"m:{i}", "tags": ("a", "b")}, "at": 1700000100 + i} for i in range(3)])
            assert [e.seq for e in batch] == [8, 9, 10]
            assert await _verify(db) == ledger.Verdict(True, 10, None)
            async with db.read() as s:
                every = await ledger.entries(s, limit=100)
                assert [e.seq for e in every] == list(range(1, 11))
                assert [e.seq for e in await ledger.entries(s, after=8)] == [9, 10]
                assert [e.seq for e in await ledger.entries(s, after=2, limit=2)] == [3, 4]
                assert [e.seq for e in await ledger.entries(s, subject="device:dev_2")] == [8, 9, 10]
            assert every[0].prev == GENESIS
            for before, entry in itertools.pairwise(every):
                assert entry.prev == before.hash
            body = {k: getattr(every[8], k) for k in ("seq", "at", "actor", "action", "subject", "data", "prev")}
            assert every[8].hash == hashlib.sha256(canonical(body)).hexdigest()
            assert every[8].data == {"release": "m:1", "tags": ["a", "b"]}  # stored as it reads back
            assert (await _meta(db))["ledger_seq"] == 10
        finally:
            await db.close()
    run(go())


async def _verify(db: Database) -> ledger.Verdict:
    async with db.read() as s:
        return await ledger.verify(s)


def test_ledger_names_an_edited_entry(fleet_db_url: str) -> None:
    async def go() -> None:
        db = Database(fleet_db_url)
        try:
            await db.migrate()
            await _append(db, 5)
            await _raw(db, "UPDATE ledger SET data = :d WHERE seq = 3", d='{"i": 99, "x": [1.5]}')
            verdict = await _verify(db)
            assert not verdict.ok and verdict.entries == 2
            assert verdict.problem and verdict.problem.startswith("ledger entry 3: ") and "edited" in verdict.problem
        finally:
            await db.close()
    run(go())


def test_ledger_reports_entries_deleted_in_the_middle_and_at_the_end(fleet_db_url: str) -> None:
    async def go() -> None:
        db = Database(fleet_db_url)
        try:
            await db.migrate()
            await _append(db, 5)
            await _raw(db, "DELETE FROM ledger WHERE seq = 5")
            verdict = await _verify(db)
            assert not verdict.ok and "ends at entry 4 but entry 5 was written" in str(verdict.problem)
            await _append(db, 1, start=5)  # the next entry does not paper over it: it follows the counter
            verdict = await _verify(db)
            assert verdict.problem == "ledger entry 6: follows entry 4 (entries 5 to 5 deleted)"
            await _raw(db, "DELETE FROM ledger WHERE seq = 2")
            assert (await _verify(db)).problem == "ledger entry 3: follows entry 1 (entries 2 to 2 deleted)"
            await _raw(db, "DELETE FROM ledger WHERE seq = 1")
            assert (await _verify(db)).problem == "ledger entry 3: the ledger starts here (entries 1 to 2 deleted)"
        finally:
            await db.close()
    run(go())


def test_ledger_reports_a_broken_link_and_an_edited_counter(fleet_db_url: str) -> None:
    async def go() -> None:
        db = Database(fleet_db_url)
        try:
            await db.migrate()
            await _append(db, 4)
            async with db.read() as s:
                third = (await s.execute(select(LedgerEntry).where(LedgerEntry.seq == 3))).scalar_one()
            # rewrite entry 3 consistently (hash recomputed) but chained to the wrong predecessor
            body = {"seq": 3, "at": third.at, "actor": third.actor, "action": third.action, "subject": third.subject,
                    "data": third.data, "prev": "f" * 64}
            await _raw(db, "UPDATE ledger SET prev = :p, hash = :h WHERE seq = 3", p="f" * 64,
                       h=ledger.entry_hash(body))
            problem = (await _verify(db)).problem
            assert problem and problem.startswith("ledger entry 3: does not chain to entry 2")
            await _raw(db, "UPDATE ledger SET prev = :p, hash = :h WHERE seq = 3", p=third.prev, h=third.hash)
            assert (await _verify(db)).ok
            await _raw(db, "UPDATE meta SET value = 2 WHERE key = 'ledger_seq'")
            assert "the counter was edited" in str((await _verify(db)).problem)
        finally:
            await db.close()
    run(go())


def test_ledger_refuses_what_it_could_not_verify_later(fleet_db_url: str) -> None:
    async def go() -> None:
        db = Database(fleet_db_url)
        try:
            await db.migrate()
            for bad in ({"subject": "x" * 201}, {"actor": ""}, {"data": {"v": float("nan")}}, {"data": [1]}):
                fields = {"actor": "system", "action": "a", "subject": "s", "data": {}, "at": 1.0, **bad}
                with pytest.raises(InvalidInput):
                    async with db.write() as s:
                        await ledger.append(s, **fields)
            assert await db.change_version() == 0  # each failed append took its transaction with it
            assert await _verify(db) == ledger.Verdict(True, 0, None)
        finally:
            await db.close()
    run(go())


def test_concurrent_appends_from_two_replicas_keep_one_chain(fleet_db_url: str) -> None:
    async def go() -> None:
        a, b = Database(fleet_db_url), Database(fleet_db_url)
        try:
            await a.migrate()

            async def one(i: int) -> int:
                async with (a if i % 2 else b).write() as s:
                    return (await ledger.append(s, actor="key:ops", action="race", subject=f"t:{i}", data={"i": i},
                                                at=float(i))).seq
            seqs = await asyncio.gather(*(one(i) for i in range(20)))
            assert sorted(seqs) == list(range(1, 21))
            assert await _verify(a) == ledger.Verdict(True, 20, None)
            assert await a.change_version() == 20
        finally:
            await a.close()
            await b.close()
    run(go())


# --- change feed ------------------------------------------------------------------------------------------------

def test_change_feed_sees_another_replicas_write(fleet_db_url: str) -> None:
    """On PostgreSQL the poll is set far beyond the deadline, so only NOTIFY can deliver the change in time."""
    async def go() -> None:
        a, b = Database(fleet_db_url), Database(fleet_db_url)
        seen: list[int] = []
        scopes: list[frozenset[str] | None] = []
        arrived = asyncio.Event()

        def on_change(version: int, devices: frozenset[str] | None) -> None:
            seen.append(version)
            scopes.append(devices)
            arrived.set()
        try:
            await a.migrate()
            interval = 3600.0 if a.dialect == "postgresql" else 0.05
            async with ChangeFeed(a, on_change, interval=interval) as feed:
                if a.dialect == "postgresql":
                    await _until(lambda: feed.listening)
                assert feed.version == 0
                async with b.write() as s:
                    s.add(Meta(key="probe", value=7))
                await asyncio.wait_for(arrived.wait(), 10)
                assert seen == [1] and feed.version == 1
                arrived.clear()
                async with b.write(bump=False):
                    pass
                async with b.write() as s:
                    await ledger.append(s, actor="system", action="probe", subject="meta", at=1.0)
                await asyncio.wait_for(arrived.wait(), 10)
                assert seen == [1, 2] and scopes == [None, None]  # unscoped changes concern everything
                arrived.clear()
                async with b.write(devices=["dev_a", "dev_b"]):
                    pass
                await asyncio.wait_for(arrived.wait(), 10)
                assert seen[-1] == 3 and scopes[-1] == {"dev_a", "dev_b"}
                arrived.clear()
                async with b.write(devices=()):  # a change of shared state only (an enrolment token)
                    pass
                await asyncio.wait_for(arrived.wait(), 10)
                assert seen[-1] == 4 and scopes[-1] == frozenset()
        finally:
            await a.close()
            await b.close()
    run(go())


def test_change_feed_listens_again_after_losing_its_connection(postgres: Any) -> None:
    """The LISTEN connection is killed; a change made while it is down is still seen (the feed looks once when it
    is back) and later ones are notified again. Polling is out of reach of the deadline."""
    name = f"feed_{uuid.uuid4().hex[:12]}"
    url = postgres.create_database(name)

    async def go() -> None:
        a, b = Database(url), Database(url)
        seen: list[int] = []
        try:
            await a.migrate()
            async with ChangeFeed(a, lambda version, _devices: seen.append(version), interval=3600.0) as feed:
                await _until(lambda: feed.listening)
                async with b.write() as s:
                    killed = (await s.execute(text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"))).scalar_one()
                assert killed == 1
                await _until(lambda: seen == [1])
                await _until(lambda: feed.listening)
                async with b.write():
                    pass
                await _until(lambda: seen == [1, 2])
        finally:
            await a.close()
            await b.close()
    try:
        run(go())
    finally:
        postgres.drop_database(name)


async def _until(check: Any, deadline_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not check():
        assert loop.time() < end, "condition not met within the deadline"
        await asyncio.sleep(0.01)


def test_scopes_of_several_changes_are_their_union_and_any_unscoped_one_is_everything(tmp_path: Path) -> None:
    """What a replica that missed several versions learns: the union of what they named, or None (everything)
    when one named nothing, one is no longer kept, or the version went back (a restored backup)."""
    async def go() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'f.db'}")
        try:
            await db.migrate()
            for devices in (["dev_a"], ["dev_b", "dev_a"], ()):
                async with db.write(devices=devices):
                    pass
            assert await db.scopes(0, 3) == {"dev_a", "dev_b"}
            assert await db.scopes(1, 2) == {"dev_a", "dev_b"}
            async with db.write():
                pass
            assert await db.scopes(0, 4) is None and await db.scopes(2, 3) == frozenset()
            assert await db.scopes(3, 1) is None and await db.scopes(0, 0) is None
            assert await db.scopes(3, 3 + SCOPES_KEPT + 1) is None
            for _ in range(SCOPES_KEPT + 100):  # pruned as versions go by: a replica that far behind drops all
                async with db.write(devices=["dev_c"]):
                    pass
            version = await db.change_version()
            assert await db.scopes(4, 5) is None
            assert await db.scopes(version - 10, version) == {"dev_c"}
        finally:
            await db.close()
    run(go())
