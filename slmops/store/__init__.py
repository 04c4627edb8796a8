"""Content-addressed model store in Ollama's layout, the built-in catalog and model sources.

The names below load on first use (PEP 562): the registry client and the key store import without the GGUF reader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slmops._lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
