"""The in-process Python API: pull a model, load it, generate and chat without a server.

    >>> import slmops
    >>> model = slmops.load("smollm2:135m")          # pulls on first use
    >>> model.generate("Why is the sky blue?", options={"num_predict": 32}).text
    >>> for piece in model.chat([{"role": "user", "content": "Hi"}], stream=True):
    ...     print(piece.text, end="")
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from slmops import wiring
from slmops.config.settings import Settings
from slmops.engine.client import Request, spec_from_store
from slmops.engine.outputs import Output, Stats
from slmops.store.store import ProgressFn, Store, _no_progress
from slmops.types.errors import ModelNotFound
from slmops.types.name import ModelName

if TYPE_CHECKING:
    from slmops.engine.engine import Engine

DEFAULT_MODEL = "smollm2:135m"


@dataclass(frozen=True)
class Result:
    text: str
    done_reason: str
    stats: Stats


def open_store(home: str | Path | None = None, settings: Settings | None = None) -> Store:
    """The store under ``home`` (default: ``SLMOPS_HOME``, else ``~/.slmops``), with the registry, signature and
    encryption policies of the settings (``SLMOPS_ALLOW_PRIVATE_REGISTRIES``, ``SLMOPS_TRUSTED_KEYS``,
    ``SLMOPS_STORE_KEY``); without ``settings``, those of the environment (and ``SLMOPS_CONFIG``)."""
    return wiring.open_store(settings or wiring.read_settings(), home)


def pull(name: str = DEFAULT_MODEL, home: str | Path | None = None, progress: ProgressFn = _no_progress) -> None:
    open_store(home).pull(ModelName.parse(name), progress)


class Model:
    """A model loaded in this process; concurrent calls from several threads are batched together."""

    def __init__(self, store: Store, name: ModelName, engine: "Engine"):
        self.name = name
        self._engine = engine
        self._spec = spec_from_store(store, name)
        self._loaded, _ = engine.load_model(self._spec)

    def generate(self, prompt: str, *, system: str | None = None, raw: bool = False,
                 options: dict[str, Any] | None = None, stream: bool = False) -> Result | Iterator[Output]:
        it = self._engine.run(self._spec, Request(prompt=prompt, system=system, raw=raw, options=options))
        return it if stream else _collect(it)

    def chat(self, messages: list[dict[str, Any]], *, options: dict[str, Any] | None = None,
             stream: bool = False) -> Result | Iterator[Output]:
        it = self._engine.run(self._spec, Request(messages=messages, options=options))
        return it if stream else _collect(it)

    def tokenize(self, text: str) -> list[int]:
        return self._loaded.tokenize(text, special=False)

    def detokenize(self, tokens: list[int]) -> str:
        return self._loaded.detokenize(tokens)

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(name: str = DEFAULT_MODEL, *, home: str | Path | None = None, pull_missing: bool = True,
         num_ctx: int | None = None, num_thread: int | None = None) -> Model:
    """``num_ctx`` and ``num_thread`` default to ``SLMOPS_CONTEXT_LENGTH`` and ``SLMOPS_NUM_THREADS``."""
    from slmops.engine.engine import Engine  # llama.cpp loads here, not when slmops is imported

    cfg = wiring.read_settings()
    config = wiring.engine_config(cfg, placed=None)
    config = replace(config, max_loaded=1, default_ctx=num_ctx or config.default_ctx,
                     num_thread=config.num_thread if num_thread is None else num_thread)
    store = open_store(home, cfg)
    model_name = ModelName.parse(name)
    if not store.exists(model_name):
        if not (pull_missing and store.catalog.lookup(model_name)):
            raise ModelNotFound(model_name.display)
        store.pull(model_name)
    return Model(store, model_name, Engine(config))


def _collect(it: Iterator[Output]) -> Result:
    from slmops.engine.answers import collect  # imports jinja2, which the control-plane install lacks

    answer = collect(it)
    return Result(answer.text, answer.done_reason or "stop", answer.stats)  # type: ignore[arg-type]
