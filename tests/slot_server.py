"""The real local server app (``slmops serve``'s) on a loopback port, with a fake engine: for tests of the slot
table and of the edge agent that need real HTTP and streaming but no model. Stored models are tiny GGUFs (valid
files that no engine runs)."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from conftest import free_port
from slmops.engine.client import EngineConfig, ModelSpec, ModelStatus
from slmops.engine.outputs import Output, Stats
from slmops.security.keys import KeyStore
from slmops.server.access import AccessPolicy
from slmops.server.app import ServerConfig, create_app
from slmops.server.runtime import ModelRuntime
from slmops.store.store import Store
from slmops.types.errors import EngineError
from slmops.types.name import ModelName


class FakeEngine:
    """An EngineClient that answers ``[<model>]`` then `` done``; ``hold[model]`` keeps a generation between its two
    pieces until set; models in ``broken`` fail to load; ``failing[model]`` is raised by each generation."""

    def __init__(self) -> None:
        self.config = EngineConfig()
        self.hold: dict[str, threading.Event] = {}
        self.broken: set[str] = set()
        self.failing: dict[str, Exception] = {}
        self._loaded: dict[str, ModelSpec] = {}

    def load(self, spec: ModelSpec, options: dict[str, Any] | None = None) -> int:
        if spec.name in self.broken:
            raise EngineError(f"cannot load {spec.name}")
        self._loaded[spec.name] = spec
        return 1

    def start(self, spec: ModelSpec, req: Any, emit: Any) -> Any:
        self.load(spec)
        if spec.name in self.failing:
            raise self.failing[spec.name]

        def produce() -> None:
            emit(Output(text=f"[{spec.name}]", eval_count=1))
            gate = self.hold.get(spec.name)
            if gate is not None:
                gate.wait(30)
            emit(Output(text=" done", done=True, done_reason="stop",
                        stats=Stats(1, 1_000_000, 2, 30_000_000, 0, 40_000_000)))
        threading.Thread(target=produce, daemon=True).start()
        return lambda: None

    def loaded(self) -> list[ModelStatus]:
        return [ModelStatus(name, spec, 2048, 1) for name, spec in list(self._loaded.items())]

    def unload(self, name: str) -> bool:
        return self._loaded.pop(name, None) is not None

    def close(self) -> None:
        pass


def stored(home: Path, gguf: bytes, *names: str, **kw: Any) -> Store:
    """A store under ``home`` holding ``gguf`` as each of ``names``."""
    store = Store(home / "models", **kw)
    for name in names:
        with store.writing():
            layer, info = store.import_gguf(lambda: _bytes(gguf), name, None, lambda *a: None, len(gguf))
            store.write_manifest(ModelName.parse(name), [layer], store.config_layer(info, [layer]))
    return store


def _bytes(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


@contextlib.contextmanager
def serving(store: Store, engine: FakeEngine, keys: KeyStore | None = None) -> Iterator[str]:
    """The real app on a free loopback port (uvicorn in a thread), with the access layer (auth off unless
    ``keys`` has keys), until the block ends."""
    runtime = ModelRuntime(store, engine, keep_alive=300)  # type: ignore[arg-type]
    policy = AccessPolicy(keys or KeyStore(store.root.parent / "keys.json"))
    app = create_app(store, runtime, ServerConfig(), access=policy)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            thread.join(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def tiny_models(folder: Path, count: int) -> list[bytes]:
    """``count`` distinct tiny GGUFs (different weights, so different digests)."""
    from registry import tiny_gguf

    folder.mkdir(parents=True, exist_ok=True)
    return [tiny_gguf(folder / f"tiny{i}.gguf", seed=i) for i in range(count)]
