"""slmops: run small language models locally (Ollama- and OpenAI-compatible) and operate them on edge fleets."""

from slmops.local import DEFAULT_MODEL, Model, Result, load, open_store, pull
from slmops.engine.outputs import Output, Stats
from slmops.store.store import Store
from slmops.types.digest import Digest
from slmops.types.errors import ModelNotFound, SlmopsError
from slmops.types.name import ModelName

__version__ = "0.1.0"

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
