"""The built-in catalog: model names mapped to sources with pinned digests, read from ``catalog.json``.

The catalog is data so that adding a model is a reviewed one-line change, not code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from slmops.store.variants import Variant
from slmops.types.digest import Digest
from slmops.types.name import ModelName


@dataclass(frozen=True)
class CatalogEntry:
    name: ModelName
    digest: Digest
    size: int | None
    source: dict[str, Any]
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    variants: list[Variant] = field(default_factory=list)  # best first per accelerator; empty: the file only


class Catalog:
    def __init__(self, data: dict[str, Any]):
        self._entries: dict[ModelName, CatalogEntry] = {}
        for key, e in data.get("models", {}).items():
            name = ModelName.parse(key)
            self._entries[name] = CatalogEntry(
                name=name,
                digest=Digest.parse(e["digest"]),
                size=e.get("size"),
                source=dict(e["source"]),
                description=e.get("description", ""),
                params=dict(e.get("params", {})),
                template=e.get("template"),
                system=e.get("system"),
                variants=[Variant.parse(n, v) for n, v in e.get("variants", {}).items()],
            )
        self._aliases = {ModelName.parse(a): ModelName.parse(t) for a, t in data.get("aliases", {}).items()}

    @classmethod
    def builtin(cls) -> "Catalog":
        return cls(json.loads(resources.files("slmops.store").joinpath("catalog.json").read_text()))

    def lookup(self, name: ModelName) -> CatalogEntry | None:
        return self._entries.get(self._aliases.get(name, name))

    def entries(self) -> list[CatalogEntry]:
        return list(self._entries.values())
