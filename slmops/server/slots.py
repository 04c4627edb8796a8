"""The slot table: served name -> stored model, and its routes (``/api/slots``).

A fleet device serves a release under one stable name while the model behind it moves between two stored slots
(A/B): the agent stages the next release in the idle slot, warm-loads it, then points the served name at it with
one ``PUT /api/slots/{served}``. :meth:`slmops.server.resolver.Resolver.resolve` maps a served name through the
table once per request, so a request keeps the model it resolved until it ends (requests in flight finish on the
old model, the next ones get the new); that single lookup is what makes the switch atomic, and the warm-load before
it is what makes it gapless.

The table lives in ``SLMOPS_HOME/slots.json``, rewritten atomically on every change and read at start, so a
restarted server serves what it served before. A change swaps the in-memory mapping as a whole (never edited in
place), so a lookup sees the table before or after a change, never half of one. Served names are normalised as
model names (``smollm2`` is ``smollm2:latest``); a served name shadows a stored model of the same name. Resolution
is one step: the target of a slot is a stored model, never another served name.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from slmops.api.slots import SlotInfo, SlotRequest, SlotsResponse
from slmops.store.atomic import atomic_writer
from slmops.types.errors import ConfigError, Conflict, InvalidName, NotFound
from slmops.types.name import ModelName

FORMAT = 1
router = APIRouter()


@dataclass(frozen=True)
class Slot:
    served: str  # ModelName display
    model: str  # ModelName display of a stored model
    release: str | None
    updated_at: float

    def info(self) -> SlotInfo:
        return SlotInfo(**asdict(self))


class SlotTable:
    """Served name -> :class:`Slot`, persisted in ``path``. Lookups read one immutable snapshot; changes are
    serialised, written to the file first, then swapped in."""

    def __init__(self, path: Path, slots: dict[str, Slot] | None = None, clock: Callable[[], float] = time.time):
        self.path = path
        self.clock = clock
        self._slots: dict[str, Slot] = dict(slots or {})
        self._write = threading.Lock()

    @classmethod
    def load(cls, path: Path, clock: Callable[[], float] = time.time) -> SlotTable:
        """The table in ``path``; none yet is an empty table. A damaged file stops the server with what to do,
        rather than serving names to the wrong models."""
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(path, clock=clock)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path} is unreadable ({err}); fix or remove it (the agent sets the slots again)"
                              ) from None
        try:
            slots = {s.served: s for s in (Slot(**raw) for raw in doc["slots"])}
            for slot in slots.values():
                ModelName.parse(slot.served)
                ModelName.parse(slot.model)
        except (KeyError, TypeError, ValueError, InvalidName) as err:
            raise ConfigError(f"{path} is not a slot table ({err}); fix or remove it (the agent sets the slots "
                              "again)") from None
        return cls(path, slots, clock)

    # -- reading (any thread) ------------------------------------------------------------------------------
    def get(self, served: ModelName) -> Slot | None:
        return self._slots.get(served.display)

    def all(self) -> list[Slot]:
        return sorted(self._slots.values(), key=lambda s: s.served)

    def served_as(self, model: str) -> str | None:
        """The served name ``model`` (a stored model's display name) answers to now, if any."""
        return next((s.served for s in self._slots.values() if s.model == model), None)

    def check_removable(self, model: ModelName) -> None:
        """Refuse to remove a stored model a served name resolves to: every request for that name would fail."""
        served = self.served_as(model.display)
        if served is not None:
            raise Conflict(f'model "{model.display}" is what "{served}" serves now; point "{served}" at another '
                           f"model first (the fleet agent does at the next release), or remove the slot with "
                           f"DELETE /api/slots/{served}")

    # -- changing ------------------------------------------------------------------------------------------
    def put(self, served: ModelName, model: ModelName, release: str | None) -> Slot:
        slot = Slot(served.display, model.display, release, self.clock())
        with self._write:
            self._commit({**self._slots, slot.served: slot})
        return slot

    def remove(self, served: ModelName) -> Slot:
        with self._write:
            slot = self._slots.get(served.display)
            if slot is None:
                raise NotFound(f'"{served.display}" is not a served name; GET /api/slots lists them')
            self._commit({k: v for k, v in self._slots.items() if k != served.display})
        return slot

    def _commit(self, slots: dict[str, Slot]) -> None:
        doc = {"format": FORMAT, "slots": [asdict(s) for s in sorted(slots.values(), key=lambda s: s.served)]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(self.path) as f:
            f.write(json.dumps(doc, indent=2).encode())
        self._slots = slots  # one reference swap: a lookup sees the old table or the new one


# -- routes (roles: GET read, PUT and DELETE manage; see slmops.security.roles) -------------------------------

def _table(request: Request) -> SlotTable:
    return request.app.state.slots


@router.get("/api/slots")
async def list_slots(request: Request) -> SlotsResponse:
    return SlotsResponse(slots=[s.info() for s in _table(request).all()])


@router.put("/api/slots/{model:path}")
async def put_slot(model: str, body: SlotRequest, request: Request) -> SlotInfo:
    """Serve ``body.model`` under the served name ``model`` from the next request on."""
    served, target = ModelName.parse(model), ModelName.parse(body.model)
    if not request.app.state.store.exists(target):
        raise NotFound(f'model "{target.display}" is not in the store; pull or stage it before serving it as '
                       f'"{served.display}"')
    return (await run_in_threadpool(_table(request).put, served, target, body.release)).info()


@router.delete("/api/slots/{model:path}")
async def delete_slot(model: str, request: Request) -> SlotInfo:
    """Stop serving a name; the stored model stays (requests in flight finish on it)."""
    return (await run_in_threadpool(_table(request).remove, ModelName.parse(model))).info()


__all__ = ["Slot", "SlotTable", "router"]
