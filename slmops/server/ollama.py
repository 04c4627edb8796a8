"""Ollama's native API (``/api/*``). Routes stay thin: parse the wire type, convert, call the runtime or store,
convert back. Error bodies and statuses come from the one table in :mod:`slmops.server.errors`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool
from fastapi import APIRouter, Request
from fastapi.responses import Response

import slmops
from slmops.api import ollama as oa
from slmops.engine import answers
from slmops.engine.tools import TOOLS_NOTE, template_handles_tools
from slmops.modelfile import build, render
from slmops.modelfile.parser import Modelfile, parse
from slmops.security import roles
from slmops.server import access, convert, knowledge, streaming
from slmops.server.runtime import ModelRuntime
from slmops.store import knowledge as ks
from slmops.store.pushing import push_to_registry
from slmops.store.registry_auth import CREDENTIALS_FILE, RegistryConfig, read_logins
from slmops.store.store import Store
from slmops.types import options as opts
from slmops.types.digest import Digest
from slmops.types.errors import IntegrityError, InvalidInput, NotFound, SlmopsError, TooLarge
from slmops.types.name import ModelName, Reference

router = APIRouter()
_END = object()


def _rt(request: Request) -> ModelRuntime:
    return request.app.state.runtime


def _store(request: Request) -> Store:
    return request.app.state.store


# -- inference ------------------------------------------------------------------------------------------------
def _target(request: Request, model: str, keep_alive: Any):
    """The runtime, the named model's spec (404 if absent) and the request's keep-alive in seconds."""
    rt, _, spec, keep = _targeted(request, model, keep_alive)
    return rt, spec, keep


def _targeted(request: Request, model: str, keep_alive: Any):
    """As :func:`_target`, with the stored model's name (whose knowledge a chat or generate looks up)."""
    rt = _rt(request)
    name, spec = rt.resolver.resolve(model)
    return rt, name, spec, rt.admission.keep_alive_for(keep_alive)


async def _with_knowledge(request: Request, response: Response, name: ModelName, spec, req, keep: float):
    """``req`` with the chunks of the model's knowledge it asks about, and their names for the answer (None
    when the model has none), also in the :data:`knowledge.HEADER` header: Ollama's clients drop fields they
    do not know."""
    req, found = await knowledge.look_up(request.app.state, name, spec, req, keep, response)
    return req, (found.metadata() if found else None)


async def _load_only(rt: ModelRuntime, model: str, spec, keep: float, key: str) -> dict:
    access.require(roles.MANAGE, "load or unload models explicitly")
    if keep == 0:
        await rt.models.unload(spec.name)
        reason = "unload"
    else:
        await rt.models.call(spec, rt.engine.load, keep)
        reason = "load"
    out: dict[str, Any] = {"model": model, "created_at": convert.now_iso(), "done": True, "done_reason": reason}
    out[key] = {"role": "assistant", "content": ""} if key == "message" else ""
    return out


@router.post("/api/generate")
@streaming.stops_when_gone
async def generate(body: oa.GenerateRequest, request: Request, response: Response):
    rt, name, spec, keep = _targeted(request, body.model, body.keep_alive)
    if not body.prompt and not body.context:
        return await _load_only(rt, body.model, spec, keep, "response")
    req, used = await _with_knowledge(request, response, name, spec, convert.from_generate(body), keep)
    outputs = await streaming.prime(rt.inference.stream(spec, req, keep))
    if body.stream:
        return knowledge.headed(streaming.ndjson(streaming.amap(
            lambda o: convert.generate_chunk(body.model, o, knowledge=used), outputs)), response)
    return convert.generate_chunk(body.model, await answers.acollect(outputs), knowledge=used)


@router.post("/api/chat")
@streaming.stops_when_gone
async def chat(body: oa.ChatRequest, request: Request, response: Response):
    rt, name, spec, keep = _targeted(request, body.model, body.keep_alive)
    if not body.messages:
        return await _load_only(rt, body.model, spec, keep, "message")
    req, used = await _with_knowledge(request, response, name, spec, convert.from_chat(body), keep)
    outputs = await streaming.prime(answers.split_calls(rt.inference.stream(spec, req, keep), req))
    if body.stream:
        return knowledge.headed(streaming.ndjson(_chat_lines(body.model, outputs, used)), response)
    return convert.chat_chunk(body.model, await answers.acollect(outputs), used)


