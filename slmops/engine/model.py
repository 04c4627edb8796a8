"""A loaded model: its backend's model, the runner that batches its requests, and the chat template.

Everything format-specific (the model file, vocabulary, decoding, embeddings) is the backend's
(:mod:`slmops.engine.backend`); this class prepares prompts, checks requests against the context, and turns the
runner's callbacks into iterators. Generation and embeddings run on the runner's thread. A chat that grows turn by
turn reuses its earlier turns through the prefix cache.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from slmops.engine.backend import Backend, BackendModel
from slmops.engine.client import Cancel, Emit, EngineConfig, ModelSpec, ModelStatus, ModelUnloaded
from slmops.engine.runner import BatchRunner
from slmops.modelfile.template import ChatTemplate
from slmops.types import options as opts
from slmops.types.errors import ContextOverflow, InvalidInput

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def served_messages(spec: ModelSpec, messages: list[dict[str, Any]], system: str | None = None) -> list[dict[str, Any]]:
    """Modelfile SYSTEM and MESSAGEs go before the conversation, as Ollama does; scoring and fine-tuning render
    conversations the same way, so they see what serving sends."""
    msgs = [dict(m) for m in spec.messages] + [dict(m) for m in messages]
    sys_text = system if system is not None else spec.system
    if sys_text and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": sys_text})
    return msgs


class LoadedModel:
    def __init__(self, backend: Backend, spec: ModelSpec, load: opts.LoadParams, config: EngineConfig,
                 asked: opts.LoadParams | None = None, fallback: str | None = None):
        """Loads ``spec`` on ``backend``; ``config`` gives the parallel sequences, queue and cache budgets. After
        a fallback to the CPU (``fallback`` says why), ``asked`` is what the load asked for and ``load`` what it
        got."""
        t0 = time.perf_counter_ns()
        self.spec = spec
        self.model: BackendModel = backend.load(spec, load, config)
        self.load_params = load
        self.n_parallel = self.model.plan.n_parallel
        decoder = self.model.decoder
        self.runner = BatchRunner(decoder, self.model.plan, load.num_ctx, max_queue=config.max_queue) \
            if decoder is not None else None
        source = spec.template or DEFAULT_TEMPLATE
        self.template = ChatTemplate.compile(source, self.model.bos_text, self.model.eos_text)
        self.lock = threading.Lock()
        self.closed = False
        self.fallback = fallback or getattr(self.model, "fallback", None)
        self.asked = asked or load
        self.load_duration = time.perf_counter_ns() - t0

    # -- prompts -------------------------------------------------------------------------------------------
    def chat_messages(self, messages: list[dict[str, Any]], system: str | None = None) -> list[dict[str, Any]]:
        return served_messages(self.spec, messages, system)

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None = None,
               template: str | None = None) -> str:
        tpl = ChatTemplate.compile(template, self.template.bos_token, self.template.eos_token) if template \
            else self.template
        return tpl.render(messages, tools=tools)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        bos = self.model.bos_text
        if self.model.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return self.model.tokenize(text, add_special=True, parse_special=special)

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.model.n_vocab

    def detokenize(self, tokens: list[int]) -> str:
        bad = [t for t in tokens if not self.valid_token(t)]
        if bad:
            raise InvalidInput(f"token {bad[0]} is outside the vocabulary (0..{self.model.n_vocab - 1})")
        return self.model.detokenize(tokens)

    # -- generation ----------------------------------------------------------------------------------------
    def check_fits(self, n_prompt: int, n_ctx: int | None = None) -> None:
        n_ctx = min(n_ctx or self.load_params.num_ctx, self.load_params.num_ctx)
        if n_prompt >= n_ctx:
            raise ContextOverflow.prompt(n_prompt, n_ctx, self.model.n_ctx_train)

    def submit(self, tokens: list[int], sampling: opts.SamplingParams, emit: Emit, load_duration: int = 0,
               n_ctx: int | None = None, constraint: Any = None, whole: bool = False) -> Cancel:
        """Queue the completion of ``tokens`` (``constraint``: compiled by the backend); ``emit`` receives its
        pieces on the runner thread (with ``whole``, only the final record, holding all the text). Returns the
        function that cancels it."""
        if not tokens:
            raise InvalidInput("empty prompt")
        if self.model.embedding_only:
            raise InvalidInput(f'"{self.spec.name}" is an embedding model; use /api/embed or /v1/embeddings')
        self.check_fits(len(tokens), n_ctx)
        if self.closed:
            raise ModelUnloaded(self.spec.name)
        if self.runner is None:
            return self.model.start(tokens, sampling, constraint, emit, load_duration, n_ctx, whole)
        req_id = self.runner.submit(tokens, sampling, emit, load_duration, n_ctx, constraint, whole)
        return lambda: self.runner.cancel(req_id)

    # -- embeddings ----------------------------------------------------------------------------------------
    def embed(self, texts: list[str], truncate: bool = True) -> tuple[list[list[float]], int]:
        """L2-normalised pooled embeddings (as sentence-transformers returns them) and the tokens used."""
        if self.closed:
            raise ModelUnloaded(self.spec.name)
        if self.runner is None:
            return self.model.embed(texts, truncate)
        return self.runner.call(lambda: self.model.embed(texts, truncate))  # type: ignore[return-value]

    def status(self) -> ModelStatus:
        runner = self.runner
        return ModelStatus(self.spec.name, self.spec, self.load_params.num_ctx, self.n_parallel,
                           waiting=len(runner.scheduler.waiting) if runner else getattr(self.model, "waiting", 0),
                           max_batch=runner.max_batch if runner else 0, fallback=self.fallback)

    def close(self) -> None:
        """Free the backend's memory once the requests in progress have finished."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.runner is not None:
                self.runner.close(ModelUnloaded(self.spec.name))
            self.model.close()
