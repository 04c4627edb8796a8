"""Docker distribution v2 manifests with Ollama's layer media types, stored at
``manifests/<host>/<namespace>/<model>/<tag>``, so the store reads like an Ollama one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slmops.store.atomic import write_bytes
from slmops.types.digest import Digest
from slmops.types.errors import ModelNotFound, SlmopsError
from slmops.types.name import ModelName

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
_OLLAMA = "application/vnd.ollama.image."
MODEL = _OLLAMA + "model"
TEMPLATE = _OLLAMA + "template"
SYSTEM = _OLLAMA + "system"
PARAMS = _OLLAMA + "params"
MESSAGES = _OLLAMA + "messages"
LICENSE = _OLLAMA + "license"
ADAPTER = _OLLAMA + "adapter"
FILE = "application/vnd.slmops.model.file"  # one file of a model stored as a folder (ONNX Runtime GenAI)
TITLE = "org.opencontainers.image.title"  # a file layer's file name, as OCI tools (oras) write it
KNOWLEDGE_FILE = "application/vnd.slmops.knowledge.file"  # a Modelfile FILE's bytes, its name in TITLE
KNOWLEDGE_INDEX = "application/vnd.slmops.knowledge.index"  # chunks of those files and their embeddings


class Layer(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    media_type: str = Field(alias="mediaType")
    digest: str
    size: int = Field(ge=0)

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        Digest.parse(v)
        return v

    @property
    def blob(self) -> Digest:
        return Digest.parse(self.digest)


class Manifest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    schema_version: int = Field(2, alias="schemaVersion")
    media_type: str = Field(MANIFEST_MEDIA_TYPE, alias="mediaType")
    config: Layer
    layers: list[Layer]

    def layer(self, media_type: str) -> Layer | None:
        return next((l for l in self.layers if l.media_type == media_type), None)

    def all_layers(self) -> list[Layer]:
        return [self.config, *self.layers]

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(by_alias=True), indent=2).encode()


class ManifestStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, name: ModelName) -> Path:
        return self.root.joinpath(*name.path_parts)

    def get(self, name: ModelName) -> Manifest:
        try:
            data = self.path(name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(name.display) from None
        try:
            return Manifest.model_validate_json(data)
        except ValidationError:
            raise SlmopsError(
                f'manifest of "{name.display}" is corrupt; remove it with `slmops rm {name.display}`') from None

    def digest(self, name: ModelName) -> Digest:
        return Digest.of_bytes(self.path(name).read_bytes())

    def put(self, name: ModelName, manifest: Manifest) -> None:
        write_bytes(self.path(name), manifest.to_bytes())

    def put_bytes(self, name: ModelName, data: bytes) -> Manifest:
        """Store a manifest exactly as a registry served it, so its digest stays the registry's; it must still
        parse as a manifest, so nothing the store cannot read gets in."""
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError:
            raise SlmopsError(f'the manifest for "{name.display}" cannot be read as a model manifest; nothing was '
                              "stored") from None
        write_bytes(self.path(name), data)
        return manifest

    def delete(self, name: ModelName) -> None:
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ModelNotFound(name.display) from None
        for parent in list(path.parents)[:3]:
            try:
                parent.rmdir()
            except OSError:
                break

    def names(self) -> Iterator[ModelName]:
        if not self.root.is_dir():
            return
        for p in sorted(self.root.glob("*/*/*/*")):
            if p.is_file() and not p.name.startswith("."):
                try:
                    yield ModelName.from_path_parts(*p.relative_to(self.root).parts)
                except SlmopsError:
                    continue
