"""Model names as requests give them -> the stored model that runs, through the slot table.

A served name (:mod:`slmops.server.slots`, the fleet agent's A/B slots) maps to a stored model; any other name is
a stored model's own. A request resolves its name once and keeps the spec to its end, whatever the table says
meanwhile: that single lookup is what makes a slot switch atomic.
"""

from __future__ import annotations

from slmops.engine.client import ModelSpec, spec_from_store
from slmops.server import access
from slmops.server.slots import SlotTable
from slmops.store.store import Store
from slmops.types.errors import InvalidInput, ModelNotFound, NotFound
from slmops.types.name import ModelName


class Resolver:
    def __init__(self, store: Store, slots: SlotTable):
        self.store = store
        self.slots = slots

    def resolve(self, name: str) -> tuple[ModelName, ModelSpec]:
        """The stored model a request for ``name`` runs on, and its spec (every blob checked). Records the name
        asked for on the request's context."""
        if not name:
            raise InvalidInput("model is required")
        model = ModelName.parse(name)
        ctx = access.current()
        if ctx is not None:
            ctx.model = model.display
        slot = self.slots.get(model)
        if slot is not None:
            model = ModelName.parse(slot.model)
            if not self.store.exists(model):
                raise NotFound(f'model "{name}" is served from {slot.model}, which is not in the store; the agent '
                               f"stages it again, or DELETE /api/slots/{slot.served} stops serving it")
        elif not self.store.exists(model):
            raise ModelNotFound(name)
        return model, spec_from_store(self.store, model)

    def stored_as(self, name: str) -> str:
        """The stored model (display name) ``name`` runs on now: a served name's slot target, else ``name``."""
        slot = self.slots.get(ModelName.parse(name))
        return slot.model if slot is not None else name

    def shown_as(self, stored: str) -> str:
        """What clients call the stored model ``stored`` now: the served name it answers to, else its own."""
        return self.slots.served_as(stored) or stored


__all__ = ["Resolver"]
