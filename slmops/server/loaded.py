"""The loaded-model table: which models the engine holds, how many requests use each, and unloading a model once
its keep-alive has run out and nothing uses it.

Loading, unloading, embedding and tokenizing go through one engine thread, so loads never race. A use counts from
its start to its end (:meth:`LoadedModels.using`); its end renews the model's keep-alive (:class:`Expiry`), and
keep-alive 0 unloads the model at once unless another request still uses it. The engine's own scheduler bounds how
many requests may wait per model (503 beyond); this table only counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from slmops.engine.client import EngineClient, ModelSpec, ModelStatus
from slmops.server.keepalive import Expiry


@dataclass
class LoadedInfo:
    name: str
    spec: ModelSpec
    expires_at: float  # math.inf: never
    context_length: int
    size: int
    fallback: str | None = None  # why it runs on the CPU though a GPU was asked for
    pid: int = 0  # its runner process; 0 when it runs in the server's process


class LoadedModels:
    def __init__(self, engine: EngineClient, expiry: Expiry):
        self.engine = engine
        self.expiry = expiry
        self._in_flight: dict[str, int] = {}
        self._unloading: set[str] = set()
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._reaper: asyncio.Task | None = None

    async def on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the engine thread, behind every load and unload queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    # -- uses ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, name: str, keep_alive: float) -> Iterator[None]:
        """A use of ``name`` for the block; at its end the model stays ``keep_alive`` seconds more."""
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        try:
            yield
        finally:
            self._leave(name, keep_alive)

    def _leave(self, name: str, keep_alive: float) -> None:
        """Synchronous on purpose: it runs in ``finally`` blocks of cancelled tasks, where awaiting is not possible.
        An unload it schedules queues behind the request on the engine thread, so it never cuts a request short."""
        self._in_flight[name] -= 1
        if self._in_flight[name] == 0:
            del self._in_flight[name]
        self.expiry.renew(name, keep_alive)
        if keep_alive == 0 and name not in self._in_flight:
            self.expiry.forget(name)
            self._unloading.add(name)  # gone from /api/ps at once, though freed a moment later
            self._engine_thread.submit(self._unload_now, name)

    def _unload_now(self, name: str) -> None:
        try:
            self.engine.unload(name)
        finally:
            self._unloading.discard(name)

    async def call(self, spec: ModelSpec, fn: Callable[..., Any], keep_alive: float, *args: Any) -> Any:
        """Run ``fn(spec, *args)`` (the engine's load, tokenize or detokenize) counting as a use of the model."""
        with self.using(spec.name, keep_alive):
            return await self.on_engine(fn, spec, *args)

    async def unload(self, name: str) -> bool:
        self.expiry.forget(name)
        return await self.on_engine(self.engine.unload, name)

    # -- what is loaded ------------------------------------------------------------------------------------
    def loaded(self, models: list[ModelStatus] | None = None) -> list[LoadedInfo]:
        """The loaded models (``models``: the engine's list, if the caller has it already), less those on their
        way out."""
        out = []
        for m in self.engine.loaded() if models is None else models:
            if m.name in self._unloading:
                continue
            size = sum(p.stat().st_size for p in (m.spec.files.values() or [m.spec.model_path]) if p.exists())
            out.append(LoadedInfo(m.name, m.spec, self.expiry.at(m.name), m.num_ctx, size, m.fallback, m.pid))
        return out

    def queue_depth(self, models: list[ModelStatus] | None = None) -> int:
        return sum(m.waiting for m in (self.engine.loaded() if models is None else models))

    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    # -- expiry --------------------------------------------------------------------------------------------
    async def reap_once(self) -> None:
        """Unload every model whose keep-alive ran out and that nothing uses."""
        for name in self.expiry.due():
            if name not in self._in_flight:
                await self.unload(name)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.reap_once()

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def stop(self) -> None:
        """Stop reaping, close the engine (unloading everything), and let the engine thread go."""
        if self._reaper:
            self._reaper.cancel()
        await self.on_engine(self.engine.close)
        self._engine_thread.shutdown(wait=False)


__all__ = ["LoadedInfo", "LoadedModels"]
