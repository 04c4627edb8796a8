"""Model lifecycle for the server: load on first use, keep-alive expiry, queue bounds, and the bridge from the
engine's blocking iterators to asyncio.

The engine is any ``EngineClient``: runner processes in the server, the in-process engine where crash isolation
is not wanted. Loading, unloading and embedding go through one engine thread, so loads never race. A generation
is started on a starter thread (starting may load the model); from then on the engine calls back with each
piece from its own thread (the runner's, or the pipe reader's) straight onto the event loop: no thread waits
per request, and each piece crosses one thread boundary. A client that goes away cancels its generation at
once, which frees its sequence. Handlers depend on this class only through its methods.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from slmops.config.settings import parse_duration
from slmops.engine.client import (Cancel, Emit, EngineClient, ModelSpec, ModelStatus, ModelUnloaded, Request,
                                  gave_up, spec_from_store, unloaded)
from slmops.engine.outputs import Output
from slmops.security import roles
from slmops.server import access
from slmops.store.store import Store
from slmops.types import options as opts
from slmops.types.errors import Forbidden, InvalidInput, ModelNotFound, NotFound
from slmops.types.name import ModelName

if TYPE_CHECKING:
    from slmops.server.slots import SlotTable


log = logging.getLogger("slmops.server")


def _count(ctx: access.RequestContext, item: Output, counted: tuple[int, int]) -> tuple[int, int]:
    """Add what ``item`` says this stream has used so far to the request's totals; returns the new running pair
    (a request may run several streams, one per choice)."""
    if item.done and item.stats is not None:
        now = (item.stats.prompt_eval_count, item.stats.eval_count)
    else:
        now = (max(counted[0], item.prompt_eval_count), max(counted[1], item.eval_count))
    ctx.prompt_tokens += now[0] - counted[0]
    ctx.completion_tokens += now[1] - counted[1]
    return now


def keep_alive_seconds(value: Any, default: float) -> float:
    """Ollama's ``keep_alive``: a duration string or seconds; 0 unloads; negative keeps the model forever."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidInput("keep_alive must be a duration such as 5m or a number of seconds")
    try:
        seconds = float(value) if isinstance(value, (int, float)) else parse_duration(value)
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    if not math.isfinite(seconds):  # JSON's 1e999 and NaN: say -1 to keep a model loaded for ever
        raise InvalidInput("keep_alive must be a finite duration; use -1 to keep the model loaded")
    return seconds


@dataclass
class LoadedInfo:
    name: str
    spec: ModelSpec
    expires_at: float  # math.inf: never
    context_length: int
    size: int


