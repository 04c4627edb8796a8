"""The ``EngineClient`` protocol the server and CLI program against, and the plain values that cross it.

Two implementations: :class:`slmops.engine.engine.Engine` runs models in this process (CLI, Python API, tests of
the engine), :class:`slmops.engine.process.ProcessEngine` runs each model in its own runner process (the
server), so a native crash in llama.cpp fails only that model's requests. Everything here is a plain dataclass:
it must cross a pipe, and importing it must not load llama.cpp.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, TypeVar

from slmops.config.settings import default
from slmops.engine.outputs import Output
from slmops.types.errors import EngineError
from slmops.types.options import LoadParams
from slmops.types.name import ModelName

if TYPE_CHECKING:  # a runner process never opens the store: importing it there cost a third of its start
    from slmops.store.store import Store

T = TypeVar("T")


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
    unseal_key: bytes | None = field(default=None, repr=False)  # opens sealed blobs (encryption at rest)
    format: str = "gguf"  # "gguf": model_path is the weights; "onnx": an ONNX Runtime GenAI model made of ``files``
    files: dict[str, Path] = field(default_factory=dict)  # file name -> blob, for a model stored as several files


def spec_from_store(store: "Store", name: ModelName) -> ModelSpec:
    """What the engine needs to run ``name``, after checking every blob against its digest (one read of the
    manifest: :meth:`Store.runnable`)."""
    model = store.runnable(name)
    return ModelSpec(
        name=name.display,
        model_path=model.model_path,
        template=model.template,
        system=model.system,
        params=model.params,
        messages=model.messages,
        adapters=model.adapters,
        gguf_cache=store.gguf_cache,
        context_length=model.info.context_length,
        unseal_key=store.blobs.key,
        format=model.format,
        files=model.files,
    )


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
    # False: only the whole answer is wanted, and the engine delivers its text with the final record. A piece per
    # token costs the server ~0.3 ms of CPU each (taken from the decode on a small machine) for a reply that waits
    # for the last one anyway.
    stream: bool = True


_LOAD = LoadParams(num_ctx=0)  # read for a context's own defaults: batch, threads, GPU layers, KV type


@dataclass
class EngineConfig:
    """Engine-wide settings, read from ``SLMOPS_*`` at the edge (:mod:`slmops.wiring`) and handed to every runner.

    The defaults are defined elsewhere, once: the ``SLMOPS_*`` table's for what a setting names, ``LoadParams``'
    for how a context is built (placement's choices replace those in the server and the CLI)."""

    default_ctx: int = default("SLMOPS_CONTEXT_LENGTH")
    num_thread: int = _LOAD.num_thread
    max_loaded: int = 1  # a Python API model's engine holds it alone; the server's: SLMOPS_MAX_LOADED_MODELS
    verbose: bool = default("SLMOPS_DEBUG")
    num_parallel: int = default("SLMOPS_NUM_PARALLEL")  # 0: chosen from the memory this machine has free
    max_queue: int = default("SLMOPS_MAX_QUEUE")
    num_batch: int = _LOAD.num_batch
    num_gpu: int = _LOAD.num_gpu  # layers to offload to a GPU (placement: all of them when one fits)
    kv_type: str = _LOAD.kv_type
    kv_budget: int = default("SLMOPS_KV_BUDGET")  # KV memory parallel sequences may take when chosen automatically
    prefix_cache: int = default("SLMOPS_PREFIX_CACHE")  # host memory for cached prefixes the KV cache evicts (0: none)
    onnx_providers: tuple[str, ...] = default("SLMOPS_ONNX_PROVIDERS")  # ONNX Runtime's providers to try; (): auto

    def load_defaults(self) -> LoadParams:
        return LoadParams(num_ctx=self.default_ctx, num_batch=self.num_batch, num_thread=self.num_thread,
                          num_gpu=self.num_gpu, kv_type=self.kv_type)


@dataclass
class ModelStatus:
    """A loaded model as ``/api/ps`` and ``/metrics`` see it."""

    name: str
    spec: ModelSpec
    num_ctx: int
    n_parallel: int
    waiting: int = 0
    max_batch: int = 0  # most sequences decoded in one step so far
    pid: int = 0  # the runner process; 0 when the model runs in this process
    fallback: str | None = None  # why it runs on the CPU though a GPU was asked for (None: as asked)


class EngineClient(Protocol):
    config: EngineConfig

    def load(self, spec: ModelSpec, options: dict[str, Any] | None = None) -> int:
        """Load (or reload for new context settings) and return the load time in ns, 0 if already loaded."""

    def run(self, spec: ModelSpec, req: Request) -> Iterator[Output]:
        """Stream a completion; closing the iterator cancels it. Request errors surface at the first ``next()``."""

    def start(self, spec: ModelSpec, req: Request, emit: Emit) -> Cancel:
        """Begin a completion whose pieces, then a final ``Output`` or an exception, go to ``emit`` (on an engine
        thread, as they are produced); returns the function that cancels it. May block to load the model.
        A ``ModelUnloaded`` (raised or emitted) before the first piece means: start it again."""

    def embed(self, spec: ModelSpec, inputs: list[str], options: dict[str, Any] | None = None,
              truncate: bool = True) -> tuple[list[list[float]], int, int]:
        """(L2-normalised vectors, tokens used, load time in ns)."""

    def tokenize(self, spec: ModelSpec, text: str) -> list[int]:
        """Tokens of ``text`` as the model reads it (special tokens parsed, no BOS added)."""

    def detokenize(self, spec: ModelSpec, tokens: list[int]) -> str: ...

    def loaded(self) -> list[ModelStatus]: ...

    def unload(self, name: str) -> bool:
        """Free the model once its running requests finish; False if it was not loaded."""

    def close(self) -> None: ...

    def prestart(self, spec: ModelSpec | None = None) -> None:
        """Get ready for a first model before any request asks for one (a server starting); ``spec``: the model
        it will load at start, which may begin loading now."""


Emit = Callable[[object], None]  # receives Output pieces, then a final Output or an exception
Cancel = Callable[[], None]


def stream_from(start: Callable[[Emit], Cancel]) -> Iterator[Output]:
    """A blocking iterator over a generation that delivers through a callback; closing it cancels."""
    inbox: queue.Queue = queue.Queue()
    cancel = start(inbox.put)
    done = False
    try:
        while not done:
            item = inbox.get()
            if isinstance(item, BaseException):
                done = True
                raise item
            done = item.done
            yield item
    finally:
        if not done:
            cancel()


def unloaded(name: str, started: bool) -> None:
    """The retry policy for a model unloaded under a request (evicted, reloaded, its runner shutting down):
    before the first piece, start again; after it, fail (a retry would repeat pieces already sent)."""
    if started:
        raise EngineError(f'model "{name}" was unloaded during generation; try again') from None


def gave_up(name: str) -> EngineError:
    return EngineError(f'model "{name}" was unloaded repeatedly while waiting; try again')


def until_loaded(name: str, attempt: Callable[[], Iterator[Output]], tries: int = 3) -> Iterator[Output]:
    """Run a generation under the ``unloaded`` policy."""
    for _ in range(tries):
        started = False
        try:
            for out in attempt():
                started = True
                yield out
            return
        except ModelUnloaded:
            unloaded(name, started)
    raise gave_up(name)


def until_loaded_call(name: str, attempt: Callable[[], T], tries: int = 3) -> T:
    """``until_loaded`` for a call with one result (load, embed, tokenize)."""
    for _ in range(tries):
        try:
            return attempt()
        except ModelUnloaded:
            continue
    raise gave_up(name)