async def _chat_lines(model: str, outputs: AsyncIterator, used=None) -> AsyncIterator[dict]:
    """Ollama's streamed chat: content as it comes; a tool call in its own line once it is whole. A piece
    whose text is all held back (it may be the start of a call) makes no line."""
    async for out in outputs:
        if out.text or out.tool_calls or out.done:
            yield convert.chat_chunk(model, out, used)


@router.post("/api/embed")
async def embed(body: oa.EmbedRequest, request: Request):
    rt, spec, keep = _target(request, body.model, body.keep_alive)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs:
        access.require(roles.MANAGE, "load models explicitly")
        await rt.models.call(spec, rt.engine.load, keep)
        return oa.EmbedResponse(model=body.model, embeddings=[], total_duration=0, load_duration=0,
                                prompt_eval_count=0)
    t0 = time.perf_counter_ns()
    vectors, used, load_ns = await rt.inference.embed(spec, inputs, body.options, body.truncate, keep)
    vectors = convert.truncate_dimensions(vectors, body.dimensions)
    return oa.EmbedResponse(model=body.model, embeddings=vectors, total_duration=time.perf_counter_ns() - t0,
                            load_duration=load_ns, prompt_eval_count=used)


@router.post("/api/embeddings")
async def embeddings(body: oa.EmbeddingsRequest, request: Request):
    rt, spec, keep = _target(request, body.model, body.keep_alive)
    if not body.prompt:
        access.require(roles.MANAGE, "load models explicitly")
        await rt.models.call(spec, rt.engine.load, keep)
        return oa.EmbeddingsResponse(embedding=[])
    vectors, _, _ = await rt.inference.embed(spec, [body.prompt], body.options, True, keep)
    return oa.EmbeddingsResponse(embedding=vectors[0])


@router.post("/api/tokenize")
async def tokenize(body: oa.TokenizeRequest, request: Request):
    rt, spec, keep = _target(request, body.model, body.keep_alive)
    tokens = await rt.models.call(spec, rt.engine.tokenize, keep, body.text)
    return oa.TokenizeResponse(model=body.model, tokens=tokens)


@router.post("/api/detokenize")
async def detokenize(body: oa.DetokenizeRequest, request: Request):
    rt, spec, keep = _target(request, body.model, body.keep_alive)
    text = await rt.models.call(spec, rt.engine.detokenize, keep, body.tokens)
    return oa.DetokenizeResponse(model=body.model, text=text)


# -- models ---------------------------------------------------------------------------------------------------
def details(store: Store, name: ModelName) -> oa.ModelDetails:
    try:
        cfg = store.config(name)
    except IntegrityError:
        cfg = {}
    return oa.ModelDetails(format=cfg.get("model_format", "gguf"), family=cfg.get("model_family", ""),
                           families=cfg.get("model_families"), parameter_size=cfg.get("model_type", ""),
                           quantization_level=cfg.get("file_type", ""))


@router.get("/api/tags")
async def tags(request: Request) -> oa.ListResponse:
    store = _store(request)
    return oa.ListResponse(models=[
        oa.ListModel(name=r.name.display, model=r.name.display, modified_at=convert.iso(r.modified_at),
                     size=r.size, digest=r.digest.hex, details=details(store, r.name))
        for r in store.list()])


@router.get("/api/ps")
async def ps(request: Request) -> oa.ProcessResponse:
    rt, store = _rt(request), _store(request)
    models = []
    for info in await run_in_threadpool(rt.models.loaded):
        name = ModelName.parse(info.name)
        try:
            digest, det = store.record(name).digest.hex, details(store, name)
        except SlmopsError:
            digest, det = "", oa.ModelDetails()
        expires = "9999-12-31T23:59:59Z" if info.expires_at == float("inf") else convert.iso(info.expires_at)
        shown = rt.resolver.shown_as(info.name)  # as clients ask
        models.append(oa.ProcessModel(name=shown, model=shown, size=info.size, digest=digest, details=det,
                                      expires_at=expires, size_vram=0, context_length=info.context_length,
                                      fallback=info.fallback, pid=info.pid or None))
    return oa.ProcessResponse(models=models)


