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


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
MAX_ENUM_RANGE = 1000


def enforceable(schema: Any, path: str = "$") -> Any:
    """The schema with numeric bounds made enforceable, or an error naming the bound that cannot be.

    The converter constrains types, enums, string lengths and patterns, array sizes and object shapes, but not
    numeric bounds. A bounded integer range of at most ``MAX_ENUM_RANGE`` values becomes an ``enum``; any other
    numeric bound is refused, so constrained output never fails its own schema.
    """
    if isinstance(schema, list):
        return [enforceable(s, f"{path}[{i}]") for i, s in enumerate(schema)]
    if not isinstance(schema, dict):
        return schema
    out = {k: enforceable(v, f"{path}.{k}") for k, v in schema.items()}
    bounds = [k for k in _BOUNDS if k in out]
    if not bounds:
        return out
    if out.get("type") == "integer" and "enum" not in out and set(bounds) <= set(_BOUNDS[:4]):
        lo = out.get("minimum", out.get("exclusiveMinimum", None))
        hi = out.get("maximum", out.get("exclusiveMaximum", None))
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            lo = int(lo) + (1 if "exclusiveMinimum" in out and "minimum" not in out else 0)
            hi = int(hi) - (1 if "exclusiveMaximum" in out and "maximum" not in out else 0)
            if 0 <= hi - lo < MAX_ENUM_RANGE:
                rest = {k: v for k, v in out.items() if k not in _BOUNDS and k != "type"}
                return {**rest, "enum": list(range(lo, hi + 1))}
    raise InvalidInput(f"JSON Schema at {path}: {', '.join(bounds)} cannot be enforced while generating; "
                       f"only integer ranges of up to {MAX_ENUM_RANGE} values are, so remove or narrow it")


# llama-cpp-python's converter lets raw control characters into strings, which JSON forbids (llama.cpp's own
# converter excludes them); its rule is tightened to match.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def for_schema(schema: dict[str, Any]) -> str:
    schema = enforceable(schema)
    try:
        return json_schema_to_gbnf(json.dumps(schema)).replace(_LOOSE_CHAR, _STRICT_CHAR)
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
