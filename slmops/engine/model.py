"""A loaded model: llama.cpp model, a multi-sequence context driven by its batching runner, and the chat template.

Generation and embeddings run on the runner's thread; this class prepares prompts and turns the runner's
callbacks into iterators. A chat that grows turn by turn reuses its earlier turns through the prefix cache.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import llama_cpp as lc
import numpy as np
import psutil

from slmops.types import options as opts
from slmops.engine.client import Cancel, Emit, ModelSpec, ModelStatus, ModelUnloaded
from slmops.engine.llama import LlamaContext, LlamaModel
from slmops.engine.outputs import TokenLogprob
from slmops.engine.runner import BatchRunner
from slmops.modelfile.template import ChatTemplate
from slmops.store.gguf import GGUFInfo, inspect_gguf
from slmops.store.sealed import plain_file
from slmops.types.errors import ContextOverflow, InvalidInput

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


class LoadedModel:
    def __init__(self, spec: ModelSpec, load: opts.LoadParams, n_parallel: int, max_queue: int, kv_budget: int,
                 prefix_cache: int):
        """``n_parallel``: sequences decoded together; 0 picks from the memory this machine has free.
        ``prefix_cache``: bytes of host memory for cached prompt prefixes evicted from the KV cache."""
        t0 = time.perf_counter_ns()
        self.info = inspect_gguf(spec.model_path, spec.gguf_cache, spec.unseal_key)
        self.spec = spec
        if n_parallel <= 0:
            n_parallel = auto_parallel(self.info, load.num_ctx, psutil.virtual_memory().available,
                                       budget=kv_budget, kv_type=load.kv_type)
        with plain_file(spec.model_path, spec.unseal_key, "model") as path:  # llama.cpp maps it; the map outlives it
            self.model = LlamaModel(path, n_gpu_layers=load.num_gpu)
        self.load_params = load
        self.n_parallel = n_parallel
        cache_budget = load.num_ctx * 2  # cached prefixes in the KV cache: a couple of contexts' worth
        spill_budget = prefix_cache // max(1, kv_bytes_per_token(self.info, load.kv_type))  # in host memory
        ctx_params = replace(load, num_ctx=load.num_ctx * n_parallel + cache_budget)
        self.ctx: LlamaContext | None = None
        try:
            self.ctx = LlamaContext(self.model, ctx_params, n_seq_max=2 * n_parallel)
            adapters = []
            for adapter in spec.adapters:
                inspect_gguf(adapter, spec.gguf_cache, spec.unseal_key)
                with plain_file(adapter, spec.unseal_key, "adapter") as path:  # read whole into the adapter
                    adapters.append(self.model.load_lora(path))
            if adapters:
                self.ctx.set_loras(adapters)
        except BaseException:
            if self.ctx is not None:
                self.ctx.close()
            self.model.close()
            raise
        self.runner = BatchRunner(self.model, self.ctx, n_parallel, load.num_ctx, cache_budget, self._logprob,
                                  max_queue=max_queue, spill_budget=spill_budget)
        bos = lc.llama_vocab_bos(self.model.vocab)
        eos = lc.llama_vocab_eos(self.model.vocab)
        self.bos_text = self.model.piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else ""
        eos_text = self.model.piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else ""
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.model.vocab))
        source = spec.template or DEFAULT_TEMPLATE
        self.template = ChatTemplate.compile(source, self.bos_text, eos_text)
        self.lock = threading.Lock()
        self._embed_ctx: LlamaContext | None = None
        self.closed = False
        self.load_duration = time.perf_counter_ns() - t0

    # -- prompts -------------------------------------------------------------------------------------------
    def chat_messages(self, messages: list[dict[str, Any]], system: str | None = None) -> list[dict[str, Any]]:
        """Modelfile SYSTEM and MESSAGEs go before the conversation, as Ollama does."""
        msgs = [dict(m) for m in self.spec.messages] + [dict(m) for m in messages]
        sys_text = system if system is not None else self.spec.system
        if sys_text and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": sys_text})
        return msgs

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None = None,
               template: str | None = None) -> str:
        tpl = ChatTemplate.compile(template, self.template.bos_token, self.template.eos_token) if template \
            else self.template
        return tpl.render(messages, tools=tools)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        if self.add_bos and self.bos_text and text.startswith(self.bos_text):
            text = text[len(self.bos_text):]
        return self.model.tokenize(text, add_special=True, parse_special=special)

    def detokenize(self, tokens: list[int]) -> str:
        bad = [t for t in tokens if not self.model.valid_token(t)]
        if bad:
            raise InvalidInput(f"token {bad[0]} is outside the vocabulary (0..{self.model.n_vocab - 1})")
        return self.model.detokenize(tokens)

    # -- generation ----------------------------------------------------------------------------------------
    def check_fits(self, n_prompt: int, n_ctx: int | None = None) -> None:
        n_ctx = min(n_ctx or self.load_params.num_ctx, self.load_params.num_ctx)
        if n_prompt >= n_ctx:
            raise ContextOverflow(
                f"prompt is {n_prompt} tokens but the context holds {n_ctx} (num_ctx); shorten the prompt or raise "
                f"num_ctx (this model supports up to {self.model.n_ctx_train})"
            )

    def submit(self, tokens: list[int], sampling: opts.SamplingParams, emit: Emit, load_duration: int = 0,
               n_ctx: int | None = None) -> Cancel:
        """Queue the completion of ``tokens``; ``emit`` receives its pieces on the runner thread. Returns the
        function that cancels it."""
        if not tokens:
            raise InvalidInput("empty prompt")
        if self.info.embedding_only:
            raise InvalidInput(f'"{self.spec.name}" is an embedding model; use /api/embed or /v1/embeddings')
        self.check_fits(len(tokens), n_ctx)
        if self.closed:
            raise ModelUnloaded(self.spec.name)
        req_id = self.runner.submit(tokens, sampling, emit, load_duration, n_ctx)
        return lambda: self.runner.cancel(req_id)

    def _logprob(self, idx: int, token: int, top: int) -> TokenLogprob:
        """Log-softmax of the raw logits: the model's own distribution, before sampling settings."""
        logits = self.ctx.logits(idx).astype(np.float64)
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        def entry(t: int) -> TokenLogprob:
            raw = self.model.piece(t)
            return TokenLogprob(raw.decode("utf-8", "replace"), float(logits[t] - lse), raw)
        chosen = entry(token)
        if top <= 0:
            return chosen
        best = np.argpartition(-logits, top)[:top]
        best = best[np.argsort(-logits[best])]
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, tuple(entry(int(t)) for t in best))

    # -- embeddings ----------------------------------------------------------------------------------------
    def embed(self, texts: list[str], truncate: bool = True) -> tuple[list[list[float]], int]:
        """L2-normalised pooled embeddings (as sentence-transformers returns them) and the tokens used."""
        if self.closed:
            raise ModelUnloaded(self.spec.name)
        return self.runner.call(lambda: self._embed(texts, truncate))  # type: ignore[return-value]

    def _embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
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

    def status(self) -> ModelStatus:
        return ModelStatus(self.spec.name, self.spec, self.load_params.num_ctx, self.n_parallel,
                           waiting=len(self.runner.scheduler.waiting), max_batch=self.runner.max_batch)

    def close(self) -> None:
        """Free llama.cpp memory once the requests in progress have finished."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.runner.close(ModelUnloaded(self.spec.name))
            if self._embed_ctx is not None:
                self._embed_ctx.close()
            self.ctx.close()
            self.model.close()
