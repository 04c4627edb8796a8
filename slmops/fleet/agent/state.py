"""What the edge agent remembers across restarts, in ``SLMOPS_HOME/fleet/agent.json`` (written atomically).

The two slots and which one serves, the switch whose health window is still open, the desired version and ETag
last applied, releases that failed on this device, and the report windows not yet delivered (a bounded queue: the
oldest go first when the control plane stays away for long, and the number dropped is kept). A restarted agent
reads this back, points the served name at the active slot again if the server lost it, and goes on where it
stopped; the ETag is only kept once a document was fully applied, so a document whose apply was cut short is
fetched and applied again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.store.atomic import atomic_writer
from slmops.types.errors import ConfigError

FORMAT = 1
FILE = Path("fleet") / "agent.json"  # under SLMOPS_HOME
SLOTS = ("a", "b")
QUEUE_LIMIT = 1024  # report windows kept while the control plane is away (17 h of 1-minute windows)


def state_file(home: Path) -> Path:
    return Path(home) / FILE


@dataclass
class SlotState:
    """A slot's content: the stored model (a hidden slot name), the release it is, its manifest digest."""

    model: str
    release: str
    digest: str


@dataclass
class Pending:
    """A switch whose health window is open: the release switched to, when, and the slot it replaced (kept, and
    still loaded, to switch back to)."""

    release: str
    since: float
    previous: str | None


@dataclass
class AgentState:
    served: str | None = None  # the served name clients ask for
    active: str | None = None  # the slot serving it: "a" or "b"
    slots: dict[str, SlotState] = field(default_factory=dict)
    pending: Pending | None = None
    applied_version: int = 0  # the desired version last acted on (its release applied, or tried and refused)
    etag: str | None = None  # the ETag of that document
    failed: dict[str, float] = field(default_factory=dict)  # "release@digest" -> when it failed here
    health: str = "unknown"
    queue: list[dict[str, Any]] = field(default_factory=list)  # api.fleet.Window dumps, oldest first
    dropped: int = 0  # windows dropped from a full queue
    last_poll: float | None = None  # the last answer of the control plane (device clock)
    last_error: str | None = None

    # -- slots -------------------------------------------------------------------------------------------------
    def slot(self, name: str | None) -> SlotState | None:
        return self.slots.get(name) if name else None

    @property
    def idle(self) -> str:
        """The slot not serving (the one a new release is staged in)."""
        return "b" if self.active == "a" else "a"

    def holding(self, digest: str) -> str | None:
        """The slot that holds the model with manifest ``digest``, the active one first."""
        for name in (self.active, self.idle):
            slot = self.slot(name)
            if slot is not None and slot.digest == digest:
                return name
        return None

    # -- report queue ------------------------------------------------------------------------------------------
    def enqueue(self, windows: list[dict[str, Any]], limit: int = QUEUE_LIMIT) -> None:
        self.queue.extend(windows)
        extra = len(self.queue) - limit
        if extra > 0:
            del self.queue[:extra]
            self.dropped += extra

    # -- persistence -------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AgentState:
        doc = {k: v for k, v in doc.items() if k != "format"}
        slots = {k: SlotState(**v) for k, v in (doc.pop("slots", None) or {}).items() if k in SLOTS}
        pending = doc.pop("pending", None)
        return cls(slots=slots, pending=Pending(**pending) if pending else None, **doc)

    @classmethod
    def load(cls, path: Path) -> AgentState:
        """The state in ``path``; none yet: a fresh agent."""
        try:
            return cls.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{path} is unreadable ({err}); remove it: the agent applies the desired state "
                              "again from scratch") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as f:
            f.write(json.dumps(self.to_json(), indent=1).encode())


__all__ = ["FILE", "QUEUE_LIMIT", "SLOTS", "AgentState", "Pending", "SlotState", "state_file"]