def _capabilities(architecture: str) -> list[str]:
    return ["embedding"] if "bert" in architecture else ["completion", "tools"]


@router.post("/api/show")
async def show(body: oa.ShowRequest, request: Request) -> oa.ShowResponse:
    store = _store(request)
    name = ModelName.parse(body.ref or "")
    mf = build.to_modelfile(store, name)
    info = await asyncio.to_thread(store.inspect, name)
    model_info = {k: v for k, v in info.metadata.items() if not k.startswith("tokenizer.chat_template")}
    model_info["general.parameter_count"] = info.parameter_count
    params = "\n".join(f"{k:<30}{json.dumps(v) if isinstance(v, str) else v}"
                       for k, vals in mf.parameters.items() for v in (vals if isinstance(vals, list) else [vals]))
    capabilities = _capabilities(info.architecture)
    template = mf.template or ""
    if "tools" in capabilities and template and not template_handles_tools(template):
        template = TOOLS_NOTE + template  # clients read tool support from the template text (litellm does)
    return oa.ShowResponse(modelfile=render(mf, '# Modelfile generated by "slmops show"\n'), parameters=params,
                           template=template, system=mf.system, license="\n".join(mf.licenses) or None,
                           details=details(store, name), model_info=model_info,
                           capabilities=capabilities,
                           modified_at=convert.iso(store.record(name).modified_at),
                           messages=[oa.Message(**m) for m in mf.messages] or None,
                           knowledge=await asyncio.to_thread(_knowledge_files, store, name))


def _knowledge_files(store: Store, name: ModelName) -> list[oa.KnowledgeFile] | None:
    files = ks.list_files(store, store.manifest(name), f'"{name.display}"')
    return [oa.KnowledgeFile(name=f.name, size=f.size, chunks=f.chunks, digest=f.digest) for f in files] or None


@router.post("/api/copy")
async def copy(body: oa.CopyRequest, request: Request):
    _store(request).copy(ModelName.parse(body.source), ModelName.parse(body.destination))
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(body: oa.DeleteRequest, request: Request):
    name = ModelName.parse(body.ref)
    request.app.state.slots.check_removable(name)
    await _rt(request).models.unload(name.display)
    await asyncio.to_thread(_store(request).remove, name)
    return Response(status_code=200)


