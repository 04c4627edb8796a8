"""The server's model runtime: one engine and the roles the handlers use over it, built together.

- :class:`~slmops.server.resolver.Resolver` (``resolver``): a requested name -> the stored model and its spec,
  through the slot table (served names, the fleet agent's A/B slots).
- :class:`~slmops.server.admission.Admission` (``admission``): what a caller may decide (keep-alive, load
  options, token reservations), by its rights.
- :class:`~slmops.server.loaded.LoadedModels` (``models``): the loaded-model table, on one engine thread: uses in
  flight, keep-alive expiry (:class:`~slmops.server.keepalive.Expiry`), unloads, what ``/api/ps`` shows.
- :class:`~slmops.server.inference.Inference` (``inference``): generation streams and embeddings, reported to the
  metrics given here.

The engine is any ``EngineClient``: runner processes in the server, the in-process engine where crash isolation is
not wanted. Everything a role needs comes in through its constructor; nothing is set on it afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from slmops.engine.client import EngineClient
from slmops.server.admission import Admission
from slmops.server.inference import Inference
from slmops.server.keepalive import Expiry
from slmops.server.loaded import LoadedModels
from slmops.server.metrics import Metrics
from slmops.server.resolver import Resolver
from slmops.server.slots import SlotTable
from slmops.store.store import Store
from slmops.types.name import ModelName


class ModelRuntime:
    """``keep_alive``: the server's default, in seconds. ``clock`` times keep-alives. ``metrics``: where generations
    are counted (and what the app's ``/metrics`` serves); a new registry without one. ``slots``: the slot table;
    without one, ``slots.json`` beside the store's root."""

    def __init__(self, store: Store, engine: EngineClient, keep_alive: float,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
                 slots: SlotTable | None = None):
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        if slots is None:
            slots = SlotTable.load(store.root.parent / "slots.json")
        self.resolver = Resolver(store, slots)
        self.admission = Admission(keep_alive, engine.config.default_ctx)
        self.models = LoadedModels(engine, Expiry(clock))
        self.inference = Inference(engine, self.models, self.admission, self.metrics)

    async def preload(self, name: str) -> None:
        """Load ``name`` at start (``SLMOPS_MODEL``), pulling a catalog model first if it is missing, so the
        first request does not pay for it."""
        store, model = self.resolver.store, ModelName.parse(name)
        if not store.exists(model) and store.catalog.lookup(model) is not None:
            await asyncio.to_thread(store.pull, model)
        _, spec = self.resolver.resolve(name)
        await self.models.call(spec, self.engine.load, self.admission.default_keep_alive)

    def start(self) -> None:
        self.models.start()

    async def stop(self) -> None:
        await self.models.stop()
        self.inference.close()


__all__ = ["ModelRuntime"]
