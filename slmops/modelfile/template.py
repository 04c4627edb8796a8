"""Chat templates: Jinja (as GGUF files carry them) rendered in a sandbox, and Ollama's Go templates translated.

Decision on Go templates: Ollama Modelfiles write TEMPLATE in Go's text/template. We translate the forms those
templates use — ``{{ .System }}``, ``.Prompt``, ``.Response``, ``if``/``else if``/``else``/``end``,
``range .Messages`` with ``.Role``/``.Content``, ``$.Field``, ``eq``/``ne``/``and``/``or``/``not``/``len`` and
``{{-``/``-}}`` trimming — into Jinja. A template that uses anything else (variables, ``slice``, ``index``, custom
functions) is rejected with the construct named and a pointer to writing the TEMPLATE in Jinja, never guessed.
Templates with ``.Prompt``/``.Response`` and no ``.Messages`` render once per turn, as Ollama does.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from slmops.types.errors import TemplateError

def _raise(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _env(go: bool) -> ImmutableSandboxedEnvironment:
    """Hugging Face renders Jinja chat templates with trimmed blocks; Go keeps every character of its text."""
    env = ImmutableSandboxedEnvironment(trim_blocks=not go, lstrip_blocks=not go, keep_trailing_newline=go,
                                        undefined=jinja2.ChainableUndefined)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_JINJA_ENV = _env(go=False)
_GO_ENV = _env(go=True)


@functools.lru_cache(maxsize=64)
def _compiled(jinja_src: str, go: bool) -> jinja2.Template:
    """Jinja compiles a template to Python on every ``from_string``: for a chat request that was 1.6 ms of parsing
    and code generation, the same each time. A compiled template renders from any thread."""
    return (_GO_ENV if go else _JINJA_ENV).from_string(jinja_src)


_RESPONSE_CUT = "\x00slmops-response\x00"

_GO_ACTION = re.compile(r"{{(-\s)?\s*(.*?)\s*(\s-)?}}", re.S)
_GO_HINT = re.compile(r"{{-?\s*(\.|\$|/\*|(if|range|end|else|with|template|define|block|slice|index|len|eq|ne|and|or|not|"
                      r"printf|print|json|toJson|html|js|call|lt|le|gt|ge)\b)")


def is_go_template(source: str) -> bool:
    return "{%" not in source and bool(_GO_HINT.search(source))


# -- Go → Jinja ----------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|`[^`]*`|-?\d+(?:\.\d+)?|\$\.\w+(?:\.\w+)*|\$\w*(?:\.\w+)*|\.\w+(?:\.\w+)*|\.|[A-Za-z_]\w*)')
_FUNCS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_TOP = {"System", "Prompt", "Response", "Messages", "Tools", "Think", "IsThinkSet", "Suffix"}


class _GoExpr:
    def __init__(self, text: str, in_range: bool, loop_var: str | None):
        self.tokens: list[str] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise TemplateError(f'unsupported Go template syntax "{text}"; write the TEMPLATE in Jinja instead')
            self.tokens.append(m.group(1))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        self.in_range, self.loop_var, self.i = in_range, loop_var, 0

    def field(self, tok: str) -> str:
        if tok.startswith("$."):
            parts = tok[2:].split(".")
            return ".".join([_snake(parts[0])] + [_snake(p) for p in parts[1:]])
        if tok.startswith("$"):
            name, _, rest = tok[1:].partition(".")
            if name != self.loop_var:
                raise TemplateError(f'unsupported Go template variable "{tok}"; write the TEMPLATE in Jinja instead')
            return "m" + "".join(f".{_snake(p)}" for p in rest.split(".") if p)
        if tok == ".":
            return "m" if self.in_range else "_root"
        parts = tok[1:].split(".")
        if self.in_range and parts[0] not in _TOP - {"Tools"}:
            return "m" + "".join(f".{_snake(p)}" for p in parts)
        if parts[0] not in _TOP and not self.in_range:
            raise TemplateError(f'unknown Go template field "{tok}"; write the TEMPLATE in Jinja instead')
        return ".".join(_snake(p) for p in parts)

    def parse(self) -> str:
        out = self.pipeline()
        if self.i != len(self.tokens):
            raise TemplateError(f'unsupported Go template syntax near "{self.tokens[self.i]}"')
        return out

    def pipeline(self) -> str:
        tok = self.tokens[self.i]
        if tok in _FUNCS or tok in ("and", "or", "not", "len"):
            self.i += 1
            args = []
            while self.i < len(self.tokens) and self.tokens[self.i] != ")":
                args.append(self.operand())
            if tok in _FUNCS:
                if len(args) < 2:
                    raise TemplateError(f'Go template "{tok}" needs two arguments')
                return "(" + " or ".join(f"{args[0]} {_FUNCS[tok]} {a}" for a in args[1:]) + ")"
            if tok == "not":
                return f"(not {args[0]})"
            if tok == "len":
                return f"({args[0]}|length)"
            return "(" + f" {tok} ".join(args) + ")"
        return self.operand()

    def operand(self) -> str:
        tok = self.tokens[self.i]
        self.i += 1
        if tok == "(":
            inner = self.pipeline()
            if self.i >= len(self.tokens) or self.tokens[self.i] != ")":
                raise TemplateError("unbalanced parentheses in Go template")
            self.i += 1
            return inner
        if tok.startswith('"'):
            return tok
        if tok.startswith("`"):
            return repr(tok[1:-1])
        if tok[0] in "-0123456789":
            return tok
        if tok[0] in ".$":
            return self.field(tok)
        raise TemplateError(f'unsupported Go template function "{tok}"; write the TEMPLATE in Jinja instead')


def _snake(name: str) -> str:
    return {"Role": "role", "Content": "content", "ToolCalls": "tool_calls", "Function": "function",
            "Arguments": "arguments", "Name": "name", "Thinking": "thinking"}.get(name, name.lower())


def go_to_jinja(source: str) -> str:
    out: list[str] = []
    stack: list[str] = []
    loop_vars: list[str | None] = []
    pos = 0
    for m in _GO_ACTION.finditer(source):
        out.append(_escape_text(source[pos:m.start()]))
        pos = m.end()
        lt, body, rt = "-" if m.group(1) else "", m.group(2), "-" if m.group(3) else ""
        if body.startswith("/*"):
            continue
        in_range = "range" in stack
        var = loop_vars[-1] if loop_vars else None
        words = body.split(None, 1)
        head = words[0] if words else ""
        rest = words[1] if len(words) > 1 else ""
        if head == "if":
            stack.append("if")
            out.append(f"{{%{lt} if {_GoExpr(rest, in_range, var).parse()} {rt}%}}")
        elif head == "else" and rest.startswith("if "):
            out.append(f"{{%{lt} elif {_GoExpr(rest[3:], in_range, var).parse()} {rt}%}}")
        elif head == "else":
            out.append(f"{{%{lt} else {rt}%}}")
        elif head == "range":
            m2 = re.fullmatch(r"(?:\$(\w+)\s*,\s*\$(\w+)\s*:=\s*)?(.+)", rest)
            if not m2:
                raise TemplateError(f'unsupported Go range "{body}"')
            seq = _GoExpr(m2.group(3), in_range, var).parse()
            stack.append("range")
            loop_vars.append(m2.group(2))
            out.append(f"{{%{lt} for m in {seq} {rt}%}}")
        elif head == "end":
            if not stack:
                raise TemplateError("Go template has an {{ end }} without a matching if or range")
            kind = stack.pop()
            if kind == "range":
                loop_vars.pop()
            out.append(f"{{%{lt} end{'for' if kind == 'range' else 'if'} {rt}%}}")
        else:
            out.append(f"{{{{{lt} {_GoExpr(body, in_range, var).parse()} {rt}}}}}")
    out.append(_escape_text(source[pos:]))
    if stack:
        raise TemplateError(f"Go template has an unclosed {stack[-1]}")
    return "".join(out)


def _escape_text(text: str) -> str:
    if "{%" in text or "{#" in text or "{{" in text:
        return "{% raw %}" + text + "{% endraw %}"
    return text


@dataclass
class ChatTemplate:
    """A compiled chat template; ``legacy`` means one render per (system, prompt, response) turn."""

    source: str
    jinja: str
    legacy: bool
    go: bool = False
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def compile(cls, source: str, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        go = is_go_template(source)
        jinja_src = go_to_jinja(source) if go else source
        legacy = go and ".Messages" not in source
        try:
            _compiled(jinja_src, go)
        except jinja2.TemplateSyntaxError as err:
            raise TemplateError(f"chat template does not parse (line {err.lineno}): {err.message}") from None
        return cls(source, jinja_src, legacy, go, bos_token, eos_token)

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None = None,
               add_generation_prompt: bool = True) -> str:
        template = _compiled(self.jinja, self.go)
        system = next((m["content"] for m in messages if m.get("role") == "system"), "")
        try:
            if self.legacy:
                turns = _turns(messages, system)
                if add_generation_prompt and not turns[-1]["response"]:
                    turns[-1]["response"] = _RESPONSE_CUT
                text = "".join(template.render(**turn) for turn in turns)
                return text.split(_RESPONSE_CUT, 1)[0]
            prompt = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
            return template.render(messages=messages, tools=tools or None, system=system, prompt=prompt, response="",
                                   add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                   eos_token=self.eos_token)
        except TemplateError:
            raise
        except jinja2.TemplateError as err:
            raise TemplateError(f"chat template failed to render: {err}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise TemplateError(f"chat template failed to render: {type(err).__name__}: {err}"[:300]) from None


def _turns(messages: list[dict[str, Any]], system: str) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    cur = {"system": system, "prompt": "", "response": ""}
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "user":
            if cur["prompt"] or cur["response"]:
                turns.append(cur)
                cur = {"system": "", "prompt": "", "response": ""}
            cur["prompt"] = content
        elif role == "assistant":
            cur["response"] = content
            turns.append(cur)
            cur = {"system": "", "prompt": "", "response": ""}
    if cur["prompt"] or cur["system"] or not turns:
        turns.append(cur)
    return turns
