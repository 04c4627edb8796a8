"""Content-addressed model store in Ollama's layout, the built-in catalog and model sources."""

from slmops.store.catalog import Catalog, CatalogEntry
from slmops.store.gguf import GGUFInfo, inspect_gguf
from slmops.store.manifests import Layer, Manifest
from slmops.store.store import ModelRecord, Store

__all__ = ["Catalog", "CatalogEntry", "GGUFInfo", "Layer", "Manifest", "ModelRecord", "Store", "inspect_gguf"]
