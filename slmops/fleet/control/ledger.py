"""The fleet ledger: every mutation of the fleet as one row, hash-chained as the audit log (``security/audit.py``).

An entry holds ``seq`` (1, 2, ...), ``at``, ``actor``, ``action``, ``subject``, ``data``, ``prev`` (the previous
entry's hash; the first chains to ``"0" * 64``) and ``hash`` = sha256 of the audit log's canonical JSON of the
entry without ``hash``. Editing an entry breaks its hash; deleting one leaves a gap in ``seq``; deleting entries at
the end is caught by the meta row ``ledger_seq``, which names the last entry written (the audit log's head file).

Appends happen inside the caller's write transaction, so an entry exists exactly when the change it records does.
They are serialised: on PostgreSQL by a transaction-scoped advisory lock (held until the caller commits), on
SQLite by the database's single writer (``Database.write`` begins with ``BEGIN IMMEDIATE``). Append as the last
step of a transaction: the lock is held until commit, and taking it last keeps that short and the lock order
the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.fleet.control.models import LedgerEntry, Meta
from slmops.security.audit import GENESIS, canonical
from slmops.types.errors import InvalidInput

HEAD_KEY = "ledger_seq"  # meta row: seq of the last entry written
LOCK_KEY = int.from_bytes(b"slmops:L", "big")  # pg_advisory_xact_lock key that orders appends
PAGE = 1000  # entries verify() holds at once
_LIMITS = {name: LedgerEntry.__table__.c[name].type.length for name in ("actor", "action", "subject")}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int  # entries that were checked
    problem: str | None = None  # "ledger entry N: what is wrong"


def entry_hash(fields: Mapping[str, Any]) -> str:
    """sha256 of an entry's canonical JSON without ``hash``."""
    return hashlib.sha256(canonical(dict(fields))).hexdigest()


async def append(s: AsyncSession, *, actor: str, action: str, subject: str, data: dict[str, Any] | None = None,
                 at: float) -> LedgerEntry:
    """Record one change in the caller's transaction."""
    return (await append_many(s, [{"actor": actor, "action": action, "subject": subject, "data": data, "at": at}]))[0]


async def append_many(s: AsyncSession, items: Iterable[Mapping[str, Any]]) -> list[LedgerEntry]:
    """Record several changes at once (each item: actor, action, subject, data, at), chained in the given order,
    under one lock and one flush."""
    wanted = [_checked(item) for item in items]
    if not wanted:
        return []
    conn = await s.connection()
    if conn.dialect.name == "postgresql":
        await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
    seq, prev = await _head(s)
    rows = []
    for fields in wanted:
        seq += 1
        fields.update(seq=seq, prev=prev)
        fields["hash"] = prev = entry_hash(fields)
        rows.append(LedgerEntry(**fields))
    s.add_all(rows)
    await s.flush()
    moved = await s.execute(update(Meta).where(Meta.key == HEAD_KEY).values(value=seq))
    if not moved.rowcount:  # type: ignore[attr-defined]
        s.add(Meta(key=HEAD_KEY, value=seq))
        await s.flush()
    return rows


def _checked(item: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's fields as they will read back from the database (plain JSON, float time), so the hash computed
    now is the one verify() recomputes later."""
    fields: dict[str, Any] = {}
    for name, limit in _LIMITS.items():
        value = item.get(name)
        if not isinstance(value, str) or not value or len(value) > limit:
            raise InvalidInput(f"ledger {name} must be a string of 1 to {limit} characters")
        fields[name] = value
    data = item.get("data") or {}
    if not isinstance(data, Mapping):
        raise InvalidInput("ledger data must be a JSON object")
    try:
        fields["data"] = json.loads(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"ledger data must be plain JSON: {err}") from None
    at = float(item["at"])
    if not math.isfinite(at):
        raise InvalidInput("ledger time must be a finite number of seconds")
    fields["at"] = at
    return fields


async def _head(s: AsyncSession) -> tuple[int, str]:
    """``(seq, hash)`` the next entry follows: the counter (so entries deleted at the end leave a gap that verify
    reports, not a chain that hides it) and the newest entry's hash."""
    last = (await s.execute(select(LedgerEntry.seq, LedgerEntry.hash).order_by(LedgerEntry.seq.desc()).limit(1))).first()
    counter = await _counter(s)
    seq = max(counter or 0, last.seq if last else 0)
    return seq, (last.hash if last else GENESIS)


async def _counter(s: AsyncSession) -> int | None:
    return (await s.execute(select(Meta.value).where(Meta.key == HEAD_KEY))).scalar_one_or_none()


async def entries(s: AsyncSession, after: int = 0, limit: int = 100, subject: str | None = None) -> list[LedgerEntry]:
    """Entries with ``seq > after``, oldest first; only those about ``subject`` when given."""
    q = select(LedgerEntry).where(LedgerEntry.seq > after)
    if subject is not None:
        q = q.where(LedgerEntry.subject == subject)
    return list((await s.execute(q.order_by(LedgerEntry.seq).limit(max(1, limit)))).scalars())


async def verify(s: AsyncSession) -> Verdict:
    """Walk the chain in pages of ``PAGE``; the first thing that does not hold is named by its seq.

    The counter is read before the walk (every entry up to it was committed with it, so the walk must reach it)
    and again after (appends only raise it, so it must be at least where the walk ended): both hold while other
    replicas append, and a chain cut at the end, or a counter edited back, fails one of them."""
    before = await _counter(s)
    prev, seq, count = GENESIS, 0, 0
    cols = (LedgerEntry.seq, LedgerEntry.at, LedgerEntry.actor, LedgerEntry.action, LedgerEntry.subject,
            LedgerEntry.data, LedgerEntry.prev, LedgerEntry.hash)
    while True:
        page = (await s.execute(select(*cols).where(LedgerEntry.seq > seq).order_by(LedgerEntry.seq).limit(PAGE))).all()
        for row in page:
            problem = _link(row._asdict(), seq, prev)
            if problem:
                return Verdict(False, count, problem)
            prev, seq, count = row.hash, row.seq, count + 1
        if len(page) < PAGE:
            break
    after = await _counter(s)
    problem = _check_counter(before, after, seq)
    return Verdict(problem is None, count, problem)


def _link(entry: dict[str, Any], seq: int, prev: str) -> str | None:
    """What is wrong with ``entry`` as the one after ``seq``/``prev``, or None."""
    r_seq = entry["seq"]
    if entry_hash({k: v for k, v in entry.items() if k != "hash"}) != entry["hash"]:
        return f"ledger entry {r_seq}: contents do not match its hash (edited)"
    if seq == 0 and r_seq != 1:
        return f"ledger entry {r_seq}: the ledger starts here (entries 1 to {r_seq - 1} deleted)"
    if r_seq != seq + 1:
        return f"ledger entry {r_seq}: follows entry {seq} (entries {seq + 1} to {r_seq - 1} deleted)"
    if entry["prev"] != prev:
        return (f"ledger entry {r_seq}: does not chain to entry {seq} (an entry was edited, inserted or deleted "
                "before it)")
    return None


def _check_counter(before: int | None, after: int | None, seq: int) -> str | None:
    if before is None or after is None:
        return None if seq == 0 else f"ledger: the {HEAD_KEY} meta row is missing (deleted)"
    if seq < before:
        return f"ledger: ends at entry {seq} but entry {before} was written (entries deleted at the end)"
    if after < seq:
        return f"ledger: {HEAD_KEY} names entry {after} but the ledger runs on to entry {seq} (the counter was edited)"
    return None
