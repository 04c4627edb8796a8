"""Tool calling for any model: tools described to the model when its template cannot, and calls parsed back.

Templates that render ``tools`` themselves get the tools as they are. For the others, a system message describes
the tools and asks for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes/Qwen form many
small models are trained on); the parser accepts that form and a bare JSON call.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_PROMPT = (
    "You can call functions. To call one, reply with only "
    '<tool_call>{{"name": <function name>, "arguments": <arguments object>}}</tool_call>. '
    "Available functions:\n{tools}"
)
_TAGGED = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def describe(tools: list[dict[str, Any]]) -> str:
    return TOOL_PROMPT.format(tools="\n".join(json.dumps(t.get("function", t)) for t in tools))


def template_handles_tools(template_source: str) -> bool:
    return "tools" in template_source or ".Tools" in template_source


def _call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "arguments": args if isinstance(args, dict) else {}}


def prepare_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     template_source: str) -> list[dict[str, Any]]:
    """Describe ``tools`` in the system message and write earlier calls as text, unless the template does both."""
    if template_handles_tools(template_source):
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "".join(f"<tool_call>{json.dumps(c.get('function', c))}</tool_call>" for c in m["tool_calls"])
            m = {**m, "content": (m.get("content") or "") + calls}
            m.pop("tool_calls")
        out.append(m)
    if tools:
        text = describe(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".strip()}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def parse_calls(text: str, tools: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Tool calls found in ``text`` and the text left around them."""
    names = {(t.get("function") or {}).get("name") for t in tools}
    calls = []
    for m in _TAGGED.finditer(text):
        try:
            call = _call(json.loads(m.group(1)), names)
        except json.JSONDecodeError:
            call = None
        if call:
            calls.append(call)
    if calls:
        return calls, _TAGGED.sub("", text).strip()
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            call = _call(json.loads(stripped), names)
        except json.JSONDecodeError:
            call = None
        if call:
            return [call], ""
    return [], text
