"""ONNX Runtime GenAI as a :class:`slmops.engine.backend.Backend`: model folders exported for it, on the first
execution provider that loads them (NPU, then GPU, then the CPU), each model with its own generate loop.

Constraints compile to llguidance's inputs (``GeneratorParams.set_guidance``): JSON and tool calls as a JSON
Schema, regular expressions as they are. GBNF is llama.cpp's own and stays a 400 naming it. No embeddings, LoRA
adapters or continuous batching (the runtime batches only statically on the CPU).
"""

from __future__ import annotations

import json
import re

from slmops.engine.backend import Capabilities, Constraint
from slmops.engine.client import EngineConfig, ModelSpec
from slmops.engine.onnx import providers
from slmops.engine.onnx.model import OnnxModel
from slmops.types.errors import InvalidInput, Unsupported
from slmops.types.options import LoadParams

ANY_OBJECT = json.dumps({"type": "object"})  # Ollama's format "json": any JSON object


class OnnxBackend:
    name = "ONNX Runtime GenAI"

    def __init__(self, verbose: bool | None = None):
        """``verbose`` is accepted for the factory's signature; the runtime logs what it logs."""
        self.capabilities = Capabilities(continuous_batching=False, embeddings=False, logprobs=True, adapters=False,
                                         gpu_offload=providers.has_accelerator(), own_placement=True,
                                         constraints=frozenset({"json", "json_schema", "tool_calls", "regex"}))

    def load(self, spec: ModelSpec, load: LoadParams, config: EngineConfig) -> OnnxModel:
        return OnnxModel(spec, load, config)

    def compile(self, constraint: Constraint) -> tuple[str, str]:
        """``(guidance type, data)``. What Python can check cheaply is checked now; llguidance itself parses the
        grammar when the request's generator is made, and what it rejects reaches the request as ``InvalidInput``."""
        if constraint.kind == "json":
            return "json_schema", ANY_OBJECT
        if constraint.kind in ("json_schema", "tool_calls"):
            if not isinstance(constraint.schema, dict):
                raise InvalidInput("a JSON Schema constraint needs a JSON object")
            try:
                return "json_schema", json.dumps(constraint.schema)
            except (TypeError, ValueError) as err:
                raise InvalidInput(f"the JSON Schema cannot be serialised: {err}") from None
        if constraint.kind == "regex":
            try:
                re.compile(constraint.source or "")
            except re.error as err:
                raise InvalidInput(f"invalid regular expression {constraint.source!r}: {err}") from None
            return "regex", constraint.source or ""
        raise Unsupported("GBNF grammars", self.name)