async def _progress(work: Callable[[Callable[[str, int, int | None], None]], Any]) -> AsyncIterator[dict]:
    """Run a store operation in a thread and yield its progress as Ollama status objects."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    last: dict[str, Any] = {}

    def progress(status: str, completed: int, total: int | None) -> None:
        item = oa.ProgressResponse(status=status, total=total, completed=completed if total else None)
        loop.call_soon_threadsafe(queue.put_nowait, item.model_dump(exclude_none=True))

    def run() -> None:
        try:
            work(progress)
        except BaseException as err:
            loop.call_soon_threadsafe(queue.put_nowait, err)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    threading.Thread(target=run, daemon=True).start()
    while (item := await queue.get()) is not _END:
        if isinstance(item, BaseException):
            raise item
        if item.get("total") and item == last:
            continue
        last = item
        yield item


async def _progress_response(stream: bool, work) -> Any:
    items = await streaming.prime(_progress(work))
    if stream:
        return streaming.ndjson(items)
    async for _ in items:
        pass
    return {"status": "success"}


@router.post("/api/pull")
async def pull(body: oa.PullRequest, request: Request):
    """A catalog name, or a registry reference (``insecure`` allows plain HTTP, as Ollama's). Registry logins
    come from ``registries.json`` only, read at each pull as ``docker login``'s file is: never the
    ``SLMOPS_REGISTRY_*`` login, which would go to whatever host the caller names."""
    store = _store(request)
    ref = Reference.parse(body.ref)
    registry = _registry(request, body.insecure)
    return await _progress_response(body.stream, lambda p: store.pull(ref, p, registry=registry))


def _registry(request: Request, insecure: bool) -> RegistryConfig:
    """The server's registry settings; the logins file is read per request, as ``docker login``'s is: a login
    added while the server runs takes effect."""
    config = request.app.state.config
    home = config.home or _store(request).root.parent
    return RegistryConfig(logins=read_logins(home / CREDENTIALS_FILE), ca_bundle=config.ca_bundle, insecure=insecure)


@router.post("/api/push")
async def push(body: oa.PushRequest, request: Request):
    """Ollama's push: ``insecure`` allows plain HTTP; logins from ``registries.json`` only, as for a pull."""
    store = _store(request)
    ref = Reference.parse(body.ref)
    registry = _registry(request, body.insecure)
    return await _progress_response(body.stream, lambda p: push_to_registry(store, ref, p, registry))


def _create_modelfile(body: oa.CreateRequest) -> Modelfile:
    mf = _modelfile_of(body)
    opts.validate(mf.parameters)
    return mf


def _modelfile_of(body: oa.CreateRequest) -> Modelfile:
    if body.modelfile:
        return parse(body.modelfile)
    files = list((body.files or {}).values())
    if len(files) > 1:
        raise InvalidInput("create takes one GGUF file in files")
    source = files[0] if files else body.from_
    if not source:
        raise InvalidInput("create needs from (a model name) or files (an uploaded GGUF blob)")
    licenses = [body.license] if isinstance(body.license, str) else list(body.license or [])
    return Modelfile(from_=source, parameters=dict(body.parameters or {}), template=body.template,
                     system=body.system, messages=[convert.to_engine_message(m) for m in body.messages or []],
                     adapters=list((body.adapters or {}).values()), licenses=licenses)


@router.post("/api/create")
async def create(body: oa.CreateRequest, request: Request):
    store = _store(request)
    name = ModelName.parse(body.ref)
    mf = await asyncio.to_thread(_create_modelfile, body)  # parsing is CPU work: off the event loop
    quantize = None
    if body.quantize:
        from slmops.ops.quantize import quantize_layer
        quantize = lambda layer, info: quantize_layer(store, layer, info, body.quantize, False, name.display)  # noqa: E731
    return await _progress_response(body.stream, lambda p: build.create(store, name, mf, None, p, quantize=quantize))


@router.head("/api/blobs/{digest}")
async def blob_exists(digest: str, request: Request):
    if not _store(request).blobs.has(Digest.parse(digest)):
        raise NotFound(f"blob {digest} not found")
    return Response(status_code=200)


@router.post("/api/blobs/{digest}", status_code=201)
async def blob_upload(digest: str, request: Request):
    store = _store(request)
    expected = Digest.parse(digest)
    if store.blobs.has(expected):
        return Response(status_code=200)
    limit = request.app.state.config.max_blob_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise TooLarge(f"blob is {length} bytes, over the server's limit of {limit} (SLMOPS_MAX_BLOB_SIZE)")
    reader = _StreamReader(request, asyncio.get_running_loop(), limit)
    await asyncio.to_thread(store.blobs.put_stream, reader, expected, None, f"blob {digest}")
    return Response(status_code=201)


class _StreamReader:
    """A blocking file-like view of the request body, for the blob store's streaming writer (runs in a thread).
    Past ``limit`` bytes it raises, which discards what was staged: a body without a Content-Length (chunked)
    is held to the limit as it arrives."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, limit: int):
        self._it = request.stream().__aiter__()
        self._loop = loop
        self._buf = b""
        self._done = False
        self._limit = limit
        self._seen = 0

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buf) < n):
            try:
                chunk = asyncio.run_coroutine_threadsafe(self._it.__anext__(), self._loop).result()
            except StopAsyncIteration:
                self._done = True
                break
            self._seen += len(chunk)
            if self._seen > self._limit:
                raise TooLarge(f"blob is over the server's limit of {self._limit} bytes (SLMOPS_MAX_BLOB_SIZE)")
            self._buf += chunk
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


@router.get("/api/version")
async def version() -> oa.VersionResponse:
    return oa.VersionResponse(version=oa.OLLAMA_API_LEVEL, slmops=slmops.__version__)
