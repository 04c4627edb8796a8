"""API keys: created once, shown once, stored only as a salted hash.

A key reads ``slm_<id>_<secret>``: the id (public, 12 hex digits) finds the record, the secret (256 random bits)
proves possession. Records hold ``sha256(salt || secret)``; with 256-bit secrets a slow password hash adds
nothing but latency to every request, which is why API-key systems (GitHub's, Stripe's) hash them fast. The file
``keys.json`` under ``SLMOPS_HOME`` is written atomically and read again when it changes, so ``slmops keys``
takes effect on a running server without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slmops.security.roles import ROLES
from slmops.store.atomic import atomic_writer
from slmops.types.errors import InvalidInput, NotFound

KEY_RE = re.compile(r"^slm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    salt: str
    hash: str
    created: float
    requests_per_minute: int = 0  # 0: the server-wide default
    tokens_per_minute: int = 0


class KeyStore:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, ApiKey] = {}

    # -- reading -------------------------------------------------------------------------------------------
    def keys(self) -> list[ApiKey]:
        self._refresh()
        return sorted(self._keys.values(), key=lambda k: k.created)

    def __bool__(self) -> bool:
        """Any key at all (asked on every request: whether auth is on)."""
        self._refresh()
        return bool(self._keys)

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key record for a presented key, or None. Constant-time on the secret."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        self._refresh()
        record = self._keys.get(parsed[0])
        return record if record is not None and matches(record.salt, record.hash, parsed[1]) else None

    def _refresh(self) -> None:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._keys, self._stamp = {}, None
                return
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            data = json.loads(self.path.read_text() or "{}")
            self._keys = {k["id"]: ApiKey(**k) for k in data.get("keys", [])}
            self._stamp = stamp

    # -- changing ------------------------------------------------------------------------------------------
    def create(self, name: str, role: str, requests_per_minute: int = 0, tokens_per_minute: int = 0) -> str:
        """Store a new key and return it; this is the only time its secret exists outside the caller."""
        if not NAME_RE.match(name):
            raise InvalidInput(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        for value, what in ((requests_per_minute, "requests"), (tokens_per_minute, "tokens")):
            if not isinstance(value, int) or value < 0:
                raise InvalidInput(f"a key's {what} per minute must be a positive whole number, or 0 for the "
                                   f"server's default; got {value!r}")
        if any(k.name == name for k in self.keys()):
            raise InvalidInput(f'a key named "{name}" exists; revoke it first or pick another name')
        minted = mint()
        record = ApiKey(minted.id, name, role, minted.salt, minted.hash, time.time(), requests_per_minute,
                        tokens_per_minute)
        self._write(self.keys() + [record])
        return minted.text

    def revoke(self, name: str) -> ApiKey:
        keys = self.keys()
        gone = next((k for k in keys if k.name == name or k.id == name), None)
        if gone is None:
            raise NotFound(f'no key named "{name}"; `slmops keys list` shows them')
        self._write([k for k in keys if k is not gone])
        return gone

    def _write(self, keys: list[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(self.path) as f:
            f.write(json.dumps({"keys": [asdict(k) for k in keys]}, indent=2).encode())
        os.chmod(self.path, 0o600)
        with self._lock:
            self._stamp = None


@dataclass(frozen=True)
class Minted:
    """A new key: ``text`` is shown once; ``id``, ``salt`` and ``hash`` are what is stored."""

    id: str
    salt: str
    hash: str
    text: str


def mint() -> Minted:
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    return Minted(key_id, salt, _hash(salt, secret), f"slm_{key_id}_{secret}")


def parse_key(presented: str) -> tuple[str, str] | None:
    """(id, secret) of a key in the ``slm_<id>_<secret>`` form, or None."""
    m = KEY_RE.match(presented.strip())
    return (m.group(1), m.group(2)) if m else None


def matches(salt: str, stored_hash: str, secret: str) -> bool:
    """Constant-time on the secret."""
    return hmac.compare_digest(_hash(salt, secret), stored_hash)


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()
