"""A model's knowledge: the files a Modelfile names with ``FILE``, and one index of their chunks and embeddings.

Each file is a layer of media type :data:`slmops.store.manifests.KNOWLEDGE_FILE` carrying its bytes and, in the
OCI title annotation, its name; the index is one layer of :data:`slmops.store.manifests.KNOWLEDGE_INDEX`. Being
layers, they are pushed, pulled, signed and verified with the model, and a model built FROM it inherits them.

The index is JSON (readable with any tool, a few hundred KB for a few hundred pages), vectors as base64 of
little-endian float32 rows::

    {"format": 1,
     "embedding": {"model": "all-minilm:l6-v2", "digest": "sha256:<weights>", "dimension": 384},
     "chunks": [{"source": "guide.md", "page": null, "offset": 0, "section": "Setup", "text": "..."}, ...],
     "vectors": "<base64, len(chunks) x dimension float32>"}

``digest`` is the embedding model's weights layer, not its manifest: the same weights under another name or from
another registry embed the same, while other weights under the same name would not, and retrieval refuses them.
The index is read back checked (shape, finite unit vectors, sources that are files of the model), since a
pulled one came from elsewhere.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from slmops.store import manifests as mt
from slmops.store.manifests import Layer, Manifest
from slmops.types.errors import InvalidModelFile

if TYPE_CHECKING:
    import numpy as np
    from slmops.store.store import Store

FORMAT = 1
MAX_INDEX_BYTES = 256 << 20


@dataclass(frozen=True)
class Chunk:
    """A piece of a knowledge file. ``page``: 1-based PDF page (None for text); ``offset``: its first character
    in the page's (or file's) text; ``section``: the Markdown heading it falls under ("" when none)."""

    source: str
    page: int | None
    offset: int
    section: str
    text: str

    @property
    def label(self) -> str:
        """How answers and prompts name the chunk: the file, and the page of a PDF."""
        return f"{self.source} p.{self.page}" if self.page else self.source


@dataclass(frozen=True)
class EmbeddingModel:
    """Which model embedded an index: the name it was asked by, its weights' digest and its vectors' length."""

    model: str
    digest: str
    dimension: int


@dataclass(frozen=True)
class KnowledgeIndex:
    embedding: EmbeddingModel
    chunks: tuple[Chunk, ...]
    vectors: np.ndarray  # (len(chunks), dimension) float32, rows L2-normalised

    @classmethod
    def build(cls, embedding: EmbeddingModel, chunks: list[Chunk], vectors: list[list[float]]) -> "KnowledgeIndex":
        import numpy as np  # not at import: the server imports this module, and most models have no index

        array = np.asarray(vectors, dtype=np.float32).reshape(len(chunks), -1) if chunks else \
            np.zeros((0, embedding.dimension), np.float32)
        if array.shape[1] != embedding.dimension:
            raise InvalidModelFile(f"the embedding model gave {array.shape[1]} dimensions, expected "
                                   f"{embedding.dimension}")
        return cls(embedding, tuple(chunks), _normalised(array))

    def search(self, query: list[float], k: int) -> list[tuple[int, float]]:
        """The ``k`` chunks nearest ``query`` by cosine: (chunk number, score), best first."""
        import numpy as np

        q = np.asarray(query, dtype=np.float32)
        if q.shape != (self.embedding.dimension,):
            raise InvalidModelFile(f"the query embedding has {q.size} dimensions, the knowledge index "
                                   f"{self.embedding.dimension}; the embedding model changed")
        n = float(np.linalg.norm(q))
        scores = self.vectors @ (q / n if n else q)
        best = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in best]

    def without(self, sources: set[str]) -> "KnowledgeIndex":
        keep = [i for i, c in enumerate(self.chunks) if c.source not in sources]
        return KnowledgeIndex(self.embedding, tuple(self.chunks[i] for i in keep), self.vectors[keep])

    def plus(self, other: "KnowledgeIndex") -> "KnowledgeIndex":
        import numpy as np

        return KnowledgeIndex(self.embedding, self.chunks + other.chunks, np.vstack([self.vectors, other.vectors]))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.chunks:
            out[c.source] = out.get(c.source, 0) + 1
        return out

    def to_bytes(self) -> bytes:
        body = {"format": FORMAT, "embedding": asdict(self.embedding), "chunks": [asdict(c) for c in self.chunks],
                "vectors": base64.b64encode(self.vectors.astype("<f4").tobytes()).decode()}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> "KnowledgeIndex":
        bad = f"the knowledge index of {what} is damaged or of another format"
        import numpy as np

        if len(data) > MAX_INDEX_BYTES:
            raise InvalidModelFile(f"the knowledge index of {what} is over {MAX_INDEX_BYTES} bytes")
        try:
            body = json.loads(data)
            if body.get("format") != FORMAT:
                raise InvalidModelFile(f"the knowledge index of {what} has format {body.get('format')!r}; this "
                                       f"slmops reads format {FORMAT}")
            e = body["embedding"]
            embedding = EmbeddingModel(str(e["model"]), str(e["digest"]), int(e["dimension"]))
            chunks = tuple(_chunk(c) for c in body["chunks"])
            raw = base64.b64decode(body["vectors"], validate=True)
            vectors = np.frombuffer(raw, dtype="<f4").astype(np.float32)
            vectors = vectors.reshape(len(chunks), embedding.dimension)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidModelFile(bad) from None
        if embedding.dimension < 1 or not np.isfinite(vectors).all():
            raise InvalidModelFile(bad)
        return cls(embedding, chunks, _normalised(vectors))


def _chunk(c: dict[str, Any]) -> Chunk:
    page = c.get("page")
    if page is not None and (not isinstance(page, int) or page < 1):
        raise ValueError("page")
    if not all(isinstance(c.get(k), str) for k in ("source", "section", "text")) or not isinstance(c["offset"], int):
        raise ValueError("chunk")
    return Chunk(c["source"], page, c["offset"], c["section"], c["text"])


def _normalised(a: np.ndarray) -> np.ndarray:
    import numpy as np

    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return (a / np.where(norms == 0, 1, norms)).astype(np.float32)


def file_title(layer: Layer | Any) -> str:
    annotations = getattr(layer, "annotations", None) or {}
    return str(annotations.get(mt.TITLE, ""))


def file_layers(manifest: Manifest) -> list[Layer]:
    return [l for l in manifest.layers if l.media_type == mt.KNOWLEDGE_FILE]


def index_layer(manifest: Manifest) -> Layer | None:
    return manifest.layer(mt.KNOWLEDGE_INDEX)


def has_knowledge(manifest: Manifest) -> bool:
    return index_layer(manifest) is not None


def read_index(store: "Store", manifest: Manifest, what: str) -> KnowledgeIndex | None:
    """The model's index, checked against its file layers (every chunk's source is one of them)."""
    layer = index_layer(manifest)
    if layer is None:
        return None
    index = KnowledgeIndex.from_bytes(store.blobs.read_bytes(layer.blob), what)
    names = {file_title(l) for l in file_layers(manifest)}
    stray = {c.source for c in index.chunks} - names
    if stray:
        raise InvalidModelFile(f"the knowledge index of {what} names {sorted(stray)[0]}, which is not one of its "
                               "files")
    return index


@dataclass(frozen=True)
class KnowledgeFile:
    """What ``show --files`` lists."""

    name: str
    size: int
    chunks: int
    digest: str


def list_files(store: "Store", manifest: Manifest, what: str) -> list[KnowledgeFile]:
    index = read_index(store, manifest, what)
    counts = index.counts() if index is not None else {}
    return [KnowledgeFile(file_title(l), l.size, counts.get(file_title(l), 0), l.digest)
            for l in file_layers(manifest)]


def file_layer(store: "Store", name: str, data: bytes) -> Layer:
    digest, size = store.blobs.put_bytes(data)
    return Layer(mediaType=mt.KNOWLEDGE_FILE, digest=str(digest), size=size, annotations={mt.TITLE: name})


def index_layer_of(store: "Store", index: KnowledgeIndex) -> Layer:
    digest, size = store.blobs.put_bytes(index.to_bytes())
    return Layer(mediaType=mt.KNOWLEDGE_INDEX, digest=str(digest), size=size)


__all__ = ["Chunk", "EmbeddingModel", "KnowledgeFile", "KnowledgeIndex", "file_layer", "file_layers",
           "has_knowledge", "index_layer", "index_layer_of", "list_files", "read_index"]
