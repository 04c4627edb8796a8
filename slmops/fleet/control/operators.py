"""Operator API keys of the control plane and their fleet roles.

Keys have the local server's form (``slm_<id>_<secret>``, ``security/keys.py``) and live in the ``operator_keys``
table as a salted hash. Roles are ranked: **viewer** reads, **operator** also changes devices, groups, releases,
channels, blueprints and tokens, **admin** also manages keys and revokes devices.

Checking a key needs its record on every request, so each replica caches records by key id. A revocation must
still bite everywhere at once: the cache is dropped whenever the database's change version moves (the change
feed, started by ``routes_admin.lifespan``), and every key change bumps that version. A lookup that raced with
a drop does not store what it read, so a record read before a revocation never outlives it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DbIntegrityError

from slmops.api.fleet import KeyInfo
from slmops.fleet.control import ledger
from slmops.fleet.control.models import OperatorKey
from slmops.security.keys import mint, matches, parse_key
from slmops.types.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane
    from slmops.fleet.control.db import Database

RANK = {"viewer": 0, "operator": 1, "admin": 2}
# "key:<name>" must fit the ledger's 64-character actor column
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")
NO_KEY = ("pass an operator key as `Authorization: Bearer slm_…` (SLMOPS_FLEET_KEY for the CLI); make one with "
          "`slmops fleet keys create NAME --role operator` on the control-plane host")
CACHE = "operators"


@dataclass(frozen=True)
class Actor:
    """Who made a request, as the ledger names them."""

    name: str
    role: str

    @property
    def ledger_name(self) -> str:
        return f"key:{self.name}"


@dataclass(frozen=True)
class _Record:
    name: str
    role: str
    salt: str
    hash: str
    revoked: bool


class KeyCache:
    """Key records by id, per replica; ``drop`` is the change feed's callback."""

    def __init__(self, db: "Database"):
        self._db = db
        self._records: dict[str, _Record] = {}
        self._generation = 0

    def drop(self, _version: int = 0, devices: frozenset[str] | None = None) -> None:
        if devices is not None:
            return  # a change of some devices' states: no operator key moved
        self._records.clear()
        self._generation += 1

    async def lookup(self, key_id: str) -> _Record | None:
        found = self._records.get(key_id)
        if found is not None:
            return found
        generation = self._generation
        async with self._db.read() as s:
            row = await s.get(OperatorKey, key_id)
        if row is None:
            return None  # unknown ids are not cached: a key made a moment ago must work at once
        found = _Record(row.name, row.role, row.salt, row.secret_hash, row.revoked_at is not None)
        if generation == self._generation:
            self._records[key_id] = found
        return found


def key_cache(plane: "ControlPlane") -> KeyCache:
    cache = plane.extras.get(CACHE)
    if cache is None:
        cache = plane.extras[CACHE] = KeyCache(plane.db)
    return cache


async def authenticate(request: Request) -> Actor:
    """The actor behind the request's bearer key; Unauthenticated when there is none that holds."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    parsed = parse_key(presented) if scheme.lower() == "bearer" else None
    if parsed is None:
        raise Unauthenticated(f"no operator key: {NO_KEY}")
    record = await key_cache(request.app.state.plane).lookup(parsed[0])
    if record is None or record.revoked or not matches(record.salt, record.hash, parsed[1]):
        raise Unauthenticated(f"the operator key is unknown or revoked: {NO_KEY}")
    return Actor(record.name, record.role)


async def require_role(request: Request, needed: str) -> Actor:
    actor = await authenticate(request)
    if RANK.get(actor.role, -1) < RANK[needed]:
        route = request.scope.get("route")
        what = getattr(route, "name", "").replace("_", " ") or f"{request.method} {request.url.path}"
        raise Forbidden(f"role {actor.role} cannot {what}; needs {needed}")
    return actor


async def viewer(request: Request) -> Actor:
    return await require_role(request, "viewer")


async def operator(request: Request) -> Actor:
    return await require_role(request, "operator")


async def admin(request: Request) -> Actor:
    return await require_role(request, "admin")


# -- keys in the database (the admin routes, and the CLI on the control-plane host) ----------------------------

def to_info(row: OperatorKey, key: str | None = None) -> KeyInfo:
    return KeyInfo(id=row.id, name=row.name, role=row.role, created_at=row.created_at,
                   revoked=row.revoked_at is not None, key=key)


async def create_key(db: "Database", name: str, role: str, actor: str, now: float | None = None) -> str:
    """Store a new key and return it: the only time its secret exists outside the caller."""
    return (await create_key_info(db, name, role, actor, now)).key or ""


async def create_key_info(db: "Database", name: str, role: str, actor: str, now: float | None = None) -> KeyInfo:
    if not KEY_NAME_RE.match(name):
        raise InvalidInput(f"key name {name!r} must be 1-60 letters, digits, '.', '_' or '-'")
    if role not in RANK:
        raise InvalidInput(f"unknown role {role!r}; use admin, operator or viewer")
    at = time.time() if now is None else now
    minted = mint()
    try:
        async with db.write() as s:
            if (await s.execute(select(OperatorKey.id).where(OperatorKey.name == name))).first() is not None:
                raise _taken(name)
            row = OperatorKey(id=minted.id, name=name, role=role, salt=minted.salt, secret_hash=minted.hash,
                              created_at=at)
            s.add(row)
            await s.flush()
            await ledger.append(s, actor=actor, action="key.create", subject=f"key:{name}",
                                data={"id": minted.id, "role": role}, at=at)
    except DbIntegrityError:  # another writer took the name between the check and the insert
        raise _taken(name) from None
    return to_info(row, minted.text)


def _taken(name: str) -> Conflict:
    return Conflict(f'a key named "{name}" exists (key names are never reused, so the ledger names one key); '
                    "pick another name")


async def revoke_key(db: "Database", name: str, actor: str, now: float | None = None) -> KeyInfo:
    """Revoke by name or id. Every replica refuses the key once it sees the change version move."""
    at = time.time() if now is None else now
    async with db.write() as s:
        row = (await s.execute(select(OperatorKey).where(
            (OperatorKey.name == name) | (OperatorKey.id == name)))).scalars().first()
        if row is None:
            raise NotFound(f'no operator key named "{name}"; `slmops fleet keys list` shows them')
        if row.revoked_at is None:
            row.revoked_at = at
            await ledger.append(s, actor=actor, action="key.revoke", subject=f"key:{row.name}",
                                data={"id": row.id}, at=at)
        return to_info(row)


async def list_keys(db: "Database") -> list[KeyInfo]:
    async with db.read() as s:
        rows = (await s.execute(select(OperatorKey).order_by(OperatorKey.created_at, OperatorKey.name))).scalars()
        return [to_info(r) for r in rows]
