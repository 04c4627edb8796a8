"""The generate loop of an ONNX model: one thread steps every running request, one token each per turn.

ONNX Runtime GenAI batches only statically on the CPU (its ``Engine`` runs a batch to its end before a waiting
request starts, and refuses stop strings and seeds), so each request gets its own ``og.Generator`` instead; up to
``n_parallel`` of them run at once, stepped round-robin so that every stream advances, and the rest wait in
order. A request joins or leaves between turns; its prompt is evaluated whole as it joins (no chunked prefill),
holding the other streams for that long. What a client sees is built by the same
:class:`~slmops.engine.streams.TokenStream` as the batching runner's, so both backends stream identical records.
All generation calls into the runtime happen on this thread.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime_genai as og

from slmops.engine.client import Cancel
from slmops.engine.streams import TokenStream, token_logprob
from slmops.types.errors import Busy, ContextOverflow, EngineError, InvalidInput

_SOURCE_LINE = re.compile(r"\d+ \|")  # llguidance quotes the grammar line by line: "1 | start: ..."


def one_line(err: BaseException, limit: int = 300) -> str:
    """A runtime message as one line: llguidance's grammar errors span several, with carets under the fault."""
    first, *rest = [ln.strip() for ln in str(err).splitlines()] or [""]
    kept = [first] + [ln for ln in rest if ln and not set(ln) <= set("^~| ") and not _SOURCE_LINE.match(ln)]
    text = " ".join(k for k in kept if k) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(frozen=True)
class Vocab:
    """What the loop needs of the vocabulary: ``eos`` tokens end a turn; ``special`` (control) tokens have no text
    in the output."""

    size: int
    eos: frozenset[int]
    special: frozenset[int]


@dataclass(eq=False)
class _Job:
    out: TokenStream
    guidance: tuple[str, str] | None  # (type, data) for ``GeneratorParams.set_guidance``
    n_ctx: int  # prompt plus generated tokens may not reach past it
    max_new: int  # -1: until the context is full
    cancelled: bool = False
    gen: Any = None  # og.Generator, once started
    text: Any = None  # og.TokenizerStream: UTF-8 held across tokens


