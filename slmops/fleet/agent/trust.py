"""The device's trust store: the root of trust it got at enrolment and the highest desired-state version it has
taken, and the checks every served document passes before anything is activated.

A document is activated only if (in this order; the first that fails names the :class:`Refused` reason):

1. it is signed desired state at all (``malformed``);
2. keys of the root's ``targets`` role signed it to their threshold (``unknown_key`` when none of them did,
   ``signature`` when one did and the signature does not verify);
3. it is this device's (``device``): a control plane cannot hand one device's document to another;
4. its version is at least the highest this device has taken (``rollback``): a replayed or frozen control plane
   cannot push the device back to an older, perhaps vulnerable release. An equal version is the same document (a
   poll after a restart, or a re-sign with a later expiry), so it passes;
5. it has not expired by the device's **own** clock (``expired``). Never by the clock offset the device client
   learns from the control plane (``Slmops-Server-Time``, ``Date``): those come from the very server being
   judged, and a replaying one could shift the device's idea of the time back until an old document looks
   current. A device whose clock runs ahead refuses documents early (it keeps serving what it runs); one that
   runs behind accepts them for longer.

Refusal blocks activation, never serving: the agent keeps running its current release. The highest version moves
only through :meth:`TrustStore.accept`, called when the agent activates (or acknowledges, e.g. a document that
changes nothing to run) a document: a document checked but never acted on (a pull that failed) raises the floor
for nothing. It is kept in ``SLMOPS_HOME/fleet/trust.json`` beside ``root.json``, both written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slmops.api.fleet import DesiredState
from slmops.fleet import metadata
from slmops.fleet.metadata import Refused
from slmops.store.atomic import atomic_writer
from slmops.types.errors import ConfigError

__all__ = ["ROOT_FILE", "STATE_FILE", "Refused", "TrustStore"]

ROOT_FILE = "root.json"
STATE_FILE = "trust.json"


class TrustStore:
    """One device's trust: ``root_json`` (checked against its own root keys on construction) and ``highest``, the
    highest desired-state version taken; with a ``folder``, :meth:`accept` and :meth:`save` write there."""

    def __init__(self, root_json: dict[str, Any], highest: int = 0, folder: Path | None = None):
        try:
            self.root = metadata.load_root(root_json)
        except ValueError as err:
            where = folder / ROOT_FILE if folder is not None else "the trust root"
            raise ConfigError(f"{where}: {err}; enrol this device again") from None
        self.root_json = root_json
        self.highest = highest
        self.folder = folder

    @classmethod
    def load(cls, folder: Path) -> TrustStore:
        """The store kept in ``folder`` (``SLMOPS_HOME/fleet``); a device enrolled before signed desired state
        has no root.json and must enrol again."""
        folder = Path(folder)
        root_json = _read(folder / ROOT_FILE, "this device has no trust root; remove {folder} and enrol it again",
                          folder)
        state = _read(folder / STATE_FILE, None, folder) or {}
        highest = state.get("highest", 0) if isinstance(state, dict) else None
        if not isinstance(highest, int) or isinstance(highest, bool) or highest < 0:
            raise ConfigError(f"{folder / STATE_FILE}: 'highest' is not a version; restore it or enrol again")
        return cls(root_json, highest, folder)

    def save(self) -> None:
        """Write root.json and trust.json (each atomically) into the folder; nothing without one."""
        if self.folder is None:
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_writer(self.folder / ROOT_FILE) as f:
            f.write(json.dumps(self.root_json, indent=1, sort_keys=True).encode())
        self._save_state()

    def check(self, data: bytes | dict[str, Any], device_id: str, now: float) -> DesiredState:
        """The served document ``data`` (``SignedDesired`` bytes or its parsed dict) as a ``DesiredState`` when
        it passes every check in the module docstring; :class:`Refused` otherwise. ``now`` is the device's own
        clock (``time.time()``), never corrected by an offset learned from the control plane. Records nothing."""
        signed = metadata.open_envelope(self.root, data)
        try:
            state = DesiredState.model_validate(signed)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "document"
            raise Refused("malformed", f"desired state: {where}: {first['msg']}; refused") from None
        if state.device_id != device_id:
            raise Refused("device", f"desired state for device {state.device_id}, not this one ({device_id}); "
                                    "refused")
        if state.version < self.highest:
            raise Refused("rollback", f"desired state version {state.version} is older than version {self.highest} "
                                      "this device has taken (replayed or rolled back); refused")
        if state.expires is None:
            raise Refused("malformed", "desired state without an expiry; refused")
        if now >= state.expires:
            raise Refused("expired", f"desired state version {state.version} expired {now - state.expires:.0f} s "
                                     "ago by this device's clock; refused until a fresh one comes (if this "
                                     "repeats, check the device's clock)")
        return state

    def accept(self, version: int) -> None:
        """Record ``version`` as taken (activated or acknowledged): older ones are refused from now on. Never moves
        back; persisted before it returns when the store has a folder."""
        if version <= self.highest:
            return
        self.highest = version
        self._save_state()

    def _save_state(self) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_writer(self.folder / STATE_FILE) as f:
            f.write(json.dumps({"highest": self.highest}).encode())


def _read(path: Path, missing: str | None, folder: Path) -> Any:
    """The JSON in ``path``; None when absent and ``missing`` is None, else ConfigError with that message."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        if missing is None:
            return None
        raise ConfigError(missing.format(folder=folder)) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); restore it, or remove {folder} and enrol again") from None
