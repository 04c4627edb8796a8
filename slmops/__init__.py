"""slmops: run small language models locally (Ollama- and OpenAI-compatible) and operate them on edge fleets.

The public names load on first use (PEP 562), so ``import slmops.fleet...`` or ``import slmops.cli.main`` does not
import the engine: the control plane installs without llama.cpp (``slmops-control``, packaging/control/).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slmops._lazy import lazy_names

if TYPE_CHECKING:
    from slmops.engine.outputs import Output, Stats
    from slmops.local import DEFAULT_MODEL, Model, Result, load, open_store, pull
    from slmops.store.store import Store
    from slmops.types.digest import Digest
    from slmops.types.errors import ModelNotFound, SlmopsError
    from slmops.types.name import ModelName

__version__ = "0.1.0"

_LAZY = {
    "DEFAULT_MODEL": "slmops.local",
    "Model": "slmops.local",
    "Result": "slmops.local",
    "load": "slmops.local",
    "open_store": "slmops.local",
    "pull": "slmops.local",
    "Output": "slmops.engine.outputs",
    "Stats": "slmops.engine.outputs",
    "Store": "slmops.store.store",
    "Digest": "slmops.types.digest",
    "ModelNotFound": "slmops.types.errors",
    "SlmopsError": "slmops.types.errors",
    "ModelName": "slmops.types.name",
}

__all__ = [
    "DEFAULT_MODEL",
    "Digest",
    "Model",
    "ModelName",
    "ModelNotFound",
    "Output",
    "Result",
    "SlmopsError",
    "Stats",
    "Store",
    "__version__",
    "load",
    "open_store",
    "pull",
]


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
