"""Continuous batching: one thread per loaded model runs scheduler steps over its backend's batched decoder.

Requests join and leave between decode steps. Each has its own sampler (with its constraint) and output stream
(:class:`~slmops.engine.streams.TokenStream`: text, stop strings, stats, shared with backends that run their own
generate loop); the scheduler (pure) decides what each step decodes, the backend's :class:`BatchDecoder` performs it.
All of a model's native calls for generation happen on this one thread (llama.cpp: ggml's worker threads stay with
one caller).
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from slmops.engine.backend import BatchDecoder, BatchPlan, Sampler
from slmops.engine.client import Emit
from slmops.engine.prefix_cache import PrefixCache
from slmops.engine.scheduler import Batch, Finished, Scheduler
from slmops.engine.streams import TokenStream
from slmops.types.options import SamplingParams


@dataclass
class _Request:
    req_id: int
    out: TokenStream  # what the client sees: pieces, stop strings, logprobs, the final stats
    n_ctx: int | None = None
    constraint: Any = None  # compiled by the backend
    sampler: Sampler | None = None


class BatchRunner:
    MAX_SPILLED = 256  # prefixes held in host memory at once, whatever their size

    def __init__(self, decoder: BatchDecoder, plan: BatchPlan, n_ctx_seq: int, token_budget: int = 512,
                 max_queue: int = 512):
        """``plan.cache_budget``: tokens of cached prefixes in the spare sequences (``n_parallel`` of them, after
        the running ones); ``plan.spill_budget``: tokens of those it evicts kept in host memory."""
        self.decoder = decoder
        n_parallel = plan.n_parallel
        cache = PrefixCache(list(range(n_parallel, n_parallel * 2)), plan.cache_budget) \
            if plan.cache_budget > 0 else None
        spill = PrefixCache(list(range(self.MAX_SPILLED)), plan.spill_budget) \
            if cache and plan.spill_budget > 0 else None
        self.scheduler = Scheduler(n_parallel, n_ctx_seq, min(token_budget, decoder.n_batch), max_queue=max_queue,
                                   cache=cache, spill=spill)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._closing: BaseException | None = None
        self.steps = 0
        self.max_batch = 0  # most sequences decoded in one step so far
        self._thread = threading.Thread(target=self._loop, name="runner", daemon=True)
        self._thread.start()

    # -- called from any thread ----------------------------------------------------------------------------
    def submit(self, prompt: list[int], sampling: SamplingParams, emit: Emit, load_duration: int = 0,
               n_ctx: int | None = None, constraint: Any = None, whole: bool = False) -> int:
        """``constraint``: what the backend compiled from the request's, or None; ``whole``: see
        :class:`TokenStream`."""
        req_id = next(self._ids)
        self._inbox.put(("add", _Request(req_id, TokenStream(prompt, sampling, emit, load_duration, whole), n_ctx,
                                         constraint)))
        return req_id

    def cancel(self, req_id: int) -> None:
        self._inbox.put(("cancel", req_id))

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the runner thread between steps (other native compute for this model, such as
        embeddings, so llama.cpp's worker threads keep a single caller) and return its result."""
        if self._closing is not None:
            raise self._closing
        done: "queue.Queue" = queue.Queue(maxsize=1)
        self._inbox.put(("job", (fn, done)))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def close(self, error: BaseException) -> None:
        """Let running requests finish, refuse new ones with ``error``, then stop the loop."""
        self._inbox.put(("close", error))
        self._thread.join()

    # -- the runner thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        inbox = self._inbox
        while True:
            if self.scheduler.idle and self._closing is None:
                self._handle(*inbox.get())  # nothing to step: wait for work
            while not inbox.empty():  # a C call per step, where get_nowait raised and caught queue.Empty
                self._handle(*inbox.get())
            if self._closing is not None and self.scheduler.idle:
                break
            batch = self.scheduler.schedule()
            if batch:
                try:
                    self._step(batch)
                except Exception as err:  # a failed decode fails the requests in it, never the thread
                    for req_id in batch.requests():
                        self._fail(req_id, err)

    def _handle(self, kind: str, arg) -> None:
        if kind == "add" and self._closing is not None:
            arg.out.emit(self._closing)
        elif kind == "add":
            out = arg.out
            try:
                self.scheduler.add(arg.req_id, out.prompt, out.sampling.num_predict
                                   if out.sampling.num_predict >= 0 else -1, arg.n_ctx)
                arg.sampler = self.decoder.sampler(out.sampling, arg.constraint, arg.n_ctx or self.scheduler.n_ctx_seq,
                                                   out.prompt)
                self._requests[arg.req_id] = arg
            except BaseException as err:
                self.scheduler.cancel(arg.req_id)
                out.emit(err)
        elif kind == "job":
            fn, done = arg
            try:
                done.put((True, fn()))
            except BaseException as err:
                done.put((False, err))
        elif kind == "cancel":
            if self.scheduler.cancel(arg) is not None:
                self._drop(arg)
        elif kind == "close":
            self._closing = arg  # finish what runs, refuse what comes

    def _step(self, batch: Batch) -> None:
        for op in batch.ops:
            self.decoder.memory(op)
        if not batch.items:
            return
        self.steps += 1
        working = batch.requests()
        self.max_batch = max(self.max_batch, len(working))
        for req_id in working:
            req = self._requests.get(req_id)
            if req is not None and not req.out.t_admitted:  # its prompt's first step: its wait ends
                req.out.admitted()
        self.decoder.decode(batch.items)
        sampled: dict[int, int] = {}
        finished: list[Finished] = []
        end = -1  # batch index of each item's last token
        for item in batch.items:
            end += len(item.tokens)
            req = self._requests.get(item.req_id)
            if not item.sample or req is None:
                continue
            tok = req.sampler.sample(end)
            if self._on_token(req, tok, end):
                done = self.scheduler.finish(req.req_id, "stop")
                if done:
                    finished.append(done)
            else:
                sampled[req.req_id] = tok
        finished += self.scheduler.update(batch, sampled)
        for f in finished:
            self._complete(f)

    def _on_token(self, req: _Request, tok: int, idx: int) -> bool:
        """Stream ``tok`` to its request; True when it ends the generation (end of turn or a stop string)."""
        out = req.out
        if not out.t_first:
            seq = self.scheduler.running.get(req.req_id)
            out.first(seq.cached if seq is not None else 0)
        if self.decoder.is_end(tok):
            return True
        top = out.sampling.logprobs
        return out.feed(tok, out.utf8.decode(self.decoder.piece(tok)),
                        None if top is None else self.decoder.logprob(idx, tok, top))

    def _complete(self, f: Finished) -> None:
        req = self._drop(f.req_id)
        if req is not None:
            req.out.finish(f.reason)

    def _fail(self, req_id: int, err: BaseException) -> None:
        self.scheduler.cancel(req_id)
        req = self._drop(req_id)
        if req is not None:
            req.out.fail(err)

    def _drop(self, req_id: int) -> _Request | None:
        req = self._requests.pop(req_id, None)
        if req is not None and req.sampler is not None:
            req.sampler.close()
        return req
