"""The in-process engine: loads models on demand, keeps them until evicted, runs chat and generate requests.

This is the ``EngineClient`` the CLI and the Python API use directly; the server will reach the same interface
across a process boundary. It takes plain values (specs, option dicts) and knows nothing of HTTP.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

from slmops.types import options as opts
from slmops.engine.grammar import for_format as grammar_for_format
from slmops.engine.grammar import for_schema, tool_call_schema
from slmops.engine.llama import init_backend
from slmops.engine.model import LoadedModel, ModelSpec, ModelUnloaded
from slmops.types.errors import EngineError, InvalidInput
from slmops.engine.tools import prepare_messages
from slmops.engine.outputs import Output
from slmops.store import manifests as mt
from slmops.store.store import Store
from slmops.types.name import ModelName


def spec_from_store(store: Store, name: ModelName) -> ModelSpec:
    manifest = store.manifest(name)
    return ModelSpec(
        name=name.display,
        model_path=store.model_path(name),
        template=store.read_text(manifest, mt.TEMPLATE),
        system=store.read_text(manifest, mt.SYSTEM),
        params=store.read_json(manifest, mt.PARAMS) or {},
        messages=store.read_json(manifest, mt.MESSAGES) or [],
        adapters=[store.blob_path(l.blob) for l in manifest.layers if l.media_type == mt.ADAPTER],
        gguf_cache=store.gguf_cache,
        context_length=store.inspect(name).context_length,
    )


def _serves(loaded: opts.LoadParams, wanted: opts.LoadParams) -> bool:
    """A loaded model serves any smaller num_ctx per request, without reloading."""
    return (wanted.num_ctx <= loaded.num_ctx and wanted.num_batch == loaded.num_batch
            and wanted.num_thread == loaded.num_thread)


@dataclass
class Request:
    """One chat or generate call. ``messages`` for chat; ``prompt`` (+ ``raw``) for generate.

    ``format`` is Ollama's (``"json"`` or a JSON Schema); ``tool_choice`` is ``"auto"``, ``"none"``,
    ``"required"`` or a tool name; ``logprobs`` asks for the chosen token's log-probability plus that many
    alternatives.
    """

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"
    format: str | dict[str, Any] | None = None
    logprobs: int | None = None
    prefix_tokens: list[int] | None = None  # Ollama's ``context``: tokens of an earlier exchange to continue


class Engine:
    def __init__(self, default_ctx: int = 4096, num_thread: int = 0, max_loaded: int = 1, verbose: bool = False,
                 num_parallel: int = 0, max_queue: int = 512):
        init_backend(verbose)
        self.num_parallel = num_parallel
        self.max_queue = max_queue
        self.default_ctx = default_ctx
        self.num_thread = num_thread
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, spec: ModelSpec, options: dict[str, Any] | None = None) -> tuple[LoadedModel, int]:
        """Return the loaded model (loading or reloading it if its context settings changed) and load time in ns."""
        load = self._load_params(spec, options)
        with self._lock:
            current = self._loaded.get(spec.name)
            if current and current.spec == spec and _serves(current.load_params, load):
                self._loaded.move_to_end(spec.name)
                return current, 0
            if current:
                self._loaded.pop(spec.name).close()
            while len(self._loaded) >= self.max_loaded:
                _, old = self._loaded.popitem(last=False)
                old.close()
            model = LoadedModel(spec, load, self.num_parallel, self.max_queue)
            self._loaded[spec.name] = model
            return model, model.load_duration

    def _load_params(self, spec: ModelSpec, options: dict[str, Any] | None) -> opts.LoadParams:
        merged = opts.merge(spec.params, options)
        if self.num_thread and "num_thread" not in merged:
            merged["num_thread"] = self.num_thread
        return opts.to_load(merged, self.default_ctx, spec.context_length or 1 << 20)

    def run(self, spec: ModelSpec, req: Request) -> Iterator[Output]:
        """Stream a completion. Options, format and tools are checked now; prompt errors (a template that fails,
        a prompt over the context) surface at the first ``next()``."""
        sampling, tools = self._sampling(spec, req)
        return self._retrying(spec, req, sampling, tools)

    def _sampling(self, spec: ModelSpec, req: Request) -> tuple[opts.SamplingParams, list[dict[str, Any]] | None]:
        tools = req.tools if req.tools and req.tool_choice != "none" else None
        grammar = grammar_for_format(req.format)
        if tools and req.tool_choice != "auto":
            name = None if req.tool_choice == "required" else req.tool_choice
            grammar = for_schema(tool_call_schema(tools, name))
        model_params = spec.params
        if grammar:
            # The grammar decides where output ends; a model's turn-marker stops could cut a JSON string short.
            model_params = {k: v for k, v in spec.params.items() if k != "stop"}
        merged = opts.merge(model_params, req.options)
        return opts.to_sampling(merged, grammar=grammar, logprobs=req.logprobs), tools

    def _retrying(self, spec: ModelSpec, req: Request, sampling: opts.SamplingParams,
                  tools: list[dict[str, Any]] | None) -> Iterator[Output]:
        for _ in range(3):
            started = False
            try:
                for out in self._run(spec, req, sampling, tools):
                    started = True
                    yield out
                return
            except ModelUnloaded:
                if started:
                    raise EngineError(f'model "{spec.name}" was unloaded during generation; try again') from None
                continue  # evicted before this request began: load it again
        raise EngineError(f'model "{spec.name}" was unloaded repeatedly while waiting; try again')

    def _run(self, spec: ModelSpec, req: Request, sampling: opts.SamplingParams,
             tools: list[dict[str, Any]] | None) -> Iterator[Output]:
        model, load_ns = self.load(spec, req.options)
        if req.messages is not None:
            messages = model.chat_messages(req.messages)
            source = req.template or model.template.source
            messages = prepare_messages(messages, tools, source)
            text = model.render(messages, tools=tools, template=req.template)
        elif req.raw:
            text = req.prompt or ""
        else:
            text = model.render(model.chat_messages([{"role": "user", "content": req.prompt or ""}], req.system),
                                template=req.template)
        tokens = model.tokenize(text)
        if req.prefix_tokens:
            bad = [t for t in req.prefix_tokens if not model.model.valid_token(t)]
            if bad:
                raise InvalidInput(f"context holds token {bad[0]}, which is outside the vocabulary")
            tokens = list(req.prefix_tokens) + tokens
        yield from model.generate(tokens, sampling, load_ns, self._load_params(spec, req.options).num_ctx)

    def embed(self, spec: ModelSpec, inputs: list[str], options: dict[str, Any] | None = None,
              truncate: bool = True) -> tuple[list[list[float]], int, int]:
        """(vectors, tokens used, load time in ns)."""
        for _ in range(3):
            model, load_ns = self.load(spec, options)
            try:
                vectors, used = model.embed(inputs, truncate)
                return vectors, used, load_ns
            except ModelUnloaded:
                continue
        raise EngineError(f'model "{spec.name}" was unloaded repeatedly while waiting; try again')

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def unload(self, name: str) -> bool:
        with self._lock:
            model = self._loaded.pop(name, None)
        if model:
            model.close()
        return model is not None

    def close(self) -> None:
        for name in list(self._loaded):
            self.unload(name)
