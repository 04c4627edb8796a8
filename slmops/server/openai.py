"""OpenAI-compatible API (``/v1/*``). Converts to the same engine requests the native routes use."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from dataclasses import replace

from fastapi import APIRouter, Request, Response

import slmops
from slmops.api import openai as oai
from slmops.engine import answers
from slmops.engine.outputs import Output, Stats
from slmops.server import convert, knowledge, streaming
from slmops.server.runtime import ModelRuntime
from slmops.types.errors import InvalidInput, ModelNotFound
from slmops.types.name import ModelName

router = APIRouter(prefix="/v1")
FINGERPRINT = f"fp_slmops_{slmops.__version__}"


def _rt(request: Request) -> ModelRuntime:
    return request.app.state.runtime


def _stream(rt: ModelRuntime, spec, req):
    """The engine's outputs for ``req``; OpenAI's API has no keep_alive, so the server's holds."""
    return rt.inference.stream(spec, req, rt.admission.default_keep_alive)


async def _run(rt: ModelRuntime, spec, req) -> Output:
    """One whole answer, its tool calls parsed out."""
    return await answers.acollect(answers.split_calls(_stream(rt, spec, req), req))


async def _together(runs: list) -> list:
    """Answers for ``n`` choices, generated at once (they decode in one batch); when one fails, the others stop."""
    tasks = [asyncio.ensure_future(r) for r in runs]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


@router.post("/chat/completions")
@streaming.stops_when_gone
async def chat_completions(body: oai.ChatCompletionRequest, request: Request, response: Response):
    """With knowledge, the chunks given to the model are named in the :data:`knowledge.HEADER` header."""
    rt = _rt(request)
    name, spec = rt.resolver.resolve(body.model)
    req = convert.from_chat_completion(body)
    if body.stream and body.n != 1:
        raise InvalidInput("n > 1 is not supported with stream; make n requests")
    req, _ = await knowledge.look_up(request.app.state, name, spec, req, rt.admission.default_keep_alive,
                                     response)
    created, cid = int(time.time()), convert.new_id("chatcmpl")
    if body.stream:
        outputs = await streaming.prime(answers.split_calls(_stream(rt, spec, req), req))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return knowledge.headed(streaming.sse(_chat_stream(outputs, body.model, cid, created, include_usage)),
                                response)
    choices, stats = [], []
    finals = await _together([_run(rt, spec, replace(req, options=convert.from_chat_completion(
        body, seed_offset=i).options)) for i in range(body.n)])
    for i, answer in enumerate(finals):
        text, calls = answer.text, answer.tool_calls
        message = oai.AssistantMessage(content=text if (text or not calls) else None,
                                       tool_calls=convert.openai_tool_calls(calls) if calls else None)
        logprobs = convert.openai_logprobs(list(answer.logprobs)) if req.logprobs is not None else None
        choices.append(oai.ChatChoice(index=i, message=message, finish_reason=convert.finish_reason(answer, calls),
                                      logprobs=logprobs))
        stats.append(answer.stats)
    return oai.ChatCompletion(id=cid, created=created, model=body.model, system_fingerprint=FINGERPRINT,
                              choices=choices, usage=convert.usage(stats))


async def _chat_stream(outputs: AsyncIterator[Output], model: str, cid: str, created: int,
                       include_usage: bool) -> AsyncIterator[dict]:
    def chunk(delta: oai.Delta, finish: str | None = None, logprobs=None) -> dict:
        c = oai.ChatCompletionChunk(id=cid, created=created, model=model, system_fingerprint=FINGERPRINT,
                                    choices=[oai.ChunkChoice(index=0, delta=delta, finish_reason=finish,
                                                             logprobs=logprobs)])
        return c.model_dump(exclude_none=True) | {"usage": None} if include_usage else c.model_dump(exclude_none=True)

    yield chunk(oai.Delta(role="assistant", content=""))
    stats: Stats | None = None
    made: list = []
    async for out in outputs:
        lp = convert.openai_logprobs(list(out.logprobs)) if out.logprobs else None
        if out.text or lp:
            yield chunk(oai.Delta(content=out.text), logprobs=lp)
        for call in out.tool_calls:  # named first, then its arguments, as OpenAI streams them
            index, made = len(made), made + [call]
            yield chunk(oai.Delta(tool_calls=[oai.DeltaToolCall(
                index=index, id=convert.new_id("call"), type="function",
                function=oai.DeltaFunction(name=call.name, arguments=""))]))
            yield chunk(oai.Delta(tool_calls=[oai.DeltaToolCall(
                index=index, function=oai.DeltaFunction(arguments=json.dumps(call.arguments)))]))
        if out.done:
            stats = out.stats
            yield chunk(oai.Delta(), convert.finish_reason(out, made))
    if include_usage and stats is not None:
        yield oai.ChatCompletionChunk(id=cid, created=created, model=model, system_fingerprint=FINGERPRINT,
                                      choices=[], usage=convert.usage([stats])).model_dump(exclude_none=True)


