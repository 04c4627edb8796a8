"""Fuzz tier for the Modelfile parser, which the server runs on text anyone with the manage right sends: whatever
the input, it returns a Modelfile or raises ModelfileError, in time linear in the input and with bounded memory.
The time bounds are loose (tens of times what a linear parse takes here) so a busy machine cannot fail them,
while the quadratic parser of before took seconds on the inputs below."""

import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.modelfile.parser import MAX_MODELFILE_CHARS, parse
from slmops.types.errors import ModelfileError

WORDS = ["FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "ADAPTER", "LICENSE", "from", "#", '"""', '"',
         "temperature", "stop", "num_ctx", "user", "assistant", "0.7", "1e999", "-1", "x.gguf", "smollm2:135m",
         "\\", "\t", " ", "\n", "\r\n", "\x00", "\u2028", "\ud800", "{{ .Prompt }}"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=12), max_size=60).map(" ".join))
def test_any_text_parses_or_is_a_modelfile_error(text):
    try:
        mf = parse(text)
    except ModelfileError as err:
        assert "\n" not in str(err)
    else:
        assert mf.from_


def _timed(text: str) -> tuple[float, int]:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        parse(text)
    except ModelfileError:
        pass
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak


@pytest.mark.parametrize("shape", ["comment lines", "blank lines", "parameters", "one open triple quote",
                                   "many short messages"])
def test_parsing_is_linear_and_bounded(shape):
    n = 20_000  # about 1 MB at most: the quadratic parser of before took tens of seconds on such input
    body = {"comment lines": "# just a comment line\n" * n, "blank lines": "\n" * n * 20,
            "parameters": "PARAMETER stop x\n" * n, "one open triple quote": 'SYSTEM """' + "y\n" * n,
            "many short messages": "MESSAGE user hi\n" * n}[shape]
    text = ("FROM smollm2:135m\n" + body)[:MAX_MODELFILE_CHARS]
    elapsed, peak = _timed(text)
    assert elapsed < 3.0, f"{shape}: {elapsed:.2f} s for {len(text)} characters"
    assert peak < 64 * len(text) + (8 << 20), f"{shape}: {peak} bytes for {len(text)} characters"


def test_a_modelfile_over_the_limit_is_refused_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ModelfileError, match="limit"):
        parse("# x\n" * (MAX_MODELFILE_CHARS // 2))
    assert time.perf_counter() - t0 < 1.0
