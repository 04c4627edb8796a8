"""The ``Backend`` protocol: everything that depends on a model's format and runtime, behind one interface.

A backend loads a model file (with the accelerator and options of :class:`LoadParams`), tokenizes and
detokenizes, compiles output constraints, computes embeddings, and either offers a batched decode step that
:class:`slmops.engine.runner.BatchRunner` drives with the pure scheduler (continuous batching) or runs its own
generate loop per request. It declares what it can do in :class:`Capabilities`; the engine checks a request against
them and answers what a backend lacks with :class:`Unsupported` (HTTP 400), naming it. llama.cpp
(:mod:`slmops.engine.llamacpp`) is one implementation, and the only code that imports its bindings.

Output constraints travel backend-neutral, as a :class:`Constraint` (JSON, a JSON Schema, a forced tool call, a
regular expression or a grammar); each backend compiles them into its own form (llama.cpp: GBNF).

Importing this module loads no backend: a parent process that only talks to runners stays free of native code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal, Protocol

from slmops.types.errors import InvalidInput, Unsupported

if TYPE_CHECKING:
    from slmops.engine.client import Cancel, EngineConfig, Emit, ModelSpec
    from slmops.engine.outputs import TokenLogprob
    from slmops.engine.scheduler import Item, MemOp
    from slmops.types.options import LoadParams, SamplingParams

ConstraintKind = Literal["json", "json_schema", "tool_calls", "regex", "gbnf"]
CONSTRAINT_KINDS: tuple[str, ...] = ("json", "json_schema", "tool_calls", "regex", "gbnf")


# -- constraints ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Constraint:
    """What every generated token must follow, before any backend compiles it.

    ``json``: any JSON object (Ollama's ``format: "json"``), no payload. ``json_schema``: ``schema``, a JSON
    Schema. ``tool_calls``: ``schema``, the shape of a call of one of the tools (:func:`tool_call_schema`).
    ``regex``: ``source``, a regular expression the whole output matches. ``gbnf``: ``source``, a llama.cpp grammar
    (only backends that declare it compile one).
    """

    kind: ConstraintKind
    schema: dict[str, Any] | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidInput(f"constraint kind {self.kind!r} is not one of {', '.join(CONSTRAINT_KINDS)}")
        needs_schema = self.kind in ("json_schema", "tool_calls")
        needs_source = self.kind in ("regex", "gbnf")
        if needs_schema != isinstance(self.schema, dict) or (self.schema is not None and not needs_schema):
            raise InvalidInput(f"a {self.kind} constraint " + ("needs a JSON Schema object" if needs_schema
                                                                 else "takes no JSON Schema"))
        if needs_source != isinstance(self.source, str) or (self.source is not None and not needs_source):
            raise InvalidInput(f"a {self.kind} constraint " + ("needs its text" if needs_source else "takes no text"))
        if needs_source and not self.source:
            raise InvalidInput(f"a {self.kind} constraint needs a non-empty {self.kind}")

    @classmethod
    def from_format(cls, fmt: str | dict[str, Any] | None) -> Constraint | None:
        """Ollama ``format``: ``"json"`` (any JSON object) or a JSON Schema; empty means free text (``None``)."""
        if fmt in (None, "", {}):
            return None
        if fmt == "json":
            return cls("json")
        if isinstance(fmt, dict):
            return cls("json_schema", schema=fmt)
        raise InvalidInput('format must be "json" or a JSON Schema object')

    @classmethod
    def tool_calls(cls, tools: list[dict[str, Any]], name: str | None = None) -> Constraint:
        """A call of one of ``tools`` (or exactly the one called ``name``)."""
        return cls("tool_calls", schema=tool_call_schema(tools, name))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", source=pattern)

    @classmethod
    def gbnf(cls, grammar: str) -> Constraint:
        return cls("gbnf", source=grammar)


def tool_call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """A call of one of ``tools`` (or exactly ``name``): ``{"name": ..., "arguments": {...}}``."""
    options = []
    for tool in tools:
        fn = tool.get("function") or {}
        if name is not None and fn.get("name") != name:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn.get("name")}, "arguments": params},
            "required": ["name", "arguments"],
        })
    if not options:
        raise InvalidInput(f'tool_choice names "{name}", which is not among the tools given')
    return options[0] if len(options) == 1 else {"anyOf": options}


# -- capabilities -----------------------------------------------------------------------------------------------

_CONSTRAINT_NAMES = {"json": "JSON output", "json_schema": "JSON Schema output", "tool_calls": "forced tool calls",
                     "regex": "regular-expression output", "gbnf": "GBNF grammars"}


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers. ``continuous_batching``: it hands out a :class:`BatchDecoder` that the engine's
    runner drives (requests join and leave between steps); otherwise its models run their own generate loop."""

    continuous_batching: bool = False
    embeddings: bool = False
    logprobs: bool = False
    adapters: bool = False  # LoRA adapters (a Modelfile's ADAPTER)
    gpu_offload: bool = False  # it can run layers on a GPU here (this build, this machine)
    own_placement: bool = False  # it walks its own accelerators at load, falling back as it must (BackendModel.fallback)
    constraints: frozenset[str] = field(default_factory=frozenset)  # the Constraint kinds it compiles


def require(backend: Backend, capability: str, needed: bool = True) -> None:
    """:class:`Unsupported` naming ``capability`` (a field of :class:`Capabilities`) when ``backend`` lacks it."""
    if needed and not getattr(backend.capabilities, capability):
        raise Unsupported(_NAMES.get(capability, capability), backend.name)


def require_constraint(backend: Backend, constraint: Constraint) -> None:
    if constraint.kind not in backend.capabilities.constraints:
        raise Unsupported(_CONSTRAINT_NAMES[constraint.kind], backend.name)


_NAMES = {"continuous_batching": "continuous batching", "embeddings": "embeddings",
          "logprobs": "log-probabilities (logprobs)", "adapters": "LoRA adapters (ADAPTER)"}


# -- the protocol -----------------------------------------------------------------------------------------------

class Sampler(Protocol):
    """One request's sampler, with its constraint; used on the runner thread only."""

    def sample(self, idx: int) -> int:
        """The next token from the logits at batch index ``idx`` of the last decode."""

    def close(self) -> None: ...


class BatchDecoder(Protocol):
    """A model's decode step over several sequences at once, which the runner drives with the pure scheduler."""

    n_batch: int  # the most tokens one decode takes

    def decode(self, items: Sequence[Item]) -> None:
        """Decode each item's tokens into its slot from ``pos0`` on, in order; logits at the last token of each item
        whose ``sample`` is set (the runner samples from batch index: the running count of tokens, less one). An
        item's ``also`` slots hold its tokens too: their KV is computed once, for all of them."""

    def memory(self, op: MemOp) -> None:
        """Perform one of the scheduler's memory operations (copy, drop, save, forget, restore a sequence)."""

    def sampler(self, sampling: SamplingParams, constraint: Any, n_ctx: int, prompt: list[int]) -> Sampler:
        """A sampler for one request; ``constraint`` is what :meth:`Backend.compile` returned, or ``None``."""

    def is_end(self, token: int) -> bool:
        """True for an end-of-generation token (end of turn, end of text)."""

    def piece(self, token: int) -> bytes: ...

    def logprob(self, idx: int, token: int, top: int) -> TokenLogprob:
        """``token``'s log-probability at batch index ``idx``, with the ``top`` most likely alternatives."""


@dataclass(frozen=True)
class BatchPlan:
    """How a continuously batched model shares its memory: ``n_parallel`` running sequences; cached prompt prefixes
    of up to ``cache_budget`` tokens in spare sequences, and ``spill_budget`` tokens of those in host memory."""

    n_parallel: int
    cache_budget: int = 0
    spill_budget: int = 0


class BackendModel(Protocol):
    """One loaded model of a backend. Generation and embeddings run on one thread per model."""

    n_vocab: int
    n_ctx_train: int  # its training context (0: unknown)
    bos_text: str  # its begin- and end-of-sequence tokens as text, for chat templates ("" when it has none)
    eos_text: str
    add_bos: bool  # whether tokenizing with special tokens adds ``bos_text``
    embedding_only: bool  # an embedding model, which cannot generate
    plan: BatchPlan
    decoder: BatchDecoder | None  # with continuous batching; else None and :meth:`start` runs its own loop

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def start(self, tokens: list[int], sampling: SamplingParams, constraint: Any, emit: Emit,
              load_duration: int, n_ctx: int | None, whole: bool = False) -> Cancel:
        """Without continuous batching only: generate (queueing as the backend can) and deliver to ``emit``
        (with ``whole``, the text may come with the final record only: see
        :class:`slmops.engine.streams.TokenStream`)."""

    def embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        """L2-normalised pooled embeddings and the tokens used (only with ``capabilities.embeddings``)."""

    def close(self) -> None: ...


class Backend(Protocol):
    name: str  # for messages: "llama.cpp"
    capabilities: Capabilities

    def load(self, spec: ModelSpec, load: LoadParams, config: EngineConfig) -> BackendModel:
        """Load ``spec``'s model with ``load``'s context, accelerator (``num_gpu``) and threads; ``config`` gives
        the engine-wide batching settings (parallel sequences, queue, KV and prefix-cache budgets)."""

    def compile(self, constraint: Constraint) -> Any:
        """``constraint`` in this backend's own form, checked now (an ``InvalidInput`` names what is wrong), so a
        request fails before it reaches a model."""


# -- the backends ------------------------------------------------------------------------------------------------

# Each model format's backend: a module with ``create_backend(verbose)`` (and, for the default, ``preload()``).
BACKENDS = {"gguf": "slmops.engine.llamacpp", "onnx": "slmops.engine.onnx"}
DEFAULT = BACKENDS["gguf"]


def backend_for(fmt: str, verbose: bool | None = None) -> Backend:
    """The backend that runs models of format ``fmt``, loaded now; a missing optional engine is an error that
    names the extra to install."""
    module = BACKENDS.get(fmt)
    if module is None:
        raise Unsupported(f"{fmt} models", "slmops")
    return import_module(module).create_backend(verbose)


def default_backend(verbose: bool | None = None) -> Backend:
    """The default backend (llama.cpp), loaded now."""
    return backend_for("gguf", verbose)


def preload() -> None:
    """Load the default backend's native libraries first, as a runner process starts (before numpy)."""
    import_module(DEFAULT).preload()
