"""Whether this device may keep prompt and answer text: its privacy opt-in for rated feedback.

No prompt or output text leaves a device unless a blueprint opts in with ``privacy: {feedback: true}``; without it
the device does not even keep rated feedback. Telemetry (reports) never carries text either way.

Where the answer comes from:

- A fleet device: its blueprint. The agent calls :func:`apply` with the config of every desired state it applies,
  which persists the effective opt-in in ``SLMOPS_HOME/fleet/privacy.json`` (atomically, and only when it
  changed). The local server asks :class:`OptIn` on every feedback request: one ``stat``, and a read only when the
  file changed, so an opt-out takes effect at the next request, without a restart. The control plane checks the
  blueprint again before it stores anything a device uploads.
- A device no control plane manages (no such file): its own setting, ``SLMOPS_FEEDBACK`` or ``privacy.feedback``
  in its deployment config, both off by default.

A file that cannot be read or parsed means no: the safe answer when in doubt. A device taken out of a fleet keeps
its last file until it is deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.store.atomic import write_bytes

KEY = "privacy.feedback"  # the blueprint / deployment-config key that opts in
FILE = Path("fleet") / "privacy.json"  # under SLMOPS_HOME
REFUSED = ("feedback collection is off on this device: opt in with `privacy: {feedback: true}` in its blueprint "
           "(fleet devices) or deployment config (or SLMOPS_FEEDBACK=true)")


@dataclass(frozen=True)
class Privacy:
    feedback: bool = False


def from_config(config: Mapping[str, Any] | None) -> Privacy:
    """The opt-in an effective config sets (a desired state's ``config``): only a literal ``true`` opts in."""
    section = config.get("privacy") if isinstance(config, Mapping) else None
    return Privacy(feedback=isinstance(section, Mapping) and section.get("feedback") is True)


def path(home: Path) -> Path:
    return Path(home) / FILE


def read(home: Path) -> Privacy | None:
    """The opt-in the fleet set, or None when no control plane ever did (the device's own setting decides)."""
    try:
        data = json.loads(path(home).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return Privacy(feedback=False)
    return Privacy(feedback=isinstance(data, dict) and data.get("feedback") is True)


def apply(home: Path, config: Mapping[str, Any]) -> None:
    """Persist the opt-in of an applied desired state's ``config``: called by the agent after every desired state
    it applies. Writes only when the answer changed, atomically (readers see the old file or the new one)."""
    wanted = from_config(config)
    if read(home) == wanted:
        return
    target = path(home)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(target, json.dumps({"feedback": wanted.feedback, "source": "blueprint"}).encode() + b"\n")


def allowed(home: Path, local: bool) -> bool:
    """The effective opt-in, read once: the fleet's when it set one, else ``local`` (the device's own setting)."""
    fleet = read(home)
    return local if fleet is None else fleet.feedback


class OptIn:
    """:func:`allowed` for a process that asks on every request (the server): the file is read again only when its
    ``stat`` changed (an atomic replace makes a new inode), so asking costs one ``stat`` and an opt-out written
    by the agent holds from the next request on."""

    def __init__(self, home: Path, local: bool):
        self.home = Path(home)
        self.local = local
        self._path = path(self.home)
        self._seen: tuple[int, int, int, int] | None = None
        self._fleet: Privacy | None = None

    def __call__(self) -> bool:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            self._seen = None
            return self.local
        except OSError:
            return False
        seen = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if seen != self._seen:
            self._fleet = read(self.home)
            self._seen = seen
        return self.local if self._fleet is None else self._fleet.feedback
