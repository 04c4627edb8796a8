"""Constrained output on llama.cpp: each :class:`~slmops.engine.backend.Constraint` compiled to a grammar (GBNF).

JSON mode, JSON Schemas and tool calls go through llama-cpp-python's maintained schema-to-GBNF converter; a GBNF
constraint is taken as written. This module makes sure no schema can hurt the runner that parses its grammar.
llama.cpp parses a grammar on the model's runner thread, with a parser that recurses once per nested group, and it
builds one rule per optional repetition: a ``maxLength`` of 20,000 used to become a grammar nested 20,000 deep,
which overflowed that thread's stack and killed the runner with every request on it. So repetitions are written flat
(``char{0,2000}``), the schema's own counts and depth are checked first, and every grammar is measured by
:func:`check_grammar`, a dry run of llama.cpp's parser (:mod:`slmops.engine.llamacpp.gbnf`), before llama.cpp sees
it. Anything over a limit is an ``InvalidInput`` naming it.
"""

from __future__ import annotations

import json
from typing import Any

import llama_cpp.llama_grammar as converter
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from slmops.engine.backend import Constraint
from slmops.engine.llamacpp.gbnf import MAX_REPEAT, check_grammar, shown_count
from slmops.types.errors import InvalidInput

KINDS = frozenset({"json", "json_schema", "tool_calls", "gbnf"})  # the Constraint kinds compiled here

# JSON nesting of a schema, checked before anything recurses over it. The converter takes a Python frame per
# array level and two per object level (RecursionError past 993 and 496); real schemas nest < 20.
MAX_SCHEMA_DEPTH = 64


def to_gbnf(constraint: Constraint) -> str:
    """The GBNF for ``constraint`` (a kind of :data:`KINDS`), within every limit of :func:`check_grammar`."""
    if constraint.kind == "json":
        return check_grammar(JSON_GBNF)
    if constraint.kind in ("json_schema", "tool_calls"):
        return for_schema(constraint.schema)  # type: ignore[arg-type]
    if constraint.kind == "gbnf":
        return check_grammar(constraint.source)  # type: ignore[arg-type]
    raise ValueError(f"llama.cpp compiles no {constraint.kind} constraint")  # the engine checks KINDS first


def for_format(fmt: str | dict[str, Any] | None) -> str | None:
    """Ollama ``format`` compiled: ``"json"`` (any JSON object) or a JSON Schema; empty means free text."""
    constraint = Constraint.from_format(fmt)
    return to_gbnf(constraint) if constraint else None


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
    _check_schema(schema)
    schema = enforceable(schema)
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema)).replace(_LOOSE_CHAR, _STRICT_CHAR)
    except RecursionError:  # $ref chains nest without nesting the JSON
        raise InvalidInput("JSON Schema: its $ref definitions nest too deeply for constrained output; "
                           "flatten them") from None
    except Exception as err:  # the converter raises bare builtins for unsupported schema features
        raise InvalidInput(f"unsupported JSON Schema: {str(err)[:200] or type(err).__name__}") from None
    return check_grammar(gbnf)


# -- the schema, before conversion ---------------------------------------------------------------------------------

_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # values, not schemas: their keys mean nothing here
_COUNTS = (("minLength", "maxLength"), ("minItems", "maxItems"))


def _check_schema(schema: Any) -> None:
    """Refuse a schema nested deeper than the converter can recurse, or whose length or item counts are not
    whole numbers up to ``MAX_REPEAT``, naming where; walked without recursion, so any depth is answered."""
    todo = [(schema, "$", 1)]
    while todo:
        node, path, depth = todo.pop()
        if depth > MAX_SCHEMA_DEPTH:
            where = path if len(path) <= 60 else path[:57] + "..."
            raise InvalidInput(f"JSON Schema at {where}: nests more than {MAX_SCHEMA_DEPTH} levels deep, over the "
                               f"limit for constrained output; flatten it")
        if isinstance(node, dict):
            _check_counts(node, path)
            todo.extend((v, f"{path}.{k}", depth + 1) for k, v in node.items() if k not in _DATA_KEYWORDS)
        elif isinstance(node, list):
            todo.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))


def _check_counts(node: dict[str, Any], path: str) -> None:
    """The counts the converter turns into repetitions: string lengths and array sizes."""
    for low_key, high_key in _COUNTS:
        if low_key == "minLength" and node.get("type") != "string":
            continue
        if low_key == "minItems" and not isinstance(node.get("items"), dict):
            continue
        low, high = node.get(low_key, 0), node.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is None and key == high_key:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"JSON Schema at {path}: {key} must be a whole number of at least 0")
            if value > MAX_REPEAT:
                raise InvalidInput(f"JSON Schema at {path}: {key} {shown_count(value)} is over the limit of "
                                   f"{MAX_REPEAT} for constrained output; lower it")
        if high is not None and low > high:
            raise InvalidInput(f"JSON Schema at {path}: {low_key} {low} is more than {high_key} {high}; "
                               f"lower {low_key}")


# -- the converter, with flat repetitions --------------------------------------------------------------------------

def _flat_repetition(item_rule: str, min_items: int, max_items: int | None, separator_rule: str | None = None,
                     item_rule_is_literal: bool = False) -> str:
    """``item{min,max}`` rather than the converter's ``(item (item (item)?)?)?``, as llama.cpp's own converter
    writes it: the nested form makes llama.cpp's recursive parser go one level deeper per item, and 20,000 levels
    overflow a runner thread's stack. llama.cpp expands the flat form into a chain of rules, never deeper than one.
    ``item_rule_is_literal`` is taken for the converter's calls and unused: only the nested form folded a literal's
    copies into one long literal (a billion of them, for ``a{1000000000}``)."""
    if max_items is not None and max_items < min_items:
        raise ValueError(f"a repetition of at least {min_items} and at most {max_items} matches nothing")
    if max_items == 0:
        return ""
    if min_items == 0 and max_items == 1:
        return f"{item_rule}?"
    if not separator_rule:
        if max_items is None and min_items <= 1:
            return f"{item_rule}{'+' if min_items else '*'}"
        return f"{item_rule}{{{min_items},{'' if max_items is None else max_items}}}"
    rest = _flat_repetition(f"({separator_rule} {item_rule})", max(min_items - 1, 0),
                            None if max_items is None else max_items - 1)
    result = f"{item_rule} {rest}".rstrip()
    # ``( ... | )``, not ``( ... )?``: llama.cpp refuses to repeat, even optionally, a group that holds more than
    # MAX_REPEAT rules, and the chain inside holds one per optional item.
    return f"({result} | )" if min_items == 0 else result


# The converter calls this module-level function by name, so it is replaced there, once, for the whole process:
# the language of every grammar stays the same, only its shape changes (nothing else in slmops converts schemas).
converter._build_repetition = _flat_repetition
