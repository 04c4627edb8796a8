"""One request's output as tokens arrive: the text pieces, stop strings, log-probabilities and final stats.

Every generate loop (the batching runner over llama.cpp, a backend's own loop) streams the same :class:`Output`
records, so what a client sees does not depend on the backend: a piece per token whose text is complete (text
that could still become a stop string held back), running token counts on each piece, then one final record with
Ollama's stats and the context. Loops differ only in how they get a token, its text and its log-probability.
"""

from __future__ import annotations

import codecs
import time
from typing import Callable

import numpy as np

from slmops.engine.client import Emit
from slmops.engine.outputs import Output, Stats, TokenLogprob
from slmops.engine.stops import StopMatcher
from slmops.types.options import SamplingParams


class TokenStream:
    """The streaming state of one request. ``utf8`` is for loops whose tokens are bytes (llama.cpp pieces split
    characters across tokens); loops that detokenize to text themselves leave it unused. With ``whole`` (a request
    not streamed) the text and log-probabilities are held and go out with the final record, in one piece."""

    __slots__ = ("prompt", "sampling", "emit", "load_duration", "stops", "utf8", "t_start", "t_admitted", "t_first",
                 "cached", "generated", "pending_lp", "held")

    def __init__(self, prompt: list[int], sampling: SamplingParams, emit: Emit, load_duration: int = 0,
                 whole: bool = False):
        self.prompt = prompt
        self.sampling = sampling
        self.emit = emit
        self.load_duration = load_duration
        self.stops = StopMatcher(sampling.stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.t_start = time.perf_counter_ns()
        self.t_admitted = 0  # when the loop first evaluated any of its prompt: the wait for a batch ends there
        self.t_first = 0  # when the first token was sampled: the prompt's evaluation ends there
        self.cached = 0  # prompt tokens served from a prefix cache
        self.generated: list[int] = []
        self.pending_lp: list[TokenLogprob] = []  # for tokens whose text is not out yet
        self.held: list[str] | None = [] if whole else None  # the text so far, when it all goes out at the end

    def admitted(self) -> None:
        """The loop is evaluating this request's prompt now (the first time counts)."""
        if not self.t_admitted:
            self.t_admitted = time.perf_counter_ns()

    def first(self, cached: int = 0) -> None:
        """The first token was sampled (end-of-turn included), ``cached`` of the prompt's tokens were reused."""
        self.t_first = time.perf_counter_ns()
        self.cached = cached

    def feed(self, token: int, text: str, logprob: TokenLogprob | None = None) -> bool:
        """A generated token (not an end-of-turn one) whose text is ``text``; emits what is safe to show.
        True when a stop string was hit: the generation ends, with the text before the stop string."""
        self.generated.append(token)
        if logprob is not None:
            self.pending_lp.append(logprob)
        text, hit = self.stops.feed(text)
        if text and self.held is not None:
            self.held.append(text)
        elif text:
            self.emit(Output(text=text, logprobs=tuple(self.pending_lp), prompt_eval_count=len(self.prompt),
                             eval_count=len(self.generated)))
            self.pending_lp = []
        return hit

    def finish(self, reason: str) -> None:
        """Emit the final record: what text was held back, the stats, and the context. ``reason``: "stop" (end of
        turn, a stop string) or anything else, which Ollama reports as "length"."""
        now = time.perf_counter_ns()
        first = self.t_first or now
        admitted = min(self.t_admitted or self.t_start, first)
        stats = Stats(prompt_eval_count=len(self.prompt), prompt_eval_duration=first - admitted,
                      eval_count=len(self.generated), eval_duration=now - first, load_duration=self.load_duration,
                      total_duration=now - self.t_start + self.load_duration, cached_prompt_tokens=self.cached,
                      queue_duration=admitted - self.t_start)
        tail = "".join(self.held or ()) + self.stops.flush() + self.utf8.decode(b"", final=True)
        self.emit(Output(text=tail, done=True, done_reason="stop" if reason == "stop" else "length", stats=stats,
                         logprobs=tuple(self.pending_lp), context=tuple(self.prompt) + tuple(self.generated)))

    def fail(self, err: BaseException) -> None:
        self.emit(err if isinstance(err, Exception) else RuntimeError(str(err)))


def token_logprob(logits: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """``token``'s log-probability under raw ``logits`` (the model's own distribution, before sampling settings),
    with the ``top`` most likely alternatives; ``piece`` gives a token's bytes."""
    logits = logits.astype(np.float64).reshape(-1)
    m = logits.max()
    lse = m + np.log(np.exp(logits - m).sum())

    def entry(t: int) -> TokenLogprob:
        raw = piece(t)
        return TokenLogprob(raw.decode("utf-8", "replace"), float(logits[t] - lse), raw)
    chosen = entry(token)
    top = min(top, logits.size - 1)
    if top <= 0:
        return chosen
    best = np.argpartition(-logits, top)[:top]
    best = best[np.argsort(-logits[best])]
    return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, tuple(entry(int(t)) for t in best))
