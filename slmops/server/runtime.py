"""Model lifecycle for the server: load on first use, keep-alive expiry, queue bounds, and the bridge from the
engine's blocking iterators to asyncio.

Generation runs on each model's batching runner thread; other llama.cpp work (loading, embeddings, tokenizing)
runs on one engine thread. ggml's CPU threads belong to the thread that calls it, and a new calling thread per
request left the previous team spinning on the same cores (measured: a 31-token prompt took 3 s instead of
30 ms). Each request's pieces cross to the event loop through a queue. A client that goes away sets a cancel
flag the worker checks between tokens, so its sequence is freed at once. Handlers depend
on this class only through its methods; the batching runner of a later release plugs in behind the same ones.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from slmops.config.settings import parse_duration
from slmops.engine.engine import Engine, Request, spec_from_store
from slmops.engine.model import ModelSpec
from slmops.engine.outputs import Output
from slmops.store.store import Store
from slmops.types.errors import InvalidInput, ModelNotFound
from slmops.types.name import ModelName

_END = object()


def keep_alive_seconds(value: Any, default: float) -> float:
    """Ollama's ``keep_alive``: a duration string or seconds; 0 unloads; negative keeps the model forever."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidInput("keep_alive must be a duration such as 5m or a number of seconds")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return parse_duration(value)
    except ValueError as err:
        raise InvalidInput(str(err)) from None


@dataclass
class LoadedInfo:
    name: str
    spec: ModelSpec
    expires_at: float  # math.inf: never
    context_length: int
    size: int


class ModelRuntime:
    def __init__(self, store: Store, engine: Engine, keep_alive: float,
                 clock: Callable[[], float] = time.time, on_generation: Callable[..., None] | None = None):
        self.on_generation = on_generation
        self.on_cancel: Callable[[str], None] | None = None
        self.store = store
        self.engine = engine
        self.default_keep_alive = keep_alive
        self.clock = clock
        self._expiry: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._reaper: asyncio.Task | None = None
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._unloading: set[str] = set()

    async def _on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    # -- resolution ----------------------------------------------------------------------------------------
    def resolve(self, name: str) -> tuple[ModelName, ModelSpec]:
        if not name:
            raise InvalidInput("model is required")
        model = ModelName.parse(name)
        if not self.store.exists(model):
            raise ModelNotFound(name)
        return model, spec_from_store(self.store, model)

    # -- requests ------------------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return sum(len(m.runner.scheduler.waiting) for m in self.engine.loaded())

    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    def _enter(self, name: str) -> None:
        """Count the request; the model's scheduler bounds how many may wait (503 beyond)."""
        self._in_flight[name] = self._in_flight.get(name, 0) + 1

    def _leave(self, name: str, keep_alive: float) -> None:
        """Synchronous on purpose: it runs in ``finally`` blocks of cancelled tasks, where awaiting is not possible.
        An unload it schedules queues behind the request on the engine thread, so it never cuts a request short."""
        self._in_flight[name] -= 1
        if self._in_flight[name] == 0:
            del self._in_flight[name]
        self._expiry[name] = math.inf if keep_alive < 0 else self.clock() + keep_alive
        if keep_alive == 0 and name not in self._in_flight:
            self._expiry.pop(name, None)
            self._unloading.add(name)  # gone from /api/ps at once, though freed a moment later
            self._engine_thread.submit(self._unload_now, name)

    def _unload_now(self, name: str) -> None:
        try:
            self.engine.unload(name)
        finally:
            self._unloading.discard(name)

    async def stream(self, spec: ModelSpec, req: Request, keep_alive: float) -> AsyncIterator[Output]:
        """The engine's outputs, as they come. Raises request errors before the first piece."""
        self._enter(spec.name)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def worker() -> None:
            try:
                if cancel.is_set():
                    return
                it = self.engine.run(spec, req)
                for out in it:
                    loop.call_soon_threadsafe(queue.put_nowait, out)
                    if cancel.is_set():
                        it.close()
                        break
            except BaseException as err:  # handed to the event loop, which re-raises it there
                loop.call_soon_threadsafe(queue.put_nowait, err)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        threading.Thread(target=worker, name="request", daemon=True).start()
        item: Any = None
        t0, ttft = time.perf_counter(), None
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if ttft is None and (item.text or item.done):
                    ttft = time.perf_counter() - t0
                if item.done and item.stats is not None and self.on_generation:
                    self.on_generation(spec.name, item.stats, ttft)
                yield item
        finally:
            cancel.set()
            cut_short = item is None or (isinstance(item, Output) and not item.done)
            if cut_short and self.on_cancel:
                self.on_cancel(spec.name)
            self._leave(spec.name, keep_alive)

    async def embed(self, spec: ModelSpec, inputs: list[str], options: dict[str, Any] | None, truncate: bool,
                    keep_alive: float) -> tuple[list[list[float]], int, int]:
        self._enter(spec.name)
        try:
            return await self._on_engine(self.engine.embed, spec, inputs, options, truncate)
        finally:
            self._leave(spec.name, keep_alive)

    async def call(self, spec: ModelSpec, fn: Callable[..., Any], keep_alive: float, *args: Any) -> Any:
        """Run ``fn(loaded_model, *args)`` on the loaded model (tokenize, detokenize, load-only)."""
        self._enter(spec.name)
        try:
            def work() -> Any:
                model, _ = self.engine.load(spec)
                return fn(model, *args)
            return await self._on_engine(work)
        finally:
            self._leave(spec.name, keep_alive)

    async def unload(self, name: str) -> bool:
        self._expiry.pop(name, None)
        return await self._on_engine(self.engine.unload, name)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def loaded(self) -> list[LoadedInfo]:
        out = []
        for m in self.engine.loaded():
            if m.spec.name in self._unloading:
                continue
            size = m.spec.model_path.stat().st_size if m.spec.model_path.exists() else 0
            out.append(LoadedInfo(m.spec.name, m.spec, self._expiry.get(m.spec.name, math.inf),
                                  m.load_params.num_ctx, size))
        return out

    async def reap_once(self) -> None:
        now = self.clock()
        for name, when in list(self._expiry.items()):
            if when <= now and name not in self._in_flight:
                await self.unload(name)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.reap_once()

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        await self._on_engine(self.engine.close)
        self._engine_thread.shutdown(wait=False)
