"""Conversions between the wire types of both APIs and the engine's plain types — the only place they meet.

Like Ollama's ``openai/openai.go``: pure functions; the OpenAI routes reuse the engine calls of the native ones.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import struct
from datetime import datetime, timezone
from typing import Any, Sequence


from slmops.api import ollama as oa
from slmops.api import openai as oai
from slmops.engine.client import Request
from slmops.engine.outputs import Output, Stats, TokenLogprob, ToolCall
from slmops.types.errors import InvalidInput


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def iso(ts: float | datetime) -> str:
    dt = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# -- Ollama ---------------------------------------------------------------------------------------------------
def _reject_unsupported(images: list[str] | None, think: Any, suffix: str | None = None) -> None:
    if images:
        raise InvalidInput("this model does not support images")
    if think not in (None, False):
        raise InvalidInput("this model does not support thinking")
    if suffix:
        raise InvalidInput("this model does not support insert (suffix)")


def to_engine_message(m: oa.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in m.tool_calls]
    if m.tool_name:
        out["tool_name"] = m.tool_name
    return out


def from_generate(body: oa.GenerateRequest) -> Request:
    _reject_unsupported(body.images, body.think, body.suffix)
    return Request(prompt=body.prompt, system=body.system, template=body.template, raw=body.raw,
                   options=body.options, format=body.format or None, prefix_tokens=body.context,
                   logprobs=body.top_logprobs if body.logprobs else None, stream=body.stream)


def from_chat(body: oa.ChatRequest) -> Request:
    for m in body.messages:
        _reject_unsupported(m.images, None)
    _reject_unsupported(None, body.think)
    tools = [t.model_dump() for t in body.tools] if body.tools else None
    return Request(messages=[to_engine_message(m) for m in body.messages], options=body.options, tools=tools,
                   format=body.format or None, logprobs=body.top_logprobs if body.logprobs else None,
                   stream=body.stream)


def stats_fields(s: Stats | None) -> dict[str, int]:
    if s is None:
        return {}
    return {"total_duration": s.total_duration, "load_duration": s.load_duration,
            "prompt_eval_count": s.prompt_eval_count, "prompt_eval_duration": s.prompt_eval_duration,
            "eval_count": s.eval_count, "eval_duration": s.eval_duration}


def ollama_logprobs(lps: tuple[TokenLogprob, ...]) -> list[oa.Logprob] | None:
    if not lps:
        return None
    return [oa.Logprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes),
                       top_logprobs=[oa.TokenLogprob(token=x.token, logprob=x.logprob, bytes=list(x.bytes))
                                     for x in t.top] or None) for t in lps]


def generate_chunk(model: str, out: Output, with_context: bool = True,
                   knowledge: list[oa.KnowledgeChunk] | None = None) -> dict:
    """``knowledge``: the chunks retrieval gave the model, named in the last object only."""
    r = oa.GenerateResponse(model=model, created_at=now_iso(), response=out.text,
                            done=out.done, done_reason=out.done_reason, logprobs=ollama_logprobs(out.logprobs),
                            context=list(out.context) if out.done and with_context else None,
                            knowledge=knowledge if out.done else None, **stats_fields(out.stats))
    return r.model_dump(exclude_none=True)


def chat_chunk(model: str, out: Output, knowledge: list[oa.KnowledgeChunk] | None = None) -> dict:
    """A streamed piece or a whole answer; Ollama numbers calls within the message that carries them.
    ``knowledge``: the chunks retrieval gave the model, named in the last object only."""
    calls = [oa.ToolCall(function=oa.ToolCallFunction(name=c.name, arguments=c.arguments, index=i))
             for i, c in enumerate(out.tool_calls)]
    msg = oa.ResponseMessage(content=out.text, tool_calls=calls or None)
    r = oa.ChatResponse(model=model, created_at=now_iso(), message=msg, done=out.done, done_reason=out.done_reason,
                        logprobs=ollama_logprobs(out.logprobs), knowledge=knowledge if out.done else None,
                        **stats_fields(out.stats))
    return r.model_dump(exclude_none=True)


# -- OpenAI ---------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _sampling_options(body: oai._Sampling, max_tokens: int | None, seed_offset: int = 0) -> dict[str, Any]:
    """OpenAI's defaults are temperature 1 and top_p 1 (as Ollama's compatibility layer sets them)."""
    o: dict[str, Any] = {"temperature": 1.0 if body.temperature is None else body.temperature,
                         "top_p": 1.0 if body.top_p is None else body.top_p}
    if max_tokens is not None:
        o["num_predict"] = max_tokens
    if body.stop:
        o["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if body.seed is not None:
        o["seed"] = body.seed + seed_offset
    if body.presence_penalty is not None:
        o["presence_penalty"] = body.presence_penalty
    if body.frequency_penalty is not None:
        o["frequency_penalty"] = body.frequency_penalty
    return o


def _openai_message(m: oai.ChatMessage) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments or "{}")
            except json.JSONDecodeError:
                raise InvalidInput(f"tool call {c.id or c.function.name} has arguments that are not JSON") from None
            calls.append({"function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    return out


def from_chat_completion(body: oai.ChatCompletionRequest, seed_offset: int = 0) -> Request:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    fmt: Any = None
    if body.response_format is not None:
        if body.response_format.type == "json_object":
            fmt = "json"
        elif body.response_format.type == "json_schema":
            if body.response_format.json_schema is None:
                raise InvalidInput("response_format json_schema needs a json_schema object")
            fmt = body.response_format.json_schema.schema_ or {"type": "object"}
    tools = [t.model_dump() for t in body.tools] if body.tools else None
    choice = body.tool_choice or "auto"
    tool_choice = choice if isinstance(choice, str) else choice.function.name
    if tool_choice not in ("auto", "none") and not tools:
        raise InvalidInput("tool_choice needs tools")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Request(messages=[_openai_message(m) for m in body.messages],
                   options=_sampling_options(body, max_tokens, seed_offset), tools=tools,
                   tool_choice=tool_choice, format=fmt, logprobs=logprobs, stream=body.stream)


def from_completion(body: oai.CompletionRequest, prompt: str, seed_offset: int = 0) -> Request:
    if body.suffix:
        raise InvalidInput("suffix is not supported by this model")
    return Request(prompt=prompt, raw=True, options=_sampling_options(body, body.max_tokens, seed_offset),
                   logprobs=body.logprobs, stream=body.stream)


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def usage(stats: list[Stats], choices_per_prompt: int = 0) -> oai.Usage:
    """Prompt tokens count once per prompt (not per choice); ``stats`` is prompt-major, n choices each."""
    per = choices_per_prompt or len(stats) or 1
    p = sum(s.prompt_eval_count for s in stats[::per])
    c = sum(s.eval_count for s in stats)
    cached = sum(s.cached_prompt_tokens for s in stats[::per])
    return oai.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                     prompt_tokens_details={"cached_tokens": cached})


def finish_reason(out: Output, tool_calls: Sequence[ToolCall] = ()) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if out.done_reason == "length" else "stop"


def openai_logprobs(lps: list[TokenLogprob]) -> oai.ChoiceLogprobs:
    return oai.ChoiceLogprobs(content=[
        oai.TokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes),
                         top_logprobs=[oai.TopLogprob(token=x.token, logprob=x.logprob, bytes=list(x.bytes))
                                       for x in t.top]) for t in lps])


def openai_tool_calls(calls: Sequence[ToolCall]) -> list[oai.ResponseToolCall]:
    """OpenAI sends arguments as a JSON string, and each call needs an id the tool's answer can name."""
    return [oai.ResponseToolCall(id=new_id("call"), function=oai.FunctionCall(name=c.name,
                                                                              arguments=json.dumps(c.arguments)))
            for c in calls]


def completion_logprobs(lps: list[TokenLogprob], start_offset: int) -> oai.CompletionLogprobs:
    offsets, pos = [], start_offset
    for t in lps:
        offsets.append(pos)
        pos += len(t.token)
    return oai.CompletionLogprobs(tokens=[t.token for t in lps], token_logprobs=[t.logprob for t in lps],
                                  top_logprobs=[{x.token: x.logprob for x in t.top} for t in lps],
                                  text_offset=offsets)


def encode_embedding(vec: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()  # little-endian float32, as OpenAI
    return vec


def truncate_dimensions(vectors: list[list[float]], dims: int | None) -> list[list[float]]:
    """Matryoshka-style ``dimensions``: keep the first ``dims`` values and re-normalise."""
    if not dims:
        return vectors
    out = []
    for v in vectors:
        if dims > len(v):
            raise InvalidInput(f"dimensions {dims} is larger than the model's {len(v)}")
        a = v[:dims]
        n = math.hypot(*a)
        out.append([x / n for x in a] if n else list(a))
    return out
