"""Tool calling for any model: tools described to the model when its template cannot, and calls parsed back.

Templates that render ``tools`` themselves get the tools as they are. For the others, a system message describes
the tools and asks for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes/Qwen form many
small models are trained on); the parser accepts that form and a bare JSON call.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from typing import Any

import jinja2
import jinja2.meta

from slmops.engine.outputs import Output, ToolCall

TOOL_PROMPT = (
    "You can call functions. To call one, reply with only "
    '<tool_call>{{"name": <function name>, "arguments": <arguments object>}}</tool_call>. '
    "Available functions:\n{tools}"
)


def describe(tools: list[dict[str, Any]]) -> str:
    return TOOL_PROMPT.format(tools="\n".join(json.dumps(t.get("function", t)) for t in tools))


@functools.lru_cache(maxsize=64)
def template_handles_tools(template_source: str) -> bool:
    """Whether the template renders ``tools`` itself: it reads the variable (a Go template's ``.Tools``), not
    merely mentions the word, in text or in a comment such as the note ``/api/show`` adds. Remembered per
    template: every chat request asks, and parsing one takes a millisecond."""
    if ".Tools" in template_source:
        return True
    try:
        ast = jinja2.Environment().parse(template_source)
    except jinja2.TemplateSyntaxError:
        return "tools" in template_source
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


TOOLS_NOTE = ("{#- slmops: when a request carries tools, it describes them in the system message and asks for "
              "<tool_call>{...}</tool_call>, since this template does not render tools itself. -#}\n")


def _call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], args if isinstance(args, dict) else {})


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


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


class CallStream:
    """Splits an answer, as it streams, into text to show now and tool calls, each given out once complete.

    Text passes through at once, except what could still turn into a call: the tail that may be the start of
    ``<tool_call>``, everything from such a tag to its closing tag, and an answer whose first visible character
    is ``{`` (a bare JSON call, which forced tool choice always produces) until that object is complete. A tagged
    call that does not parse, or a bare object that is not a call of one of ``tools``, is given back as text.
    """

    def __init__(self, tools: list[dict[str, Any]]):
        self.names = {(t.get("function") or {}).get("name") for t in tools}
        self._held = ""
        self._shown = False  # visible text has been given out: a "{" from now on is only text
        self._decoder = json.JSONDecoder()

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        self._held += piece
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._drain(final=True)

    def split(self, out: Output) -> Output:
        """``out`` with only the text to show now and the calls its text completed; the final record also gives
        out whatever was still held back. One output in, one out, so stream positions and counts stay put."""
        text, calls = self.feed(out.text)
        if out.done:
            rest, more = self.finish()
            text, calls = text + rest, calls + more
        return replace(out, text=text, tool_calls=tuple(calls))

    def _drain(self, final: bool) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        calls: list[ToolCall] = []
        while self._held:
            held = self._held
            if not self._shown and held.lstrip().startswith("{"):
                start = len(held) - len(held.lstrip())
                try:
                    obj, end = self._decoder.raw_decode(held, start)
                except json.JSONDecodeError:
                    if not final:
                        break  # not complete yet
                    obj, end = None, len(held)
                call = _call(obj, self.names)
                if call is not None:
                    calls.append(call)
                    self._held = held[end:]
                    continue
                self._shown = True  # an object, but no call: plain text from here on
                continue
            tag = held.find(_OPEN)
            if tag < 0:
                keep = 0 if final else _partial_suffix(held, _OPEN)
                if not self._shown and not held[:len(held) - keep].strip() and not final:
                    break  # only blanks so far: a bare call may still follow
                out.append(held[:len(held) - keep])
                self._held = held[len(held) - keep:]
                self._shown = self._shown or bool(out[-1].strip())
                break
            if tag > 0:
                out.append(held[:tag])
                self._shown = self._shown or bool(held[:tag].strip())
                self._held = held = held[tag:]
            close = held.find(_CLOSE)
            if close < 0 and not final:
                break
            inner = held[len(_OPEN):close if close >= 0 else len(held)]
            rest = held[close + len(_CLOSE):] if close >= 0 else ""
            try:
                call = _call(json.loads(inner), self.names)
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
            else:
                out.append(held[:len(held) - len(rest)])
                self._shown = True
            self._held = rest
        return "".join(out), calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