class GenerateLoop:
    def __init__(self, model: Any, tokenizer: Any, vocab: Vocab, n_parallel: int, max_queue: int, n_ctx: int):
        """``n_ctx``: the longest sequence a request may have (the loaded context)."""
        self.model, self.tokenizer, self.vocab = model, tokenizer, vocab
        self.n_parallel, self.max_queue, self.n_ctx = n_parallel, max_queue, n_ctx
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._closing: BaseException | None = None
        self._pieces: dict[int, bytes] = {}  # token -> its text, for log-probabilities' alternatives
        self._thread = threading.Thread(target=self._loop, name="onnx-runner", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------------------------
    def submit(self, out: TokenStream, guidance: tuple[str, str] | None, n_ctx: int | None) -> Cancel:
        """Queue a request (``Busy`` when the queue is full) and return the function that cancels it."""
        n_ctx = min(n_ctx or self.n_ctx, self.n_ctx)
        if len(out.prompt) >= n_ctx:  # the engine checked it; a prompt past max_length fails in the runtime
            raise ContextOverflow.prompt(len(out.prompt), n_ctx)
        num_predict = out.sampling.num_predict
        job = _Job(out, guidance, n_ctx, num_predict if num_predict >= 0 else -1)
        with self._cond:
            if self._closing is not None:
                raise self._closing
            if len(self._waiting) >= self.max_queue + max(0, self.n_parallel - len(self._active)):
                raise Busy(f"server busy: {self.max_queue} requests already wait; retry later")
            self._waiting.append(job)
            self._cond.notify()
        return lambda: self._cancel(job)

    def _cancel(self, job: _Job) -> None:
        """Nothing more reaches the request's ``emit``, as with a cancelled llama.cpp request."""
        with self._cond:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)

    def close(self, error: BaseException) -> None:
        """Let running and waiting requests finish, refuse new ones with ``error``, then stop the thread."""
        with self._cond:
            if self._closing is None:
                self._closing = error
            self._cond.notify()
        self._thread.join()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the loop thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._active and not self._waiting and self._closing is None:
                    self._cond.wait()
                if not self._active and not self._waiting:
                    return  # closing, and nothing left to finish
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.n_parallel:
                    admitted.append(self._waiting.popleft())
            started = [job for job in admitted if self._begin(job)]
            with self._cond:
                self._active.extend(started)
            ended = [job for job in list(self._active) if job.cancelled or not self._advance(job)]
            if ended:
                with self._cond:
                    self._active = [job for job in self._active if job not in ended]
                for job in ended:
                    job.gen = job.text = None  # frees its KV memory now

    def _begin(self, job: _Job) -> bool:
        """Create the request's generator and evaluate its prompt; False (the error emitted) when that fails."""
        if job.cancelled:
            return False
        try:
            params = og.GeneratorParams(self.model)
            params.set_search_options(**search_options(job.out, job.n_ctx, job.max_new, self.vocab.size))
            if job.guidance is not None:
                params.set_guidance(*job.guidance)
            try:
                job.gen = og.Generator(self.model, params)
            except RuntimeError as err:
                if job.guidance is not None:  # llguidance rejected the grammar (or a schema it cannot compile)
                    raise InvalidInput(f"the output constraint cannot be used: {one_line(err)}") from None
                raise
            job.out.admitted()
            job.gen.append_tokens(np.asarray(job.out.prompt, dtype=np.int32))
            job.text = self.tokenizer.create_stream()
            return True
        except Exception as err:  # noqa: BLE001 - one request fails, never the loop
            job.gen = None
            _fail(job.out, err)
            return False

    def _advance(self, job: _Job) -> bool:
        """Generate one token of ``job`` and stream it; False when the request has ended."""
        out, gen = job.out, job.gen
        try:
            top = out.sampling.logprobs
            logits = gen.get_logits() if top is not None else None  # the distribution this step samples from
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if not out.t_first:
                out.first()
            if tok in self.vocab.eos:
                out.finish("stop")
                return False
            text = "" if tok in self.vocab.special else job.text.decode(tok)
            if out.feed(tok, text, None if logits is None else token_logprob(logits, tok, top, self._piece)):
                out.finish("stop")
                return False
            if 0 <= job.max_new <= len(out.generated) or len(out.prompt) + len(out.generated) >= job.n_ctx \
                    or gen.is_done():
                out.finish("length")
                return False
            return True
        except Exception as err:  # noqa: BLE001 - one request fails, never the loop
            _fail(out, err)
            return False

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = b"" if token in self.vocab.special else self.tokenizer.decode([token]).encode()
            self._pieces[token] = piece
        return piece


def search_options(out: TokenStream, n_ctx: int, max_new: int, n_vocab: int) -> dict[str, Any]:
    """Ollama's sampling options as ONNX Runtime GenAI's search options. ``max_length`` counts the prompt and
    sizes the request's KV memory, so it is no longer than the request may run. Ollama's ``top_k`` 0 (off) is
    genai's 0 too (top-p alone), and one past the vocabulary is the vocabulary (genai refuses it); its repetition
    penalty covers the whole sequence, not ``repeat_last_n``."""
    s = out.sampling
    most = n_ctx if max_new < 0 else min(n_ctx, len(out.prompt) + max(max_new, 1))
    options: dict[str, Any] = {"max_length": most, "do_sample": s.temperature > 0,
                               "repetition_penalty": s.repeat_penalty}
    if s.temperature > 0:
        options.update(temperature=s.temperature, top_k=min(max(s.top_k, 0), n_vocab), top_p=s.top_p)
        if s.seed >= 0:
            options["random_seed"] = s.seed & 0x7FFFFFFF
    return options


def _fail(out: TokenStream, err: Exception) -> None:
    """Deliver ``err`` to its request: ours as they are, the runtime's (a plain ``RuntimeError``) as an engine error
    with its message. A receiver that fails too (its client gone) fails alone."""
    if isinstance(err, RuntimeError):
        err = EngineError(f"ONNX Runtime GenAI failed: {one_line(err)}")
    with contextlib.suppress(Exception):
        out.fail(err)

