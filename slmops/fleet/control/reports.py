"""Device reports and last-seen times, written in batches.

One transaction per report tops out at a few hundred per second (SQLite ~220/s, PostgreSQL ~700/s on two cores);
a fleet of thousands reporting every few seconds needs more. Reports are queued in memory and written together:
one transaction per ``interval`` (or as soon as ``flush_at`` reports wait), report rows as one executemany. A
device row is written only when what it reports changes (health, release, digest); a change of what it runs is
also a ledger entry (``device.running``), chained in the same transaction as the rows that show it. Telemetry
writes do not bump the change version: caches of desired states stay valid while devices report.

Last-seen times (from polls and reports) are kept as the latest time per device and written every
``seen_interval`` seconds: far finer than the poll interval, and one row per device per interval instead of one
per request.

The queue is bounded: when it is full the route answers 503 and the agent retries later, so a stalled database
costs memory up to a limit, never without one. A write that fails goes back to the queue for the next tick (up to
``retries`` times); one interrupted at shutdown is written by the last flush.

A window's numbers are about ``window.release`` when the device names one (a release it failed to load or
smoke-test while serving another), else the release it runs. Its latency histograms go to ``report_buckets``, one
row per nonzero bucket, which the gates sum per hardware class (``observations.py``).

A window is stored once per device and start (a unique index, inserts with ON CONFLICT DO NOTHING, and the batch
itself deduplicated): a report sent twice (a retry after a lost answer, a replay within the signature's skew or a
session's lifetime) adds no row. A device's ``applied_version`` only moves forward, since a device never applies
an older desired state: a late report cannot undo it.

Reports are decoded with msgspec (a few µs) into :class:`DecodedReport`, which mirrors ``api.fleet.ReportRequest``
and its bounds; a body msgspec refuses goes to pydantic, which has the last word and writes the error message, so
both paths accept and refuse the same bodies with the same messages (tests/test_fleet_device.py compares them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from pydantic import ValidationError
from sqlalchemy import and_, bindparam, case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.api.fleet import INT32_MAX, INT64_MAX, ReportRequest
from slmops.fleet.control import ledger
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import Device, Report
from slmops.server.errors import validation_message
from slmops.types.errors import InvalidInput

log = logging.getLogger("slmops.fleet")
_devices = Device.__table__
_reports = Report.__table__
_WINDOW_FIELDS = ("requests", "errors", "load_failures", "oom", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms",
                  "itl_p95_ms", "tokens_per_s", "golden_score", "memory_bytes")
_APPLIED = bindparam("b_applied")
_SET_STATE = (update(_devices).where(_devices.c.id == bindparam("b_id"))
              .values(health=bindparam("b_health"), running_release=bindparam("b_release"),
                      running_digest=bindparam("b_digest"),
                      applied_version=case((_devices.c.applied_version < _APPLIED, _APPLIED),
                                           else_=_devices.c.applied_version)))
_SET_SEEN = (update(_devices)
             .where(and_(_devices.c.id == bindparam("b_id"), _devices.c.last_seen < bindparam("b_seen")))
             .values(last_seen=bindparam("b_seen")))
_window_values = operator.attrgetter(*_WINDOW_FIELDS)
_ROW = ("device_id", "received_at", "window_start", "window_end", "release", "hardware_class", *_WINDOW_FIELDS)


def _insert_sql(dialect: str) -> str:
    """The report rows' INSERT, as the driver takes it (``?`` for sqlite3, ``$n`` for asyncpg): rows go to the
    driver's executemany as tuples, a third of the CPU of SQLAlchemy's per-row parameter handling."""
    marks = ", ".join("?" if dialect == "sqlite" else f"${i}" for i in range(1, len(_ROW) + 1))
    return (f"INSERT INTO {_reports.name} ({', '.join(_ROW)}) VALUES ({marks}) "
            "ON CONFLICT (device_id, window_start) DO NOTHING")


_INSERT = {dialect: _insert_sql(dialect) for dialect in ("sqlite", "postgresql")}
_BUCKET_ROW = ("device_id", "window_start", "metric", "bucket", "release", "hardware_class", "window_end", "count")
TTFT, ITL = 0, 1  # report_buckets.metric


def _bucket_insert_sql(dialect: str) -> str:
    """The histogram bucket rows' INSERT, as :func:`_insert_sql`: a bucket already stored (a replay) is skipped."""
    marks = ", ".join("?" if dialect == "sqlite" else f"${i}" for i in range(1, len(_BUCKET_ROW) + 1))
    return (f"INSERT INTO report_buckets ({', '.join(_BUCKET_ROW)}) VALUES ({marks}) "
            "ON CONFLICT (device_id, window_start, metric, bucket) DO NOTHING")


