"""Conversions for the Responses API: a request into the engine's chat ``Request``, outputs into wire items.

The API is served statelessly, as Ollama serves it: the whole conversation travels in ``input`` each time, so
anything that refers to stored state (``previous_response_id``, ``conversation``, ``background``) is refused
up front with a message that says what to send instead, rather than silently answering without that context.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Sequence

from slmops.api import responses as rsp
from slmops.engine.client import Request
from slmops.engine.outputs import Stats, ToolCall
from slmops.server import convert
from slmops.types.errors import InvalidInput

_STATELESS = "this server keeps no responses; send the whole conversation in input"


def new_id(prefix: str) -> str:
    """OpenAI's Responses ids join prefix and hex with ``_`` (``resp_…``, ``msg_…``), unlike chat's ``-``."""
    return f"{prefix}_{secrets.token_hex(16)}"


def _reject_stateful(body: rsp.ResponseRequest) -> None:
    if body.previous_response_id:
        raise InvalidInput(f"previous_response_id is not supported: {_STATELESS}")
    if body.conversation:
        raise InvalidInput(f"conversation is not supported: {_STATELESS}")
    if body.background:
        raise InvalidInput("background is not supported: this server keeps no responses to poll; "
                           "use stream instead")


def _text(parts: str | list[rsp.ContentPart], where: str) -> str:
    if isinstance(parts, str):
        return parts
    out = []
    for p in parts:
        if p.type in ("input_text", "output_text", "text"):
            out.append(p.text or "")
        elif p.type == "input_image":
            raise InvalidInput("this model does not support images; send input_text parts only")
        elif p.type == "input_file":
            raise InvalidInput("this model does not support files; send their text as input_text")
        else:
            raise InvalidInput(f'{where}: content type "{p.type}" is not supported; send input_text parts')
    return "".join(out)


def _arguments(call: rsp.FunctionCallInput) -> dict[str, Any]:
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise InvalidInput(f"function_call {call.call_id} has arguments that are not a JSON object")
    return args


def to_messages(body: rsp.ResponseRequest) -> list[dict[str, Any]]:
    """Input items as chat messages: a ``function_call`` joins the assistant turn just before it (chat templates
    expect text and calls in one turn), and each ``function_call_output`` becomes a ``tool`` message named after
    its call."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": body.input}]
    if not body.input:
        raise InvalidInput("input is empty; send a string or a list of message items")
    names: dict[str, str] = {}
    for i, item in enumerate(body.input):
        if isinstance(item, rsp.InputMessage):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content, f"input[{i}]")})
        elif isinstance(item, rsp.FunctionCallInput):
            names[item.call_id] = item.name
            call = {"function": {"name": item.name, "arguments": _arguments(item)}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, rsp.FunctionCallOutput):
            tool = {"role": "tool", "content": _text(item.output, f"input[{i}].output")}
            if item.call_id in names:
                tool["tool_name"] = names[item.call_id]
            messages.append(tool)
        else:
            raise InvalidInput(f'input[{i}]: item type "{item.type}" is not supported; send message, '
                               f"function_call and function_call_output items")
    return messages


def to_tools(body: rsp.ResponseRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    other = sorted({t.type for t in body.tools if t.type != "function"})
    if other:
        raise InvalidInput(f"tool type {', '.join(other)} is not supported; only function tools are")
    out = []
    for i, t in enumerate(body.tools):
        if not t.name:
            raise InvalidInput(f"tools[{i}] needs a name")
        out.append({"type": "function", "function": {
            "name": t.name, "description": t.description or "",
            "parameters": t.parameters or {"type": "object", "properties": {}}}})
    return out


def _tool_choice(body: rsp.ResponseRequest, tools: list | None) -> str:
    choice = body.tool_choice or "auto"
    if not isinstance(choice, str):
        if choice.type != "function" or not choice.name:
            raise InvalidInput(f'tool_choice type "{choice.type}" is not supported; use "auto", "none", '
                               f'"required" or {{"type": "function", "name": ...}}')
        choice = choice.name
    if choice not in ("auto", "none") and not tools:
        raise InvalidInput("tool_choice needs tools")
    return choice


def _format(body: rsp.ResponseRequest) -> str | dict[str, Any] | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "json"
    return fmt.schema_ or {"type": "object"}


def from_request(body: rsp.ResponseRequest) -> Request:
    """OpenAI's defaults are temperature 1 and top_p 1, as for chat completions."""
    _reject_stateful(body)
    tools = to_tools(body)
    options: dict[str, Any] = {"temperature": 1.0 if body.temperature is None else body.temperature,
                               "top_p": 1.0 if body.top_p is None else body.top_p}
    if body.max_output_tokens is not None:
        options["num_predict"] = body.max_output_tokens
    return Request(messages=to_messages(body), options=options, tools=tools,
                   tool_choice=_tool_choice(body, tools), format=_format(body), stream=body.stream)


def echo(body: rsp.ResponseRequest, req: Request) -> dict[str, Any]:
    """The request settings a ``Response`` repeats back, as used (defaults filled in)."""
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else None
    tools = [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
              "strict": t.strict} for t in body.tools or []]
    choice = body.tool_choice or "auto"
    return {"model": body.model, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "temperature": req.options["temperature"], "top_p": req.options["top_p"],
            "text": {"format": fmt or {"type": "text"}}, "tools": tools,
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(exclude_none=True),
            "truncation": body.truncation or "disabled", "user": body.user, "metadata": body.metadata or {}}


def usage(stats: Stats | None) -> rsp.Usage | None:
    if stats is None:
        return None
    u = convert.usage([stats])
    cached = (u.prompt_tokens_details or {}).get("cached_tokens", 0)
    return rsp.Usage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                     input_tokens_details=rsp.InputTokensDetails(cached_tokens=cached))


def message(item_id: str, text: str, status: str = "completed") -> rsp.OutputMessage:
    return rsp.OutputMessage(id=item_id, status=status, content=[rsp.OutputText(text=text)])


def function_call(call: ToolCall) -> rsp.FunctionCall:
    return rsp.FunctionCall(id=new_id("fc"), call_id=new_id("call"), name=call.name, status="completed",
                            arguments=json.dumps(call.arguments))


def output_items(text: str, calls: Sequence[ToolCall], incomplete: bool) -> list[rsp.OutputItem]:
    """A message (when there is text, or nothing else to show), then the function calls."""
    items: list[rsp.OutputItem] = []
    if text or not calls:
        items.append(message(new_id("msg"), text, "incomplete" if incomplete else "completed"))
    return items + [function_call(c) for c in calls]
