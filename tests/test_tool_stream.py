"""The tool-call splitter that lets answers with tools stream: text goes out at once, a call as soon as it is
complete, and the result never depends on where the stream was cut into pieces."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.engine.answers import collect
from slmops.engine.outputs import Output, ToolCall
from slmops.engine.tools import CallStream

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = ToolCall("get_weather", {"city": "Paris"})

ANSWERS = {
    "text": ("The sky is blue because of Rayleigh scattering.", [], "The sky is blue because of Rayleigh scattering."),
    "tagged": ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
               [CALL], "Let me check."),
    "two tagged": ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name": "get_weather",'
                   ' "arguments": {"city": "Paris"}}</tool_call>', [ToolCall("add", {"a": 1}), CALL], ""),
    "bare": ('  {"name": "get_weather", "arguments": {"city": "Paris"}}', [CALL], ""),
    "bare, string arguments": ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', [CALL], ""),
    "unknown function": ('{"name": "other", "arguments": {}}', [], '{"name": "other", "arguments": {}}'),
    "broken tag": ("<tool_call>{not json}</tool_call> ok", [], "<tool_call>{not json}</tool_call> ok"),
    "unclosed at the end": ('<tool_call>{"name": "add", "arguments": {"a": 2}}', [ToolCall("add", {"a": 2})], ""),
    "parameters for arguments": ('Sure. <tool_call>{"name": "add", "parameters": {"a": 3}}</tool_call>',
                                 [ToolCall("add", {"a": 3})], "Sure."),
    "braces later in text": ('Use {x} here', [], "Use {x} here"),
    "a lone angle bracket": ("a < b and <tool", [], "a < b and <tool"),
}


def run(pieces: list[str]) -> tuple[str, list, list[tuple[int, str]]]:
    """Feed pieces; returns the text, the calls, and when (after which piece) each output came."""
    stream = CallStream(TOOLS)
    text, calls, when = [], [], []
    for i, piece in enumerate(pieces):
        t, c = stream.feed(piece)
        text.append(t)
        calls += c
        when += [(i, "call")] * len(c) + ([(i, "text")] if t else [])
    t, c = stream.finish()
    text.append(t)
    calls += c
    return "".join(text), calls, when


def whole(pieces: list[str]) -> Output:
    """The answer the server gives unstreamed: each output split by one ``CallStream``, then collected."""
    outs = [Output(text=p) for p in pieces[:-1]] + [Output(text=pieces[-1], done=True, done_reason="stop")]
    return collect(map(CallStream(TOOLS).split, outs))


@pytest.mark.parametrize("kind", list(ANSWERS))
def test_whole_answers(kind):
    answer, calls, text = ANSWERS[kind]
    out = whole([answer])
    assert (list(out.tool_calls), out.text) == (calls, text)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(ANSWERS)), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_any_split_gives_what_the_whole_answer_gives(kind, cuts):
    answer, calls, _ = ANSWERS[kind]
    points = sorted({c % (len(answer) + 1) for c in cuts})
    pieces = [answer[a:b] for a, b in zip([0] + points, points + [len(answer)])]
    text, got, _ = run(pieces)
    assert got == calls
    if calls:
        assert text.strip() == ANSWERS[kind][2]
    else:
        assert text == answer
    collected = whole(pieces)  # streamed or not, the same answer
    assert (list(collected.tool_calls), collected.text) == (calls, ANSWERS[kind][2])


def test_text_streams_at_once_and_a_call_as_soon_as_it_closes():
    pieces = ["Let", " me", " check", ". <tool", "_call>{\"name\": \"get_weather\", ", "\"arguments\": {\"city\":",
              " \"Paris\"}}</tool_call>", " Done."]
    text, calls, when = run(pieces)
    assert calls == [CALL]
    assert when[0] == (0, "text") and (1, "text") in when  # not held back
    assert (6, "call") in when  # given out with the piece that closes it, not at the end
    assert text == "Let me check.  Done."


def test_split_keeps_one_output_per_piece_and_its_other_fields():
    stream = CallStream(TOOLS)
    first = stream.split(Output(text="<tool_call>", eval_count=3, logprobs=()))
    assert first.text == "" and first.tool_calls == () and first.eval_count == 3  # held back, still counted
    last = stream.split(Output(text='{"name": "add", "arguments": {}}</tool_call>', done=True, done_reason="stop",
                               context=(1, 2)))
    assert last.tool_calls == (ToolCall("add", {}),) and last.text == "" and last.context == (1, 2) and last.done
