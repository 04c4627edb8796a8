"""Schema preparation for constrained output (no model needed)."""

import pytest

from slmops.engine.backend import tool_call_schema
from slmops.engine.llamacpp.grammar import enforceable, for_format
from slmops.engine.tools import prepare_messages
from slmops.types.errors import InvalidInput


def test_bounded_integer_becomes_enum_and_other_bounds_are_refused():
    s = enforceable({"type": "object", "properties": {"age": {"type": "integer", "minimum": 1, "maximum": 3}}})
    assert s["properties"]["age"] == {"enum": [1, 2, 3]}
    s = enforceable({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3})
    assert s == {"enum": [1, 2]}
    with pytest.raises(InvalidInput, match=r"\$.properties.p: minimum cannot be enforced"):
        enforceable({"properties": {"p": {"type": "number", "minimum": 0}}})
    with pytest.raises(InvalidInput, match="maximum"):
        enforceable({"type": "integer", "minimum": 0, "maximum": 10 ** 6})


def test_formats():
    assert for_format(None) is None and for_format("") is None
    assert "root" in for_format("json") and "root" in for_format({"type": "object"})
    with pytest.raises(InvalidInput):
        for_format("yaml")


def test_tool_call_schema_and_named_choice():
    tools = [{"function": {"name": "a", "parameters": {"type": "object"}}},
             {"function": {"name": "b", "parameters": {"type": "object"}}}]
    assert len(tool_call_schema(tools)["anyOf"]) == 2
    assert tool_call_schema(tools, "b")["properties"]["name"] == {"const": "b"}
    with pytest.raises(InvalidInput, match='"c", which is not among the tools'):
        tool_call_schema(tools, "c")


def test_tools_are_described_when_the_template_cannot():
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "assistant", "content": "",
                                                         "tool_calls": [{"function": {"name": "get",
                                                                                      "arguments": {}}}]}]
    out = prepare_messages(msgs, [{"function": {"name": "get"}}], "{{ messages }}")
    assert out[0]["content"].startswith("Be nice.") and "<tool_call>" in out[0]["content"]
    assert out[1]["content"] == '<tool_call>{"name": "get", "arguments": {}}</tool_call>'
    assert prepare_messages(msgs, [], "{% if tools %}{% endif %}") == msgs


def test_string_grammar_excludes_raw_control_characters():
    """JSON forbids raw newlines in strings; the converter's looser rule must have been tightened."""
    g = for_format({"type": "object", "properties": {"s": {"type": "string"}}})
    char_rule = next(line for line in g.splitlines() if line.startswith("char ::="))
    assert "\\x00-\\x1F" in char_rule
