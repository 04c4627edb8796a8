import pytest

from slmops.modelfile import parse, render
from slmops.types.errors import ModelfileError

FULL = '''# a comment
from smollm2:135m
PARAMETER temperature 0.2
parameter stop "<|im_end|>"
PARAMETER stop User:
PARAMETER num_ctx 2048
TEMPLATE """{% for m in messages %}{{ m.content }}{% endfor %}"""
SYSTEM """You are
a pirate."""
MESSAGE user hi
MESSAGE assistant """Arr!"""
ADAPTER ./lora.gguf
LICENSE """MIT
text"""
'''


def test_parses_every_instruction_case_insensitively():
    mf = parse(FULL)
    assert mf.from_ == "smollm2:135m"
    assert mf.parameters == {"temperature": 0.2, "stop": ["<|im_end|>", "User:"], "num_ctx": 2048}
    assert mf.template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert mf.system == "You are\na pirate."
    assert mf.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr!"}]
    assert mf.adapters == ["./lora.gguf"] and mf.licenses == ["MIT\ntext"]


def test_render_round_trips():
    mf = parse(FULL)
    assert parse(render(mf)) == mf


@pytest.mark.parametrize("text,line,msg", [
    ("FROM x\nFOO bar", 2, "unknown instruction"),
    ("FROM x\n\nPARAMETER temperature hot", 3, 'must be a number'),
    ("FROM x\nSYSTEM \"\"\"never closed", 2, "unterminated"),
    ("FROM x\nMESSAGE robot hi", 2, "MESSAGE needs a role"),
    ("FROM x\nPARAMETER nope 1", 2, 'unknown option "nope"'),
    ("FROM x\nPARAMETER temperature", 2, "PARAMETER needs a name and a value"),
    ("FROM x\nFROM y", 2, "more than one FROM"),
    ('FROM x\nSYSTEM """a""" trailing', 2, "unexpected text"),
])
def test_errors_name_the_line(text, line, msg):
    with pytest.raises(ModelfileError, match=msg) as err:
        parse(text)
    assert err.value.line == line
    assert str(err.value).startswith(f"Modelfile line {line}:")


def test_missing_from():
    with pytest.raises(ModelfileError, match="no FROM line"):
        parse("SYSTEM hi\n")
