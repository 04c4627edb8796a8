"""What generation yields: text pieces, then one final record with Ollama's stats (durations in ns)."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stats:
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    load_duration: int
    total_duration: int
    cached_prompt_tokens: int = 0
    truncated_prompt_tokens: int = 0
    queue_duration: int = 0  # waiting for the model's batch (ns), before prompt_eval_duration began

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_eval_count / (self.prompt_eval_duration / 1e9) if self.prompt_eval_duration else 0.0

    @property
    def eval_tokens_per_s(self) -> float:
        return self.eval_count / (self.eval_duration / 1e9) if self.eval_duration else 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: builtins.bytes = b""  # builtins: the field name would shadow the type for typed decoders
    top: tuple["TokenLogprob", ...] = ()


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the request's tools, parsed from the model's text. Ids are left to each protocol: they
    differ in form (``call-…`` for chat completions, ``call_…`` for Responses) and Ollama has none."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Output:
    """A streamed piece (``done`` False) or the final record (``done`` True, ``text`` may hold a last piece).

    ``logprobs`` covers the tokens whose text this piece completes (when requested); ``context`` on the final
    record is the prompt plus generated tokens, for Ollama's ``context`` field. Pieces carry running token counts
    so that a stream the client drops is still charged and audited for what it generated.

    ``tool_calls`` are set once a request's tools are parsed out (:mod:`slmops.engine.answers`): a piece then
    carries the calls it completed and only the text around them, so every protocol shapes the same calls.
    """

    text: str = ""
    done: bool = False
    done_reason: str | None = None  # "stop" | "length"
    stats: Stats | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    context: tuple[int, ...] = ()
    prompt_eval_count: int = 0  # on pieces: the prompt's tokens; the final record has them in ``stats``
    eval_count: int = 0  # on pieces: tokens generated so far
    tool_calls: tuple[ToolCall, ...] = ()
