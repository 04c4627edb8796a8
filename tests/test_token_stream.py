"""A request's output as tokens arrive (no model needed): a piece per token when streamed; for a request that is
not, the whole text and every log-probability with the final record, and the same answer either way."""

from slmops.engine.outputs import TokenLogprob
from slmops.engine.streams import TokenStream
from slmops.types.options import SamplingParams

TOKENS = [(1, "Hel"), (2, "lo"), (3, " wor"), (4, "ld"), (5, " ST"), (6, "OP"), (7, " after")]


def generate(whole: bool) -> list:
    got: list = []
    stream = TokenStream([9, 9, 9], SamplingParams(stop=(" STOP",)), got.append, whole=whole)
    stream.admitted()
    stream.first()
    for token, text in TOKENS:
        if stream.feed(token, text, TokenLogprob(text, -0.5, text.encode())):
            break
    stream.finish("stop")
    return got


def test_a_request_not_streamed_gets_its_answer_in_the_final_record_alone():
    streamed, whole = generate(False), generate(True)
    assert len(streamed) > 3 and not any(o.done for o in streamed[:-1])
    assert len(whole) == 1 and whole[0].done and whole[0].done_reason == "stop"
    assert whole[0].text == "".join(o.text for o in streamed) == "Hello world"  # the stop string held back
    assert whole[0].logprobs == tuple(lp for o in streamed for lp in o.logprobs)
    assert whole[0].stats.eval_count == streamed[-1].stats.eval_count == 6
    assert whole[0].context == streamed[-1].context
