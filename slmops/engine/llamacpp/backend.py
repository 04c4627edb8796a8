"""llama.cpp as a :class:`slmops.engine.backend.Backend`: GGUF models, continuous batching over one unified KV
cache, GBNF for every constraint but regular expressions, pooled embeddings, LoRA adapters and log-probabilities."""

from __future__ import annotations

import psutil

from slmops.engine.backend import Capabilities, Constraint
from slmops.engine.client import EngineConfig, ModelSpec
from slmops.engine.llamacpp import grammar, supports_gpu_offload
from slmops.engine.llamacpp.bindings import init_backend
from slmops.engine.llamacpp.model import LlamaCppModel
from slmops.types.options import LoadParams


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self, verbose: bool | None = None):
        """Initialises llama.cpp once per process; it logs only when ``verbose`` (``None`` keeps the setting)."""
        init_backend(verbose)
        self.capabilities = Capabilities(continuous_batching=True, embeddings=True, logprobs=True, adapters=True,
                                         constraints=grammar.KINDS, gpu_offload=supports_gpu_offload())

    def load(self, spec: ModelSpec, load: LoadParams, config: EngineConfig) -> LlamaCppModel:
        return LlamaCppModel(spec, load, config, psutil.virtual_memory().available)

    def compile(self, constraint: Constraint) -> str:
        """The constraint's GBNF, checked against every grammar limit before llama.cpp parses it."""
        return grammar.to_gbnf(constraint)
