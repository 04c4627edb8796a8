"""The HTTP server's application factory. State lives on ``app.state``; nothing here is a module global.

This is the skeleton the Ollama (/api) and OpenAI (/v1) routes grow on: the store and the engine are injected.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

import slmops
from slmops.engine.engine import Engine
from slmops.store.store import Store


def create_app(store: Store, engine: Engine) -> FastAPI:
    app = FastAPI(title="slmops", version=slmops.__version__)
    app.state.store = store
    app.state.engine = engine

    @app.get("/", response_class=PlainTextResponse)
    def root() -> str:
        return "slmops is running"

    @app.get("/api/version")
    def version() -> dict[str, str]:
        return {"version": slmops.__version__}

    @app.get("/api/tags")
    def tags() -> dict:
        models = []
        for r in store.list():
            models.append({"name": r.name.display, "model": r.name.display, "size": r.size, "digest": r.digest.hex,
                           "modified_at": r.modified_at.isoformat()})
        return {"models": models}

    @app.get("/api/ps")
    def ps() -> dict:
        return {"models": [{"name": m.spec.name, "model": m.spec.name, "size_vram": 0,
                            "context_length": m.ctx.n_ctx} for m in engine.loaded()]}

    return app