@router.post("/completions")
@streaming.stops_when_gone
async def completions(body: oai.CompletionRequest, request: Request):
    rt = _rt(request)
    _, spec = rt.resolver.resolve(body.model)
    prompts = convert.completion_prompts(body.prompt)
    created, cid = int(time.time()), convert.new_id("cmpl")
    if body.stream:
        if body.n != 1 or len(prompts) != 1:
            raise InvalidInput("streaming takes one prompt and n = 1")
        req = await _completion_request(rt, spec, body, prompts[0], 0)
        outputs = await streaming.prime(_stream(rt, spec, req))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming.sse(_completion_stream(outputs, body, cid, created, include_usage,
                                                req.prompt if body.echo else ""))
    choices, stats = [], []
    for prompt in prompts:
        reqs = [await _completion_request(rt, spec, body, prompt, i) for i in range(body.n)]
        finals = await _together([_run(rt, spec, req) for req in reqs])
        for req, answer in zip(reqs, finals):
            prefix = req.prompt if body.echo else ""
            choices.append(oai.CompletionChoice(
                index=len(choices), text=prefix + answer.text, finish_reason=convert.finish_reason(answer),
                logprobs=convert.completion_logprobs(list(answer.logprobs), len(prefix))
                if body.logprobs is not None else None))
            stats.append(answer.stats)
    return oai.Completion(id=cid, created=created, model=body.model, system_fingerprint=FINGERPRINT,
                          choices=choices, usage=convert.usage(stats, body.n))


async def _completion_request(rt: ModelRuntime, spec, body: oai.CompletionRequest, prompt: Any, i: int):
    if isinstance(prompt, list):
        prompt = await rt.models.call(spec, rt.engine.detokenize, rt.admission.default_keep_alive, prompt)
    if not prompt:
        raise InvalidInput("prompt is empty")
    return convert.from_completion(body, prompt, seed_offset=i)


async def _completion_stream(outputs: AsyncIterator[Output], body: oai.CompletionRequest, cid: str, created: int,
                             include_usage: bool, echo: str) -> AsyncIterator[dict]:
    def chunk(text: str, finish: str | None = None, lps=None, offset: int = 0) -> dict:
        c = oai.Completion(id=cid, created=created, model=body.model, system_fingerprint=FINGERPRINT,
                           choices=[oai.CompletionChoice(index=0, text=text, finish_reason=finish,
                                                         logprobs=convert.completion_logprobs(lps, offset)
                                                         if lps is not None else None)])
        d = c.model_dump(exclude_none=True)
        d["choices"][0]["finish_reason"] = finish
        return d

    offset = len(echo)
    if echo:
        yield chunk(echo)
    stats = None
    async for out in outputs:
        lps = list(out.logprobs) if body.logprobs is not None else None
        if out.text or lps:
            yield chunk(out.text, lps=lps, offset=offset)
            offset += len(out.text)
        if out.done:
            stats = out.stats
            yield chunk("", convert.finish_reason(out))
    if include_usage and stats is not None:
        yield oai.Completion(id=cid, created=created, model=body.model, system_fingerprint=FINGERPRINT, choices=[],
                             usage=convert.usage([stats])).model_dump(exclude_none=True)


@router.post("/embeddings")
async def embeddings(body: oai.EmbeddingRequest, request: Request) -> oai.EmbeddingResponse:
    rt = _rt(request)
    _, spec = rt.resolver.resolve(body.model)
    raw = body.input
    items: list = [raw] if isinstance(raw, str) or (raw and all(isinstance(x, int) for x in raw)) else list(raw)
    if not items or any(i in ("", []) for i in items):
        raise InvalidInput("input must not be empty")
    texts = []
    for item in items:
        texts.append(item if isinstance(item, str) else
                     await rt.models.call(spec, rt.engine.detokenize, rt.admission.default_keep_alive, item))
    vectors, used, _ = await rt.inference.embed(spec, texts, None, True, rt.admission.default_keep_alive)
    vectors = convert.truncate_dimensions(vectors, body.dimensions)
    data = [oai.EmbeddingData(index=i, embedding=convert.encode_embedding(v, body.encoding_format))
            for i, v in enumerate(vectors)]
    return oai.EmbeddingResponse(data=data, model=body.model, usage={"prompt_tokens": used, "total_tokens": used})


def _model_object(request: Request, name: ModelName) -> oai.ModelObject:
    record = request.app.state.store.record(name)
    owner = name.namespace if name.namespace != "library" else "library"
    return oai.ModelObject(id=name.display, created=int(record.modified_at.timestamp()), owned_by=owner)


@router.get("/models")
async def models(request: Request) -> oai.ModelList:
    return oai.ModelList(data=[_model_object(request, r.name) for r in request.app.state.store.list()])


@router.get("/models/{model:path}")
async def model(model: str, request: Request) -> oai.ModelObject:
    name = ModelName.parse(model)
    if not request.app.state.store.exists(name):
        raise ModelNotFound(model)
    return _model_object(request, name)
