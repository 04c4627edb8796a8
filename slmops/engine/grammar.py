"""Constrained output: JSON mode, JSON Schemas and tool calls compiled to llama.cpp grammars (GBNF).

The schema-to-GBNF conversion is llama-cpp-python's maintained converter; this module only decides what schema
each request needs.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from slmops.types.errors import InvalidInput


def for_format(fmt: str | dict[str, Any] | None) -> str | None:
    """Ollama ``format``: ``"json"`` (any JSON object) or a JSON Schema; empty means free text."""
    if fmt in (None, "", {}):
        return None
    if fmt == "json":
        return JSON_GBNF
    if isinstance(fmt, dict):
        return for_schema(fmt)
    raise InvalidInput('format must be "json" or a JSON Schema object')


def for_schema(schema: dict[str, Any]) -> str:
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as err:  # the converter raises bare builtins for unsupported schema features
        raise InvalidInput(f"unsupported JSON Schema: {str(err)[:200] or type(err).__name__}") from None


def tool_call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """A call of one of ``tools`` (or exactly ``name``): ``{"name": ..., "arguments": {...}}``."""
    options = []
    for tool in tools:
        fn = tool.get("function") or {}
        if name is not None and fn.get("name") != name:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn.get("name")}, "arguments": params},
            "required": ["name", "arguments"],
        })
    if not options:
        raise InvalidInput(f'tool_choice names "{name}", which is not among the tools given')
    return options[0] if len(options) == 1 else {"anyOf": options}
