"""The in-process engine: loads models on demand, keeps them until evicted, runs chat and generate requests.

This is the ``EngineClient`` the CLI and the Python API use directly, and what each runner process of the server
runs inside. It takes plain values (specs, option dicts) and knows nothing of HTTP. Models run on a
:class:`~slmops.engine.backend.Backend` (llama.cpp by default); a request that needs what the backend lacks is an
``Unsupported`` error naming it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Iterator

from slmops.types import options as opts
from slmops.engine.answers import offered_tools
from slmops.engine.backend import Backend, Constraint, backend_for, require, require_constraint
from slmops.engine.client import (Cancel, Emit, EngineConfig, ModelSpec, ModelStatus, Request,  # noqa: F401
                                  spec_from_store, stream_from, until_loaded, until_loaded_call)
from slmops.engine.model import LoadedModel
from slmops.types.errors import EngineError, InvalidInput
from slmops.engine.tools import prepare_messages
from slmops.engine.outputs import Output


log = logging.getLogger("slmops.engine")


def _serves(loaded: opts.LoadParams, wanted: opts.LoadParams) -> bool:
    """A loaded model serves any smaller num_ctx per request, without reloading."""
    return wanted.num_ctx <= loaded.num_ctx and replace(wanted, num_ctx=loaded.num_ctx) == loaded


class Engine:
    def __init__(self, config: EngineConfig | None = None, backend: Backend | None = None, **settings: Any):
        """``Engine(EngineConfig(...))`` or ``Engine(default_ctx=2048, ...)`` with EngineConfig's fields;
        ``backend``: what every model runs on (a test's); without one, each model's format picks its backend
        (GGUF: llama.cpp, loaded now; ONNX: ONNX Runtime GenAI, loaded with the first such model)."""
        self.config = config or EngineConfig(**settings)
        self._fixed = backend
        self._backends: dict[str, Backend] = {}
        self.backend = backend or self.backend_for("gguf")
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def backend_for(self, fmt: str) -> Backend:
        if self._fixed is not None:
            return self._fixed
        backend = self._backends.get(fmt)
        if backend is None:
            backend = self._backends[fmt] = backend_for(fmt, self.config.verbose)
        return backend

    def load(self, spec: ModelSpec, options: dict[str, Any] | None = None) -> int:
        return self.load_model(spec, options)[1]

    def load_model(self, spec: ModelSpec, options: dict[str, Any] | None = None) -> tuple[LoadedModel, int]:
        """Return the loaded model (loading or reloading it if its context settings changed) and load time in ns."""
        load = self._load_params(spec, options)
        with self._lock:
            current = self._loaded.get(spec.name)
            if current and current.spec == spec and _serves(current.asked, load):
                self._loaded.move_to_end(spec.name)
                return current, 0
            if current:
                self._loaded.pop(spec.name).close()
            while len(self._loaded) >= self.config.max_loaded:
                _, old = self._loaded.popitem(last=False)
                old.close()
            backend = self.backend_for(spec.format)
            require(backend, "adapters", bool(spec.adapters))
            model = self._load_falling_back(backend, spec, load)
            self._loaded[spec.name] = model
            return model, model.load_duration

    def _load_falling_back(self, backend: Backend, spec: ModelSpec, load: opts.LoadParams) -> LoadedModel:
        """Load on the accelerator asked for, else on the CPU, saying why (``slmops ps``, ``/api/ps``, the
        ``slmops_accelerator_fallbacks`` metric): a backend that cannot offload here, or a GPU load that failed (out
        of its memory, a missing driver library) is retried on the CPU rather than failing the request. A backend
        that walks its own accelerators (ONNX Runtime's execution providers) reports its fallback itself."""
        if load.num_gpu == 0 or backend.capabilities.own_placement:
            return LoadedModel(backend, spec, load, self.config)
        if not backend.capabilities.gpu_offload:
            why = f"GPU offload was asked for (num_gpu {load.num_gpu}), but {backend.name} has none here"
        else:
            try:
                return LoadedModel(backend, spec, load, self.config)
            except EngineError as err:
                why = f"loading with GPU offload failed ({err})"
        log.warning("%s: %s; loading it on the CPU", spec.name, why)
        return LoadedModel(backend, spec, replace(load, num_gpu=0), self.config, asked=load,
                           fallback=f"{why}; on the CPU")

    def _load_params(self, spec: ModelSpec, options: dict[str, Any] | None) -> opts.LoadParams:
        merged = opts.merge(spec.params, options)
        return opts.to_load(merged, self.config.load_defaults(), spec.context_length or 1 << 20)

    def run(self, spec: ModelSpec, req: Request) -> Iterator[Output]:
        """Stream a completion. Options, format and tools are checked now; prompt errors (a template that fails,
        a prompt over the context) surface at the first ``next()``."""
        prepared = self._sampling(spec, req)
        return until_loaded(spec.name, lambda: stream_from(lambda emit: self._submit(spec, req, prepared, emit)))

    def start(self, spec: ModelSpec, req: Request, emit: Emit) -> Cancel:
        """Prompt work runs on the calling thread; pieces reach ``emit`` on the model's runner thread as they are
        sampled, with no thread waiting per request."""
        return self._submit(spec, req, self._sampling(spec, req), emit)

    def _sampling(self, spec: ModelSpec,
                  req: Request) -> tuple[opts.SamplingParams, Any, list[dict[str, Any]] | None]:
        """(sampling parameters, the constraint compiled by the backend or None, the tools the model sees)."""
        tools = offered_tools(req)
        constraint = Constraint.from_format(req.format)
        if tools and req.tool_choice != "auto":
            constraint = Constraint.tool_calls(tools, None if req.tool_choice == "required" else req.tool_choice)
        compiled = None
        model_params = spec.params
        backend = self.backend_for(spec.format)
        if constraint:
            require_constraint(backend, constraint)
            compiled = backend.compile(constraint)
            # The constraint decides where output ends; a model's turn-marker stops could cut a JSON string short.
            model_params = {k: v for k, v in spec.params.items() if k != "stop"}
        require(backend, "logprobs", req.logprobs is not None)
        merged = opts.merge(model_params, req.options)
        return opts.to_sampling(merged, logprobs=req.logprobs), compiled, tools

    def _submit(self, spec: ModelSpec, req: Request, prepared: tuple, emit: Emit) -> Cancel:
        sampling, constraint, tools = prepared
        model, load_ns = self.load_model(spec, req.options)
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
            bad = [t for t in req.prefix_tokens if not model.valid_token(t)]
            if bad:
                raise InvalidInput(f"context holds token {bad[0]}, which is outside the vocabulary")
            tokens = list(req.prefix_tokens) + tokens
        return model.submit(tokens, sampling, emit, load_ns, self._load_params(spec, req.options).num_ctx, constraint,
                            whole=not req.stream)

    def embed(self, spec: ModelSpec, inputs: list[str], options: dict[str, Any] | None = None,
              truncate: bool = True) -> tuple[list[list[float]], int, int]:
        """(vectors, tokens used, load time in ns)."""
        require(self.backend_for(spec.format), "embeddings")

        def attempt() -> tuple[list[list[float]], int, int]:
            model, load_ns = self.load_model(spec, options)
            return (*model.embed(inputs, truncate), load_ns)
        return until_loaded_call(spec.name, attempt)

    def tokenize(self, spec: ModelSpec, text: str) -> list[int]:
        return self.load_model(spec)[0].model.tokenize(text, add_special=False, parse_special=True)

    def detokenize(self, spec: ModelSpec, tokens: list[int]) -> str:
        return self.load_model(spec)[0].detokenize(tokens)

    def loaded(self) -> list[ModelStatus]:
        return [m.status() for m in list(self._loaded.values())]

    def unload(self, name: str) -> bool:
        with self._lock:
            model = self._loaded.pop(name, None)
        if model:
            model.close()
        return model is not None

    def prestart(self, spec: ModelSpec | None = None) -> None:
        """Nothing to start: models load in this process (the server's start loads ``spec`` itself), and the
        default backend is loaded already."""

    def close(self) -> None:
        for name in list(self._loaded):
            self.unload(name)
