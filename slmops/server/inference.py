"""Running requests on a model: generation streams and embeddings, each counted as a use of its model.

A generation is started on a starter thread (starting may load the model); from then on the engine calls back with
each piece from its own thread (the runner's, or the pipe reader's) straight onto the event loop: no thread waits
per request, and each piece crosses one thread boundary. A client that goes away cancels its generation at once,
which frees its sequence.

What a stream produced is reported twice: to the :class:`Observer` given at construction (the server's metrics:
tokens, time to first token, cancellations), and to the request's context (:mod:`slmops.server.access`) piece by
piece, so a stream the client drops is charged and audited for what it generated; and, when traces are on, to the
request's span (:mod:`slmops.server.tracing`), which turns the final stats into queue, prefill and decode spans.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from slmops.engine.client import Cancel, Emit, EngineClient, ModelSpec, ModelUnloaded, Request, gave_up, unloaded
from slmops.engine.outputs import Output, Stats
from slmops.server import access, tracing
from slmops.server.admission import Admission
from slmops.server.loaded import LoadedModels
from slmops.types.errors import EngineError, IntegrityError, SlmopsError


class Observer(Protocol):
    """What the server's metrics learn of each generation (:class:`slmops.server.metrics.Metrics` is one)."""

    def generation(self, model: str, stats: Stats, ttft_s: float | None) -> None:
        """A generation of ``model`` finished; ``ttft_s``: seconds to its first piece."""

    def cancellation(self, model: str) -> None:
        """A generation of ``model`` stopped because its client left."""

    def failure(self, model: str, err: SlmopsError, loaded: bool) -> None:
        """A generation of ``model`` failed with ``err`` (before its first piece or mid-stream); ``loaded``:
        whether the model is still loaded after it."""


class Unobserved:
    """An :class:`Observer` that keeps nothing."""

    def generation(self, model: str, stats: Stats, ttft_s: float | None) -> None:
        pass

    def cancellation(self, model: str) -> None:
        pass

    def failure(self, model: str, err: SlmopsError, loaded: bool) -> None:
        pass


class _Tally:
    """One stream's account in the request's context: token counts as they grow (a request may run several
    streams, one per choice), and the completion's text when the audit log keeps content."""

    def __init__(self, ctx: access.RequestContext | None):
        self.ctx = ctx
        self.text: list[str] | None = [] if ctx is not None and ctx.content is not None else None
        self.counted = (0, 0)

    def add(self, item: Output) -> None:
        if self.text is not None:
            self.text.append(item.text)
        if self.ctx is None:
            return
        if item.done and item.stats is not None:
            now = (item.stats.prompt_eval_count, item.stats.eval_count)
        else:
            now = (max(self.counted[0], item.prompt_eval_count), max(self.counted[1], item.eval_count))
        self.ctx.prompt_tokens += now[0] - self.counted[0]
        self.ctx.completion_tokens += now[1] - self.counted[1]
        self.counted = now

    def cut_short(self) -> None:
        if self.ctx is not None:
            self.ctx.complete = False

    def close(self) -> None:
        if self.text is not None and self.ctx is not None and self.ctx.content is not None:
            self.ctx.content.setdefault("completions", []).append("".join(self.text))


class Inference:
    def __init__(self, engine: EngineClient, models: LoadedModels, admission: Admission,
                 observer: Observer | None = None):
        self.engine = engine
        self.models = models
        self.admission = admission
        self.observer: Observer = observer or Unobserved()
        self._starters = ThreadPoolExecutor(max_workers=8, thread_name_prefix="start")

    async def stream(self, spec: ModelSpec, req: Request, keep_alive: float) -> AsyncIterator[Output]:
        """The engine's outputs, as they come. Raises request errors before the first piece. With a token limit,
        completion tokens are reserved before it starts."""
        asked, req = req, self.admission.request_for(spec, req)
        ctx, span = access.current(), tracing.current()
        tally = _Tally(ctx)
        traced = span.generation(ctx.model if ctx and ctx.model else spec.name, spec.name, asked) if span else None
        item: Any = None
        t0, ttft = time.perf_counter(), None
        with self.models.using(spec.name, keep_alive):
            try:
                async for item in self._pieces(spec, req):
                    if ttft is None and (item.text or item.done):
                        ttft = time.perf_counter() - t0
                        if item.done and item.stats is not None:  # a whole answer: its first token came earlier
                            ttft = max(0.0, ttft - item.stats.eval_duration / 1e9)
                    tally.add(item)
                    if traced is not None:
                        traced.piece(item)
                    if item.done and item.stats is not None:
                        self.observer.generation(spec.name, item.stats, ttft)
                    yield item
            except (GeneratorExit, asyncio.CancelledError) as err:  # the client left (a refusal, 503, is not that)
                if item is None or not item.done:
                    tally.cut_short()
                    self.observer.cancellation(spec.name)
                    if traced is not None:
                        traced.cut_short(err)
                raise
            except SlmopsError as err:
                if traced is not None:
                    traced.cut_short(err)
                if isinstance(err, (EngineError, IntegrityError)):  # the model's failure, not the caller's: counted
                    await self.count_failure(spec.name, err)  # here, as one mid-stream never reaches a handler
                raise
            finally:
                tally.close()

    async def count_failure(self, model: str, err: SlmopsError) -> None:
        """Tell the observer that ``model`` (a stored model's name) failed with ``err``, and whether it is still
        loaded; the request's context notes it, so the error handler does not count it again."""
        loaded = await asyncio.get_running_loop().run_in_executor(None, self.engine.loaded)
        self.observer.failure(model, err, any(m.name == model for m in loaded))
        ctx = access.current()
        if ctx is not None:
            ctx.failure_counted = True

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
        """Embeddings of ``inputs`` on the engine thread; the tokens they took are charged to the request."""
        options = self.admission.options_for(spec, options)
        started_ns = time.time_ns()
        with self.models.using(spec.name, keep_alive):
            vectors, used, load_ns = await self.models.on_engine(self.engine.embed, spec, inputs, options, truncate)
            ctx, span = access.current(), tracing.current()
            if ctx is not None:
                ctx.prompt_tokens += used
            if span is not None:
                span.embedded(ctx.model if ctx and ctx.model else spec.name, spec.name, vectors, used, load_ns,
                              started_ns)
            return vectors, used, load_ns

    def close(self) -> None:
        self._starters.shutdown(wait=False)


__all__ = ["Inference", "Observer", "Unobserved"]
