"""The control plane's keys for signed desired state (TUF-style; the format is ``slmops.fleet.metadata``).

- **Root key** (offline role): Ed25519, PKCS#8 PEM in a file (``SLMOPS_FLEET_ROOT_KEY``, by default
  ``SLMOPS_HOME/fleet-root.key``, mode 0600). Made, and logged, at the first start of the first replica, when
  the database holds no root metadata yet; it signs that root metadata and nothing else. Replicas need no copy:
  the key can go offline once the root metadata exists (a replica that has a copy checks it is this fleet's).
- **Root metadata** (root.json, naming the root key and the online ``targets`` key): in ``server_secrets``,
  purpose ``root``, epoch = its version; handed to every device at enrolment as its root of trust.
- **Targets key** (online): the raw 32-byte Ed25519 private key in ``server_secrets``, purpose ``targets``,
  epoch 1. Every replica signs every served desired-state document with it, so a device can poll any replica.

Both rows are written insert-if-absent, so replicas starting at once agree on one of each. Nothing here is
logged, served (but root.json) or put in the ledger. ``server_secrets.value`` is declared ``LargeBinary(64)``; the
root metadata (~1 KiB) is longer, which neither SQLite (BLOB) nor PostgreSQL (BYTEA) enforce
(``tests/test_fleet_trust.py`` stores and reads it back on both).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from tuf.api.metadata import Root

from slmops.fleet import metadata
from slmops.fleet.deviceauth import read_private_key
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import ServerSecret
from slmops.store.atomic import TMP_PREFIX, fsync_dir
from slmops.types.errors import ConfigError

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

log = logging.getLogger("slmops.fleet")
STATE = "trust"  # plane.extras key of this replica's Trust
ROOT_SECRET = "root"  # ServerSecret.purpose of root metadata (epoch: its version)
TARGETS_SECRET = "targets"  # ServerSecret.purpose of the online key's raw private bytes
_secrets = ServerSecret.__table__


@dataclass(frozen=True)
class Trust:
    """What a replica signs with and what it hands devices: the online key, root.json and the documents' TTL."""

    signer: CryptoSigner
    root_json: dict[str, Any]
    ttl_s: float


@contextlib.asynccontextmanager
async def lifespan(plane: ControlPlane) -> AsyncIterator[None]:
    """Load (or, on a fresh database, make) the keys into ``plane.extras[STATE]`` before the device side starts."""
    plane.extras[STATE] = await load(plane.db, plane.root_key, plane.metadata_ttl_s, plane.clock())
    try:
        yield
    finally:
        plane.extras.pop(STATE, None)


async def load(db: Database, root_key: Path | None, ttl_s: float, now: float) -> Trust:
    """This fleet's trust. ``root_key``: where the root key is kept (made there when the database has no root
    metadata yet); None keeps a new one in memory only (a control plane embedded in a program or a test)."""
    if ttl_s <= 0:
        raise ConfigError(f"SLMOPS_FLEET_METADATA_TTL={ttl_s}: desired state must live a positive time; set one "
                          "such as 1h")
    targets = await _targets_signer(db, now)
    stored = await _stored_root(db)
    made: Path | None = None
    if stored is None:
        root_signer, made = _root_signer(root_key)
        root_json = metadata.make_root(root_signer, [targets.public_key])
        await _insert(db, ROOT_SECRET, 1, json.dumps(root_json, sort_keys=True).encode(), now)
        stored = await _stored_root(db)  # ours, or the one of a replica that started at the same moment
        assert stored is not None
    root = _checked(stored, targets)
    _check_root_key(root, root_key, made)
    return Trust(targets, stored, ttl_s)


