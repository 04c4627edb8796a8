"""Perplexity windows on llama.cpp, for ``slmops eval`` (:func:`slmops.ops.evaluate.perplexity`).

As llama.cpp's ``llama-perplexity``: the text is cut into windows of ``n_ctx`` tokens, each decoded on its own from a
clear cache, and only the second half of each window is scored, so every scored token sees at least ``n_ctx/2``
tokens of context.
"""

from __future__ import annotations

import numpy as np

from slmops.engine.client import ModelSpec
from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel
from slmops.store.sealed import plain_file
from slmops.types.errors import InvalidInput
from slmops.types.options import LoadParams


def score(spec: ModelSpec, text: str, n_ctx: int, max_windows: int = 0, threads: int = 0) -> tuple[float, int, int]:
    """(summed negative log-likelihood, tokens scored, windows) of ``text`` under ``spec``'s model."""
    with plain_file(spec.model_path, spec.unseal_key, "model") as path:
        model = LlamaModel(path)
    try:
        ctx = LlamaContext(model, LoadParams(num_ctx=n_ctx, num_batch=n_ctx, num_thread=threads))
        try:
            return _score(model, ctx, text, n_ctx, max_windows)
        finally:
            ctx.close()
    finally:
        model.close()


def _score(model: LlamaModel, ctx: LlamaContext, text: str, n_ctx: int, max_windows: int) -> tuple[float, int, int]:
    tokens = np.array(model.tokenize(text, add_special=False, parse_special=False), dtype=np.int32)
    windows = len(tokens) // n_ctx
    if max_windows:
        windows = min(windows, max_windows)
    if windows == 0:
        raise InvalidInput(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}; lower --ctx")
    bos = model.bos if model.add_bos else None
    nll, count, first = 0.0, 0, n_ctx // 2
    for w in range(windows):
        window = tokens[w * n_ctx:(w + 1) * n_ctx].copy()
        if bos is not None:
            window[0] = bos  # as llama-perplexity: the window starts a sequence
        ctx.clear()
        ctx.decode_batch(window, np.arange(n_ctx, dtype=np.int32), np.zeros(n_ctx, dtype=np.int32),
                         np.ones(n_ctx, dtype=np.int8))
        logits = ctx.all_logits(n_ctx)[first:n_ctx - 1].astype(np.float64)
        targets = window[first + 1:]
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return nll, count, windows