_INSERT_BUCKETS = {dialect: _bucket_insert_sql(dialect) for dialect in ("sqlite", "postgresql")}


# -- decoding: msgspec mirrors of api.fleet's ReportRequest, Running and Window ------------------------------------
_Count = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
_Amount = Annotated[float, msgspec.Meta(ge=0)]


class _Running(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    release: Annotated[str, msgspec.Meta(max_length=160)] | None = None
    manifest_digest: Annotated[str, msgspec.Meta(max_length=71)] | None = None
    slot: Annotated[str, msgspec.Meta(max_length=64)] | None = None


_Hist = Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]], msgspec.Meta(max_length=64)]


class _Window(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    start: float
    end: float
    release: Annotated[str, msgspec.Meta(max_length=160)] | None = None
    requests: _Count = 0
    errors: _Count = 0
    load_failures: _Count = 0
    oom: _Count = 0
    ttft_p50_ms: _Amount | None = None
    ttft_p95_ms: _Amount | None = None
    itl_p50_ms: _Amount | None = None
    itl_p95_ms: _Amount | None = None
    tokens_per_s: _Amount | None = None
    golden_score: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    memory_bytes: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] | None = None
    ttft_hist: _Hist = []
    itl_hist: _Hist = []


class DecodedReport(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A decoded report, as ``ReportRequest`` (same fields, same bounds) but a few µs to decode."""

    running: _Running = _Running()
    health: Literal["ok", "degraded", "failing", "unknown"] = "unknown"
    desired_version: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0
    windows: Annotated[list[_Window], msgspec.Meta(max_length=64)] = []


_decode = msgspec.json.Decoder(DecodedReport).decode
AnyReport = DecodedReport | ReportRequest  # the batcher takes either; they have the same attributes


def parse_report(body: bytes) -> AnyReport:
    """A report from JSON bytes; :class:`InvalidInput` with pydantic's message for one that ``ReportRequest``
    refuses."""
    try:
        return _decode(body)
    except msgspec.MsgspecError:
        pass  # pydantic decides, and says why
    try:
        return ReportRequest.model_validate_json(body)
    except ValidationError as err:
        raise InvalidInput(validation_message(err.errors())) from None


# -- batching ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Queued:
    device_id: str
    received_at: float
    report: AnyReport


@dataclass(frozen=True)
class Flushed:
    reports: int  # requests written
    rows: int  # report rows (windows) sent; the database skips those it has already
    ledger: int  # device.running entries
    seen: int = 0  # last-seen times written


class ReportBatcher:
    """Queue reports and poll times; write them in one transaction per ``interval`` seconds (or at ``flush_at``
    queued), last-seen times every ``seen_interval`` seconds. ``offer`` and ``seen`` never wait; ``running`` runs
    the writing task for a block; ``flush`` writes what is queued now."""

    def __init__(self, db: Database, *, interval: float = 0.1, flush_at: int = 500, limit: int = 20_000,
                 seen_interval: float = 5.0, retries: int = 3):
        self.db = db
        self.interval = interval
        self.flush_at = flush_at
        self.limit = limit
        self.seen_interval = seen_interval
        self.retries = retries
        self.flushes = 0  # transactions written
        self._queue: list[Queued] = []
        self._seen: dict[str, float] = {}
        self._seen_due = time.monotonic() + seen_interval
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._failures = 0
        self._stopping = False

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, device_id: str, received_at: float, report: AnyReport) -> bool:
        """Queue one report; False when the queue is full (the caller answers 503)."""
        if len(self._queue) >= self.limit:
            return False
        self._queue.append(Queued(device_id, received_at, report))
        self.seen(device_id, received_at)
        if len(self._queue) >= self.flush_at:
            self._wake.set()
        return True

    def seen(self, device_id: str, at: float) -> None:
        """Note that the device was heard from at ``at``; written with the next batch of last-seen times."""
        if self._seen.get(device_id, 0.0) < at:
            self._seen[device_id] = at

    async def flush(self, everything: bool = True) -> Flushed:
        """Write the queued reports in one transaction, with the last-seen times when ``everything`` or when they
        are due. A failed write is queued again for the next tick; after ``retries`` failures in a row it is
        dropped and logged."""
        async with self._lock:
            batch, self._queue = self._queue, []
            seen: dict[str, float] = {}
            if everything or time.monotonic() >= self._seen_due:
                seen, self._seen = self._seen, {}
                self._seen_due = time.monotonic() + self.seen_interval
            if not batch and not seen:
                return Flushed(0, 0, 0)
            try:
                async with self.db.write(bump=False) as s:
                    done = await write_batch(s, batch, seen)
            except asyncio.CancelledError:
                self._requeue(batch, seen)  # rolled back: the flush at shutdown writes it
                raise
            except Exception:
                self._failures += 1
                if self._failures >= self.retries:
                    log.exception("dropped %d device reports after %d failed writes", len(batch), self._failures)
                    self._failures = 0
                else:
                    log.warning("writing %d device reports failed; retrying", len(batch), exc_info=True)
                    self._requeue(batch, seen)
                return Flushed(0, 0, 0)
            self._failures = 0
            self.flushes += 1
            return done

    def _requeue(self, batch: list[Queued], seen: dict[str, float]) -> None:
        """Put what was not written back in front of what came since (past the limit if need be: it was
        accepted already)."""
        self._queue[:0] = batch
        for device_id, at in seen.items():
            self.seen(device_id, at)

    async def run(self) -> None:
        """Flush every ``interval`` seconds, or sooner when ``flush_at`` reports wait, until stopped."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush(everything=False)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ReportBatcher]:
        """Run the batcher for the block; on the way out, let the write under way finish (cancelling it would
        roll it back) and write everything still queued."""
        self._stopping = False
        task = asyncio.create_task(self.run(), name="slmops-fleet-reports")
        try:
            yield self
        finally:
            self._stopping = True
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for _ in range(self.retries):
                if not self._queue and not self._seen:
                    break
                await self.flush()


async def write_batch(s: AsyncSession, batch: list[Queued], seen: dict[str, float]) -> Flushed:
    """Write queued reports and last-seen times in the caller's transaction: report rows (a window already stored,
    or twice in the batch, once), the device rows whose reported state changed, and a ``device.running`` ledger
    entry per change of what a device runs, in the order the reports came."""
    known: dict[str, Any] = {}
    if batch:
        rows = await s.execute(select(_devices.c.id, _devices.c.hardware_class, _devices.c.health,
                                      _devices.c.running_release, _devices.c.running_digest,
                                      _devices.c.applied_version)
                               .where(_devices.c.id.in_({q.device_id for q in batch})))
        known = {r.id: r for r in rows}
    stored = {i: (r.health, r.running_release, r.running_digest, r.applied_version) for i, r in known.items()}
    state = dict(stored)
    reports: list[tuple[Any, ...]] = []
    buckets: list[tuple[Any, ...]] = []
    windows: set[tuple[str, float]] = set()
    entries: list[dict[str, Any]] = []
    for q in batch:
        device = known.get(q.device_id)
        if device is None:  # deleted since it reported
            continue
        r = q.report
        release, digest = r.running.release, r.running.manifest_digest
        for w in r.windows:
            if (q.device_id, w.start) in windows:
                continue
            windows.add((q.device_id, w.start))
            about = w.release or release  # a failure to load a release is counted against that release
            reports.append((q.device_id, q.received_at, w.start, w.end, about, device.hardware_class,
                            *_window_values(w)))  # in _ROW's order
            if w.ttft_hist or w.itl_hist:
                _bucket_rows(buckets, q.device_id, w, about, device.hardware_class)
        before = state[q.device_id]
        if before[1] != release:
            entries.append({"actor": f"device:{q.device_id}", "action": "device.running", "subject": q.device_id,
                            "data": {"from": before[1], "to": release, "digest": digest}, "at": q.received_at})
        state[q.device_id] = (r.health, release, digest, max(before[3], r.desired_version))
    changed = [{"b_id": i, "b_health": h, "b_release": rel, "b_digest": d, "b_applied": v}
               for i, (h, rel, d, v) in state.items() if stored[i] != (h, rel, d, v)]
    if reports:
        conn = await s.connection()
        await conn.exec_driver_sql(_INSERT[conn.dialect.name], reports)
        if buckets:
            await conn.exec_driver_sql(_INSERT_BUCKETS[conn.dialect.name], buckets)
    if changed:
        await s.execute(_SET_STATE, changed)
    if seen:
        await s.execute(_SET_SEEN, [{"b_id": i, "b_seen": at} for i, at in seen.items()])
    if entries:
        await ledger.append_many(s, entries)  # last: on PostgreSQL it holds the ledger's lock until commit
    return Flushed(len(batch), len(reports), len(entries), len(seen))


def _bucket_rows(out: list[tuple[Any, ...]], device_id: str, w: Any, release: str | None, hardware_class: str) -> None:
    """The window's nonzero histogram buckets as ``report_buckets`` rows (in ``_BUCKET_ROW``'s order)."""
    for metric, counts in ((TTFT, w.ttft_hist), (ITL, w.itl_hist)):
        for i, count in enumerate(counts):
            if count:
                out.append((device_id, w.start, metric, i, release, hardware_class, w.end, count))
