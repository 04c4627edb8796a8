"""Content-addressed model store in Ollama's layout, the built-in catalog and model sources.

The names below load on first use (PEP 562): the registry client and the key store import without the GGUF reader.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmops.store.catalog import Catalog, CatalogEntry
    from slmops.store.gguf import GGUFInfo, inspect_gguf
    from slmops.store.manifests import Layer, Manifest
    from slmops.store.store import ModelRecord, Store

_LAZY = {
    "Catalog": "slmops.store.catalog",
    "CatalogEntry": "slmops.store.catalog",
    "GGUFInfo": "slmops.store.gguf",
    "inspect_gguf": "slmops.store.gguf",
    "Layer": "slmops.store.manifests",
    "Manifest": "slmops.store.manifests",
    "ModelRecord": "slmops.store.store",
    "Store": "slmops.store.store",
}

__all__ = ["Catalog", "CatalogEntry", "GGUFInfo", "Layer", "Manifest", "ModelRecord", "Store", "inspect_gguf"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slmops.store' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
