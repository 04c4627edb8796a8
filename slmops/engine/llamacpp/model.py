"""A GGUF model on llama.cpp: the model, one multi-sequence context for continuous batching, its vocabulary, LoRA
adapters and an embeddings context, served as a :class:`slmops.engine.backend.BackendModel`.

:class:`LlamaDecoder` is the batched decode step the engine's runner drives: batch decodes, the scheduler's memory
operations on the unified KV cache, C sampler chains with their grammars, and log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from slmops.engine.backend import BatchPlan
from slmops.engine.client import EngineConfig, ModelSpec
from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel, SamplerChain
from slmops.engine.outputs import TokenLogprob
from slmops.engine.scheduler import Item, MemOp
from slmops.engine.streams import token_logprob
from slmops.store.gguf import GGUFInfo, inspect_gguf
from slmops.store.sealed import plain_file
from slmops.types import options as opts
from slmops.types.errors import ContextOverflow, InvalidInput


def kv_bytes_per_token(info: GGUFInfo, kv_type: str = "f16") -> int:
    """K and V for every layer: what one token of context costs in memory (q8_0: 34 bytes per 32 values)."""
    m, a = info.metadata, info.architecture
    n_embd = int(m.get(f"{a}.embedding_length") or 0)
    n_head = int(m.get(f"{a}.attention.head_count") or 1)
    n_kv = int(m.get(f"{a}.attention.head_count_kv") or n_head)
    head_dim = int(m.get(f"{a}.attention.key_length") or (n_embd // max(n_head, 1)))
    f16 = int(m.get(f"{a}.block_count") or 0) * n_kv * head_dim * 2 * 2
    return f16 * 17 // 32 if kv_type == "q8_0" else f16


def auto_parallel(info: GGUFInfo, num_ctx: int, free_bytes: int, budget: int, most: int = 8,
                  kv_type: str = "f16") -> int:
    """Parallel sequences for this machine: as many whole contexts as fit in the smaller of a quarter of free
    memory and ``budget`` (``SLMOPS_KV_BUDGET``), at most ``most`` (past 8, a 2-core CPU gains no aggregate speed)."""
    per_seq = max(1, kv_bytes_per_token(info, kv_type) * num_ctx)
    return max(1, min(most, min(free_bytes // 4, budget) // per_seq))


class _BoundSampler:
    """A sampler chain and the context it samples from."""

    def __init__(self, chain: SamplerChain, ctx: LlamaContext):
        self.chain, self.ctx = chain, ctx

    def sample(self, idx: int) -> int:
        return self.chain.sample(self.ctx, idx)

    def close(self) -> None:
        self.chain.close()


class LlamaDecoder:
    """The :class:`~slmops.engine.backend.BatchDecoder` over one llama.cpp context (unified KV cache)."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext):
        self.model = model
        self.ctx = ctx
        self.n_batch = ctx.n_batch
        self._saved: dict[int, object] = {}  # host-memory entry -> its KV state

    def decode(self, items: Sequence[Item]) -> None:
        self.ctx.decode_items(items)

    def memory(self, op: MemOp) -> None:
        if op.kind == "copy":
            self.ctx.seq_copy(op.src, op.dst, op.n)
        elif op.kind == "drop":
            self.ctx.seq_drop(op.src)
        elif op.kind == "save":
            self._saved[op.dst] = self.ctx.seq_save(op.src)
        elif op.kind == "forget":
            self._saved.pop(op.src, None)
        elif op.kind == "restore":
            saved = self._saved.get(op.src)
            if saved is not None and self.ctx.seq_restore(saved, op.dst):
                self.ctx.seq_trim(op.dst, op.n)
            else:  # no contiguous room for the copy: compute the same cells instead
                self.ctx.seq_drop(op.dst)
                self._evaluate(op.dst, op.tokens)

    def _evaluate(self, seq: int, tokens: tuple[int, ...]) -> None:
        for start in range(0, len(tokens), self.ctx.n_batch):
            chunk = np.asarray(tokens[start:start + self.ctx.n_batch], dtype=np.int32)
            self.ctx.decode_batch(chunk, np.arange(start, start + len(chunk), dtype=np.int32),
                                  np.full(len(chunk), seq, dtype=np.int32), np.zeros(len(chunk), dtype=np.int8))

    def sampler(self, sampling: opts.SamplingParams, constraint: Any, n_ctx: int, prompt: list[int]) -> _BoundSampler:
        return _BoundSampler(SamplerChain(self.model, sampling, n_ctx, prompt, grammar=constraint), self.ctx)

    def is_end(self, token: int) -> bool:
        return self.model.is_eog(token)

    def piece(self, token: int) -> bytes:
        return self.model.piece(token)

    def logprob(self, idx: int, token: int, top: int) -> TokenLogprob:
        return token_logprob(self.ctx.logits(idx), token, top, self.model.piece)


