"""A loaded model: llama.cpp model + context + chat template, and the single-sequence generation loop.

The KV cache keeps the tokens of the previous request so a chat that grows turn by turn only evaluates what is
new (the prefix that matches is reused). One request runs at a time per model; the lock is the seam where the
batching scheduler will take over.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import llama_cpp as lc
import numpy as np

from slmops.types import options as opts
from slmops.engine.llama import LlamaContext, LlamaModel, SamplerChain
from slmops.engine.outputs import Output, Stats, TokenLogprob
from slmops.engine.stops import StopMatcher
from slmops.modelfile.template import ChatTemplate
from slmops.store.gguf import inspect_gguf
from slmops.types.errors import ContextOverflow, InvalidInput

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelUnloaded(Exception):
    """The model was unloaded (evicted, expired, reloaded) while a request waited for it; load it again."""


@dataclass
class ModelSpec:
    """Everything the engine needs to run a model, resolved from the store by the caller."""

    name: str
    model_path: Path
    template: str | None = None
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    adapters: list[Path] = field(default_factory=list)
    gguf_cache: Path | None = None
    context_length: int | None = None  # the model's training context, the cap for num_ctx


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LoadedModel:
    def __init__(self, spec: ModelSpec, load: opts.LoadParams):
        t0 = time.perf_counter_ns()
        self.info = inspect_gguf(spec.model_path, spec.gguf_cache)
        self.spec = spec
        self.model = LlamaModel(spec.model_path)
        self.load_params = load
        try:
            self.ctx = LlamaContext(self.model, load)
            for path in spec.adapters:
                inspect_gguf(path, spec.gguf_cache)
            if spec.adapters:
                self.ctx.set_loras([self.model.load_lora(p) for p in spec.adapters])
        except BaseException:
            if getattr(self, "ctx", None) is not None:
                self.ctx.close()
            self.model.close()
            raise
        bos = lc.llama_vocab_bos(self.model.vocab)
        eos = lc.llama_vocab_eos(self.model.vocab)
        self.bos_text = self.model.piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else ""
        eos_text = self.model.piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else ""
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.model.vocab))
        source = spec.template or DEFAULT_TEMPLATE
        self.template = ChatTemplate.compile(source, self.bos_text, eos_text)
        self.lock = threading.Lock()
        self._cached: list[int] = []
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
    def check_fits(self, n_prompt: int) -> None:
        n_ctx = self.ctx.n_ctx
        if n_prompt >= n_ctx:
            raise ContextOverflow(
                f"prompt is {n_prompt} tokens but the context holds {n_ctx} (num_ctx); shorten the prompt or raise "
                f"num_ctx (this model supports up to {self.model.n_ctx_train})"
            )

    def generate(self, tokens: list[int], sampling: opts.SamplingParams, load_duration: int = 0) -> Iterator[Output]:
        """Stream the completion of ``tokens``; closing the iterator stops generation at once."""
        if not tokens:
            raise InvalidInput("empty prompt")
        if self.info.embedding_only:
            raise InvalidInput(f'"{self.spec.name}" is an embedding model; use /api/embed or /v1/embeddings')
        self.check_fits(len(tokens))
        with self.lock:
            if self.closed:
                raise ModelUnloaded(self.spec.name)
            yield from self._generate(tokens, sampling, load_duration)

    def _generate(self, tokens: list[int], sampling: opts.SamplingParams, load_duration: int) -> Iterator[Output]:
        t_start = time.perf_counter_ns()
        n_ctx = self.ctx.n_ctx
        reuse = min(_common_prefix(self._cached, tokens), len(tokens) - 1)
        self.ctx.forget_from(reuse)
        self._cached = self._cached[:reuse]
        idx = self.ctx.decode(tokens[reuse:], reuse)
        self._cached = list(tokens)
        t_prompt = time.perf_counter_ns()
        sampler = SamplerChain(self.model, sampling, n_ctx, tokens)
        limit = sampling.num_predict if sampling.num_predict >= 0 else n_ctx
        stops = StopMatcher(sampling.stop)
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        n_gen, reason = 0, "length"
        generated: list[int] = []
        pending_lp: list[TokenLogprob] = []
        try:
            while n_gen < limit:
                if len(self._cached) >= n_ctx:
                    break
                tok = sampler.sample(self.ctx, idx)
                if self.model.is_eog(tok):
                    reason = "stop"
                    break
                n_gen += 1
                generated.append(tok)
                if sampling.logprobs is not None:
                    pending_lp.append(self._logprob(idx, tok, sampling.logprobs))
                text, hit = stops.feed(utf8.decode(self.model.piece(tok)))
                if text:
                    yield Output(text=text, logprobs=tuple(pending_lp))
                    pending_lp = []
                if hit:
                    reason = "stop"
                    break
                if n_gen >= limit or len(self._cached) + 1 >= n_ctx:
                    break
                idx = self.ctx.decode([tok], len(self._cached))
                self._cached.append(tok)
            tail = stops.flush() + utf8.decode(b"", final=True)
        except GeneratorExit:
            raise
        except BaseException:
            self._cached = []  # interrupted inside llama_decode: the cache may not match what we recorded
            raise
        finally:
            sampler.close()
        t_end = time.perf_counter_ns()
        stats = Stats(
            prompt_eval_count=len(tokens),
            prompt_eval_duration=t_prompt - t_start,
            eval_count=n_gen,
            eval_duration=t_end - t_prompt,
            load_duration=load_duration,
            total_duration=t_end - t_start + load_duration,
            cached_prompt_tokens=reuse,
        )
        yield Output(text=tail, done=True, done_reason=reason, stats=stats, logprobs=tuple(pending_lp),
                     context=tuple(tokens) + tuple(generated))

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
        """L2-normalised mean-pooled embeddings (as sentence-transformers returns them) and the tokens used."""
        with self.lock:
            if self.closed:
                raise ModelUnloaded(self.spec.name)
            if self._embed_ctx is None:
                n = min(self.load_params.num_ctx, self.model.n_ctx_train or self.load_params.num_ctx)
                params = opts.LoadParams(num_ctx=n, num_batch=n, num_thread=self.load_params.num_thread)
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
        """Free llama.cpp memory once the request in progress (if any) has finished."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self._embed_ctx is not None:
                self._embed_ctx.close()
            self.ctx.close()
            self.model.close()
