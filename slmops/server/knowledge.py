"""Retrieval at chat time, for models built with knowledge files (``FILE``).

The last user message (a generate's prompt) is embedded with the model the index was built with, the
:data:`TOP_K` nearest chunks by cosine are taken, and they are given to the model in its system message, each
with its source's name, after the system text it would have had anyway. One system message rather than a second
one, because many chat templates (and small models) read only the first. The answer names the chunks used: a
``knowledge`` list in Ollama's last response object, the :data:`HEADER` header on ``/v1``.

Always the top k, without a score threshold: cosine scores of different embedding models are not comparable, and
for a model built on its documents, a weak excerpt costs tokens while a missing one costs the answer.

The index is parsed once per digest and kept (a few, least recently used first out); the manifest is read per
request, so a model re-created under the same name answers from its new knowledge at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from fastapi import Response

from slmops.api import ollama as oa
from slmops.engine.client import ModelSpec, Request, spec_from_store
from slmops.server.inference import Inference
from slmops.store import knowledge as ks
from slmops.store import manifests as mt
from slmops.store.store import Store
from slmops.types.errors import IntegrityError, NotFound
from slmops.types.name import ModelName

TOP_K = 3
HEADER = "X-Slmops-Knowledge"
CACHED_INDEXES = 8
INTRO = ("Answer from the excerpts below when they are relevant; each names its source. "
         "If they do not hold the answer, say so.")


@dataclass(frozen=True)
class Used:
    """One retrieved chunk: its number among its file's chunks (from 0), and its cosine score."""

    chunk: ks.Chunk
    number: int
    score: float


@dataclass(frozen=True)
class Retrieval:
    used: tuple[Used, ...]
    embed_ns: int  # embedding the query and searching, for the cost the README states

    def system_text(self, system: str | None) -> str:
        parts = [system.rstrip()] if system and system.strip() else []
        parts.append(INTRO)
        for i, u in enumerate(self.used, 1):
            title = u.chunk.label + (f" — {u.chunk.section}" if u.chunk.section else "")
            parts.append(f"[{i}] {title}\n{u.chunk.text}")
        return "\n\n".join(parts)

    def metadata(self) -> list[oa.KnowledgeChunk]:
        return [oa.KnowledgeChunk(source=u.chunk.source, chunk=u.number, page=u.chunk.page,
                                  section=u.chunk.section or None, score=round(u.score, 4)) for u in self.used]

    def header(self) -> str:
        """``source#chunk`` per chunk, comma-separated, names percent-encoded (headers are ASCII)."""
        return ", ".join(f"{quote(u.chunk.source, safe='')}#{u.number}" for u in self.used)


class Knowledge:
    """The server's retrieval: indexes by digest, embeddings through the server's own :class:`Inference`."""

    def __init__(self, store: Store, inference: Inference, k: int = TOP_K):
        self.store = store
        self.inference = inference
        self.k = k
        self._indexes: OrderedDict[str, ks.KnowledgeIndex] = OrderedDict()

    def index(self, name: ModelName) -> ks.KnowledgeIndex | None:
        manifest = self.store.manifest(name)
        layer = ks.index_layer(manifest)
        if layer is None:
            return None
        index = self._indexes.get(layer.digest)
        if index is None:
            index = ks.read_index(self.store, manifest, f'"{name.display}"')
            assert index is not None
            self._indexes[layer.digest] = index
            while len(self._indexes) > CACHED_INDEXES:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(layer.digest)
        return index

    def _embedder(self, index: ks.KnowledgeIndex, model: str) -> ModelSpec:
        """The embedding model's spec, refused unless its weights are the ones the index was built with."""
        name = ModelName.parse(index.embedding.model)
        if not self.store.exists(name):
            raise NotFound(f'the knowledge of {model} was embedded with "{name.display}", which is not in the store; '
                           f"pull it (slmops pull {name.display})")
        weights = self.store.manifest(name).layer(mt.MODEL)
        if weights is None or weights.digest != index.embedding.digest:
            raise IntegrityError(f"the knowledge of {model} was embedded with {name.display} "
                                 f"{index.embedding.digest}, but the store's {name.display} is other weights; "
                                 f"pull the one it was built with or create {model} again")
        return spec_from_store(self.store, name)

    async def retrieve(self, name: ModelName, query: str | None, keep_alive: float) -> Retrieval | None:
        """The chunks for ``query``; None when the model has no knowledge or there is nothing to ask."""
        if not query or not query.strip():
            return None
        index = await asyncio.to_thread(self.index, name)
        if index is None or not index.chunks:
            return None
        t0 = time.perf_counter_ns()
        spec = await asyncio.to_thread(self._embedder, index, name.display)
        vectors, _, _ = await self.inference.embed(spec, [query], None, True, keep_alive)
        best = index.search(vectors[0], self.k)
        numbers = _numbers(index)
        used = tuple(Used(index.chunks[i], numbers[i], score) for i, score in best)
        return Retrieval(used, time.perf_counter_ns() - t0)


def _numbers(index: ks.KnowledgeIndex) -> list[int]:
    seen: dict[str, int] = {}
    out = []
    for c in index.chunks:
        out.append(seen.get(c.source, 0))
        seen[c.source] = out[-1] + 1
    return out


def last_user_text(messages: list[dict[str, Any]] | None) -> str | None:
    for m in reversed(messages or []):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return None


def query_of(req: Request) -> str | None:
    """What to look up: the last user message of a chat, a generate's prompt; nothing for raw prompts."""
    if req.messages is not None:
        return last_user_text(req.messages)
    return None if req.raw else req.prompt


def augment(req: Request, spec: ModelSpec, found: Retrieval | None) -> Request:
    """``req`` with the chunks in its system message: the conversation's first system message if it has one,
    else the model's SYSTEM, which the engine would have used."""
    if found is None or not found.used:
        return req
    if req.messages is None:
        return replace(req, system=found.system_text(req.system if req.system is not None else spec.system))
    messages = [dict(m) for m in req.messages]
    first = next((i for i, m in enumerate(messages) if m.get("role") == "system"), None)
    if first is not None:
        messages[first]["content"] = found.system_text(messages[first].get("content") or "")
    else:
        messages.insert(0, {"role": "system", "content": found.system_text(spec.system)})
    return replace(req, messages=messages)


async def look_up(state: Any, name: ModelName, spec: ModelSpec, req: Request, keep_alive: float,
                  response: Response) -> tuple[Request, Retrieval | None]:
    """``req`` with the chunks of the model's knowledge it asks about, and what was found (None when the model
    has none). Their names also go in the :data:`HEADER` header of ``response``: Ollama's and OpenAI's clients
    drop fields they do not know."""
    found = await of(state).retrieve(name, query_of(req), keep_alive)
    if found is not None:
        response.headers[HEADER] = found.header()
    return augment(req, spec, found), found


def headed(streamed: Response, response: Response) -> Response:
    """A streamed answer carries the header set on ``response`` (FastAPI applies it to returned values only)."""
    if HEADER in response.headers:
        streamed.headers[HEADER] = response.headers[HEADER]
    return streamed


def of(state: Any) -> Knowledge:
    """The server's :class:`Knowledge`, made on first use from the store and inference the server holds."""
    found = getattr(state, "knowledge", None)
    if found is None:
        found = state.knowledge = Knowledge(state.store, state.runtime.inference)
    return found


__all__ = ["HEADER", "Knowledge", "Retrieval", "TOP_K", "Used", "augment", "headed", "last_user_text", "look_up", "of",
           "query_of"]