class LlamaCppModel:
    """A loaded GGUF model (:class:`~slmops.engine.backend.BackendModel`)."""

    def __init__(self, spec: ModelSpec, load: opts.LoadParams, config: EngineConfig, free_bytes: int):
        """``config.num_parallel``: sequences decoded together; 0 picks from ``free_bytes`` of memory.
        ``config.prefix_cache``: bytes of host memory for cached prompt prefixes evicted from the KV cache."""
        self.info = inspect_gguf(spec.model_path, spec.gguf_cache, spec.unseal_key)
        self.embedding_only = self.info.embedding_only
        n_parallel = config.num_parallel
        if n_parallel <= 0:
            n_parallel = auto_parallel(self.info, load.num_ctx, free_bytes, budget=config.kv_budget,
                                       kv_type=load.kv_type)
        with plain_file(spec.model_path, spec.unseal_key, "model") as path:  # llama.cpp maps it; the map outlives it
            self.model = LlamaModel(path, n_gpu_layers=load.num_gpu)
        self.load_params = load
        cache_budget = load.num_ctx  # cached prefixes in the KV cache: one context's worth (each more costs its KV)
        spill_budget = config.prefix_cache // max(1, kv_bytes_per_token(self.info, load.kv_type))  # in host memory
        self.plan = BatchPlan(n_parallel, cache_budget, spill_budget)
        ctx_params = replace(load, num_ctx=load.num_ctx * n_parallel + cache_budget)
        self.ctx: LlamaContext | None = None
        try:
            self.ctx = LlamaContext(self.model, ctx_params, n_seq_max=2 * n_parallel)
            self._load_adapters(spec)
        except BaseException:
            if self.ctx is not None:
                self.ctx.close()
            self.model.close()
            raise
        self.decoder = LlamaDecoder(self.model, self.ctx)
        self.n_vocab = self.model.n_vocab
        self.n_ctx_train = self.model.n_ctx_train
        self.add_bos = self.model.add_bos
        self.bos_text = self._special(self.model.bos)
        self.eos_text = self._special(self.model.eos)
        self._embed_ctx: LlamaContext | None = None

    def _load_adapters(self, spec: ModelSpec) -> None:
        assert self.ctx is not None
        apply_adapters(self.model, self.ctx, spec)

    def _special(self, token: int) -> str:
        return self.model.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        """L2-normalised pooled embeddings (as sentence-transformers returns them) and the tokens used."""
        if self._embed_ctx is None:
            n = min(self.load_params.num_ctx, self.model.n_ctx_train or self.load_params.num_ctx)
            params = replace(self.load_params, num_ctx=n, num_batch=n)
            self._embed_ctx = LlamaContext(self.model, params, embeddings=True, pooling=self.info.pooling)
        out, used = [], 0
        for text in texts:
            toks = self.model.tokenize(text, add_special=True, parse_special=False)
            if len(toks) > self._embed_ctx.n_batch:
                if not truncate:
                    raise ContextOverflow(f"input is {len(toks)} tokens but the context holds "
                                          f"{self._embed_ctx.n_batch}; shorten it or allow truncation")
                toks = toks[: self._embed_ctx.n_batch]
            if not toks:
                raise InvalidInput("cannot embed an empty input")
            vec = self._embed_ctx.embed(toks)
            norm = float(np.linalg.norm(vec))
            out.append((vec / norm if norm > 0 else vec).tolist())
            used += len(toks)
        return out, used

    def close(self) -> None:
        """Free llama.cpp memory (the engine calls it once the runner has stopped)."""
        if self._embed_ctx is not None:
            self._embed_ctx.close()
        self.ctx.close()
        self.model.close()


def apply_adapters(model: LlamaModel, ctx: LlamaContext, spec: ModelSpec) -> None:
    """The Modelfile's ADAPTERs on ``ctx``: wherever a model is scored or served, it is the model as released."""
    adapters = []
    for adapter in spec.adapters:
        inspect_gguf(adapter, spec.gguf_cache, spec.unseal_key)
        with plain_file(adapter, spec.unseal_key, "adapter") as path:  # read whole into the adapter
            adapters.append(model.load_lora(path))
    if adapters:
        ctx.set_loras(adapters)