async def _targets_signer(db: Database, now: float) -> CryptoSigner:
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    await _insert(db, TARGETS_SECRET, 1, seed, now)
    async with db.read() as s:
        value = (await s.execute(select(_secrets.c.value).where(_secrets.c.purpose == TARGETS_SECRET)
                                 .order_by(_secrets.c.epoch.desc()).limit(1))).scalar_one()
    try:
        return CryptoSigner(Ed25519PrivateKey.from_private_bytes(bytes(value)))
    except ValueError:
        raise ConfigError("the fleet database's online signing key (server_secrets 'targets') is damaged; restore "
                          "the database from a backup") from None


async def _stored_root(db: Database) -> dict[str, Any] | None:
    async with db.read() as s:
        value = (await s.execute(select(_secrets.c.value).where(_secrets.c.purpose == ROOT_SECRET)
                                 .order_by(_secrets.c.epoch.desc()).limit(1))).scalar_one_or_none()
    if value is None:
        return None
    try:
        found = json.loads(bytes(value))
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ConfigError("the fleet database's root metadata (server_secrets 'root') is damaged; restore the "
                          "database from a backup")
    return found


async def _insert(db: Database, purpose: str, epoch: int, value: bytes, now: float) -> None:
    """Write a secret unless one with this purpose and epoch exists (the first replica's wins)."""
    insert = (sqlite if db.dialect == "sqlite" else postgresql).insert
    async with db.write(bump=False) as s:
        await s.execute(insert(_secrets).values(purpose=purpose, epoch=epoch, value=value, created_at=now)
                        .on_conflict_do_nothing())


def _checked(root_json: dict[str, Any], targets: CryptoSigner) -> Root:
    try:
        root = metadata.load_root(root_json)
    except ValueError as err:
        raise ConfigError(f"the fleet database's root metadata is unusable: {err}; restore the database from a "
                          "backup") from None
    if not metadata.names(root, metadata.ROLE, targets.public_key):
        raise ConfigError("the fleet database's root metadata does not name its online signing key (server_secrets "
                          "was edited?); restore the database from a backup")
    return root


# -- the root key file -----------------------------------------------------------------------------------------
def _root_signer(path: Path | None) -> tuple[CryptoSigner, Path | None]:
    """The root key from ``path``, or a new one (written there when a path is given); and the path when this
    call made the file."""
    if path is None:
        return CryptoSigner(Ed25519PrivateKey.generate()), None
    if path.exists():
        return load_root_key(path), None
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    if not _create_exclusive(path, pem):  # another replica on this host made it a moment ago
        return load_root_key(path), None
    log.warning("made the fleet root key at %s (mode 0600): it signs the root metadata every device trusts; "
                "back it up and keep it offline (replicas do not need it)", path)
    return CryptoSigner(private), path


def load_root_key(path: Path) -> CryptoSigner:
    """The root key in ``path``; refuses a file others can read, as ssh does."""
    return CryptoSigner(read_private_key(
        path, "fleet root key", missing="cannot read the fleet root key (no such file); check SLMOPS_FLEET_ROOT_KEY",
        wrong="not an Ed25519 private key (PKCS#8 PEM); point SLMOPS_FLEET_ROOT_KEY at the fleet's root key"))


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` (mode 0600) only if nothing is there, all or nothing: a temp file linked into
    place. False when ``path`` already existed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        os.unlink(tmp)


def _check_root_key(root: Root, path: Path | None, made: Path | None) -> None:
    """A root key file this replica has must be the one root metadata names. One this call made that lost a race
    (another replica's root metadata was stored first) is removed: nothing was ever signed with it."""
    if path is None or not path.exists():
        return
    signer = load_root_key(path)
    if metadata.names(root, "root", signer.public_key):
        return
    if made is not None:
        path.unlink()
        log.warning("removed the fleet root key just made at %s: another replica's root metadata was stored first; "
                    "its root key is the fleet's", path)
        return
    raise ConfigError(f"{path} is not the root key of this fleet database's root metadata; point "
                      "SLMOPS_FLEET_ROOT_KEY at the fleet's root key, or move this file away (replicas need none)")
