"""Perplexity windows on llama.cpp, for ``slmops eval`` (:func:`slmops.ops.evaluate.perplexity`).

As llama.cpp's ``llama-perplexity``: the text is cut into windows of ``n_ctx`` tokens, each decoded on its own from a
clear cache, and only the second half of each window is scored, so every scored token sees at least ``n_ctx/2``
tokens of context.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from slmops.engine.client import ModelSpec
from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel
from slmops.engine.llamacpp.model import apply_adapters
from slmops.store.sealed import plain_file
from slmops.types.errors import InvalidInput
from slmops.types.options import LoadParams


@contextmanager
def _loaded(spec: ModelSpec, n_ctx: int, threads: int) -> Iterator[tuple[LlamaModel, LlamaContext]]:
    """``spec``'s model with its adapters, on a context of ``n_ctx`` tokens decoded in one batch."""
    with plain_file(spec.model_path, spec.unseal_key, "model") as path:
        model = LlamaModel(path)
    try:
        ctx = LlamaContext(model, LoadParams(num_ctx=n_ctx, num_batch=n_ctx, num_thread=threads))
        try:
            apply_adapters(model, ctx, spec)
            yield model, ctx
        finally:
            ctx.close()
    finally:
        model.close()


def score(spec: ModelSpec, text: str, n_ctx: int, max_windows: int = 0, threads: int = 0) -> tuple[float, int, int]:
    """(summed negative log-likelihood, tokens scored, windows) of ``text`` under ``spec``'s model."""
    with _loaded(spec, n_ctx, threads) as (model, ctx):
        return _score(model, ctx, text, n_ctx, max_windows)


def score_answers(spec: ModelSpec, conversations: list[list[dict[str, Any]]], n_ctx: int = 1024,
                  threads: int = 0) -> tuple[float, int, int]:
    """(summed negative log-likelihood, answer tokens scored, conversations) of each conversation's last message
    given the ones before it; a conversation longer than ``n_ctx`` keeps its latest tokens."""
    from slmops.engine.model import DEFAULT_TEMPLATE, served_messages
    from slmops.modelfile.template import ChatTemplate

    with _loaded(spec, n_ctx, threads) as (model, ctx):
        special = [model.piece(t, special=True).decode("utf-8", "replace") if t >= 0 else "" for t in
                   (model.bos, model.eos)]
        template = ChatTemplate.compile(spec.template or DEFAULT_TEMPLATE, *special)
        nll, count = 0.0, 0
        for conversation in conversations:
            prompt = template.render(served_messages(spec, conversation[:-1]))
            if model.add_bos and special[0] and prompt.startswith(special[0]):
                prompt = prompt[len(special[0]):]
            head = model.tokenize(prompt, add_special=True, parse_special=True)
            answer = model.tokenize(conversation[-1]["content"], add_special=False, parse_special=False)
            if model.eos >= 0:
                answer.append(model.eos)  # ending the answer there is part of the answer
            tokens = np.array((head + answer)[-n_ctx:], dtype=np.int32)
            scored, n = _scored(ctx, tokens, max(0, len(tokens) - len(answer) - 1))
            nll += scored
            count += n
    if not count:
        raise InvalidInput("no answer to score: give conversations that end with an answer")
    return nll, count, len(conversations)


def _scored(ctx: LlamaContext, tokens: np.ndarray, first: int) -> tuple[float, int]:
    """``tokens`` decoded as one sequence from a clear cache: the summed negative log-likelihood of each token after
    ``first`` given those before it, and how many were scored."""
    n = len(tokens)
    ctx.clear()
    ctx.decode_batch(tokens, np.arange(n, dtype=np.int32), np.zeros(n, dtype=np.int32), np.ones(n, dtype=np.int8))
    return _nll(ctx.all_logits(n)[first:n - 1].astype(np.float64), tokens[first + 1:]), n - 1 - first


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    top = logits.max(axis=1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return float((log_z - logits[np.arange(len(targets)), targets]).sum())


def _score(model: LlamaModel, ctx: LlamaContext, text: str, n_ctx: int, max_windows: int) -> tuple[float, int, int]:
    tokens = np.array(model.tokenize(text, add_special=False, parse_special=False), dtype=np.int32)
    windows = len(tokens) // n_ctx
    if max_windows:
        windows = min(windows, max_windows)
    if windows == 0:
        raise InvalidInput(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}; lower --ctx")
    bos = model.bos if model.add_bos else None
    nll, count = 0.0, 0
    for w in range(windows):
        window = tokens[w * n_ctx:(w + 1) * n_ctx].copy()
        if bos is not None:
            window[0] = bos  # as llama-perplexity: the window starts a sequence
        scored, n = _scored(ctx, window, n_ctx // 2)
        nll += scored
        count += n
    return nll, count, windows