class ModelRuntime:
    def __init__(self, store: Store, engine: EngineClient, keep_alive: float,
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
        self._starters = ThreadPoolExecutor(max_workers=8, thread_name_prefix="start")
        self._unloading: set[str] = set()
        self._warned: set[str] = set()  # unknown option names already logged
        self.slots: SlotTable | None = None  # served name -> stored model (fleet A/B slots); the app sets it

    async def _on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    # -- resolution ----------------------------------------------------------------------------------------
    def resolve(self, name: str) -> tuple[ModelName, ModelSpec]:
        """The stored model a request for ``name`` runs on, and its spec. A served name goes through the slot
        table first, once: the request keeps this spec to its end, whatever the table says meanwhile."""
        if not name:
            raise InvalidInput("model is required")
        model = ModelName.parse(name)
        ctx = access.current()
        if ctx is not None:
            ctx.model = model.display
        slot = self.slots.get(model) if self.slots is not None else None
        if slot is not None:
            model = ModelName.parse(slot.model)
            if not self.store.exists(model):
                raise NotFound(f'model "{name}" is served from {slot.model}, which is not in the store; the agent '
                               f"stages it again, or DELETE /api/slots/{slot.served} stops serving it")
        elif not self.store.exists(model):
            raise ModelNotFound(name)
        return model, spec_from_store(self.store, model)

    # -- what a caller may decide ---------------------------------------------------------------------------
    # Keep-alive and load settings act on a model every caller shares, so they are the operator's: a caller
    # without the manage right gets the server's keep-alive whatever it asks, and its load options are clamped to
    # the operator's configuration (the Modelfile's, else the server's), so it can never force a reload.
    def keep_alive_for(self, value: Any) -> float:
        keep = keep_alive_seconds(value, self.default_keep_alive)
        ctx = access.current()
        if ctx is None or ctx.can(roles.MANAGE):
            return keep
        if keep == 0:
            raise Forbidden(f'role "{ctx.role}" may not unload models (keep_alive 0); use a key with the operator '
                            "or admin role")
        return self.default_keep_alive

    def options_for(self, spec: ModelSpec, options: dict[str, Any] | None) -> dict[str, Any] | None:
        if not options:
            return options
        options, unknown = opts.split_unknown(options)
        for name in unknown:
            if name not in self._warned:  # once per name: a client sends its options with every request
                self._warned.add(name)
                log.warning('ignoring unknown option "%s"', name[:100])
        ctx = access.current()
        if ctx is None or ctx.can(roles.MANAGE):
            return options
        typed, _ = opts.validate(options)
        kept = {k: v for k, v in typed.items() if k not in opts.LOAD or k == "num_ctx"}
        if "num_ctx" in kept:
            ceiling = opts.validate(spec.params)[0].get("num_ctx") or self.engine.config.default_ctx
            kept["num_ctx"] = min(kept["num_ctx"], ceiling)
        return kept

    async def preload(self, name: str) -> None:
        """Load ``name`` at start (``SLMOPS_MODEL``), pulling a catalog model first if it is missing, so the
        first request does not pay for it."""
        model = ModelName.parse(name)
        if not self.store.exists(model) and self.store.catalog.lookup(model) is not None:
            await asyncio.to_thread(self.store.pull, model)
        _, spec = self.resolve(name)
        await self.call(spec, self.engine.load, self.default_keep_alive)

    # -- requests ------------------------------------------------------------------------------------------
    def queue_depth(self, models: list[ModelStatus] | None = None) -> int:
        return sum(m.waiting for m in (self.engine.loaded() if models is None else models))

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
        """The engine's outputs, as they come. Raises request errors before the first piece.

        Token counts reach the request's context piece by piece, so a stream the client drops is charged and
        audited for what it generated; with a token limit, completion tokens are reserved before it starts."""
        ctx = access.current()
        req = replace(req, options=self.options_for(spec, req.options))
        if ctx is not None:
            req = self._within_token_limit(ctx, spec, req)
        self._enter(spec.name)
        item: Any = None
        t0, ttft = time.perf_counter(), None
        text: list[str] | None = [] if ctx is not None and ctx.content is not None else None
        counted = (0, 0)
        try:
            async for item in self._pieces(spec, req):
                if ttft is None and (item.text or item.done):
                    ttft = time.perf_counter() - t0
                if text is not None:
                    text.append(item.text)
                if item.done and item.stats is not None and self.on_generation:
                    self.on_generation(spec.name, item.stats, ttft)
                if ctx is not None:
                    counted = _count(ctx, item, counted)
                yield item
        except (GeneratorExit, asyncio.CancelledError):  # the client left; a refusal (503) is not a cancellation
            if item is None or not item.done:
                if ctx is not None:
                    ctx.complete = False
                if self.on_cancel:
                    self.on_cancel(spec.name)
            raise
        finally:
            if text is not None and ctx is not None and ctx.content is not None:
                ctx.content.setdefault("completions", []).append("".join(text))
            self._leave(spec.name, keep_alive)

    def _within_token_limit(self, ctx: access.RequestContext, spec: ModelSpec, req: Request) -> Request:
        """Reserve this generation's completion tokens from the key's bucket; a generation that asked for no
        limit is capped at what was reserved."""
        options = opts.merge(spec.params, req.options)
        wanted = options.get("num_predict", -1)
        ceiling = options.get("num_ctx") or self.engine.config.default_ctx  # the context it will run in
        cap = ctx.reserve_completion(wanted, ceiling)
        if cap is None or 0 < wanted <= cap:
            return req
        return replace(req, options={**(req.options or {}), "num_predict": cap})

    async def _pieces(self, spec: ModelSpec, req: Request) -> AsyncIterator[Output]:
        """Start the generation on a starter thread (it may load the model), then await pieces the engine hands
        to the event loop from its own thread. Leaving early (a client gone) cancels it."""
        loop = asyncio.get_running_loop()
        for _ in range(3):
            pieces: asyncio.Queue = asyncio.Queue()
            started = done = False
            cancel: Cancel | None = None
            try:
                cancel = await self._start(spec, req, lambda x: loop.call_soon_threadsafe(pieces.put_nowait, x))
                while not done:
                    item = await pieces.get()
                    if isinstance(item, BaseException):
                        done = True
                        raise item
                    done, started = item.done, True
                    yield item
                return
            except ModelUnloaded:
                unloaded(spec.name, started)
            finally:
                if not done and cancel is not None:
                    cancel()
        raise gave_up(spec.name)

    async def _start(self, spec: ModelSpec, req: Request, emit: Emit) -> Cancel:
        future = self._starters.submit(self.engine.start, spec, req, emit)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client left while the model loaded: cancel once it has started
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result()())
            raise

    async def embed(self, spec: ModelSpec, inputs: list[str], options: dict[str, Any] | None, truncate: bool,
                    keep_alive: float) -> tuple[list[list[float]], int, int]:
        options = self.options_for(spec, options)
        self._enter(spec.name)
        try:
            vectors, used, load_ns = await self._on_engine(self.engine.embed, spec, inputs, options, truncate)
            ctx = access.current()
            if ctx is not None:
                ctx.prompt_tokens += used
            return vectors, used, load_ns
        finally:
            self._leave(spec.name, keep_alive)

    async def call(self, spec: ModelSpec, fn: Callable[..., Any], keep_alive: float, *args: Any) -> Any:
        """Run ``fn(spec, *args)`` (the engine's load, tokenize or detokenize) counting as a use of the model."""
        self._enter(spec.name)
        try:
            return await self._on_engine(fn, spec, *args)
        finally:
            self._leave(spec.name, keep_alive)

    async def unload(self, name: str) -> bool:
        self._expiry.pop(name, None)
        return await self._on_engine(self.engine.unload, name)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def loaded(self, models: list[ModelStatus] | None = None) -> list[LoadedInfo]:
        out = []
        for m in self.engine.loaded() if models is None else models:
            if m.name in self._unloading:
                continue
            size = m.spec.model_path.stat().st_size if m.spec.model_path.exists() else 0
            out.append(LoadedInfo(m.name, m.spec, self._expiry.get(m.name, math.inf), m.num_ctx, size))
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
        self._starters.shutdown(wait=False)
