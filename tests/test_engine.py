"""The real engine with the real default model."""

import concurrent.futures as cf
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from conftest import DEFAULT
from slmops.engine import Engine, Request, spec_from_store
from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel
from slmops.engine.llamacpp.model import LlamaDecoder
from slmops.engine.scheduler import Scheduler
from slmops.types import options as opts
from slmops.types.errors import ContextOverflow, InvalidInput, InvalidOption

GREEDY = {"temperature": 0, "num_predict": 24}
Q = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def engine():
    e = Engine(default_ctx=2048)
    yield e
    e.close()


@pytest.fixture(scope="module")
def spec(shared_store):
    return spec_from_store(shared_store, DEFAULT)


def collect(it):
    parts, final = [], None
    for out in it:
        parts.append(out.text)
        if out.done:
            final = out
    return "".join(parts), final


def test_greedy_is_identical_across_runs_and_engines(engine, spec):
    a, fa = collect(engine.run(spec, Request(messages=Q, options=GREEDY)))
    b, _ = collect(engine.run(spec, Request(messages=Q, options=GREEDY)))
    other = Engine(default_ctx=2048)
    try:
        c, _ = collect(other.run(spec, Request(messages=Q, options=GREEDY)))
    finally:
        other.close()
    assert a and a == b == c
    s = fa.stats
    assert s.prompt_eval_count > 10 and s.eval_count == 24 and fa.done_reason == "length"
    assert s.prompt_eval_duration > 0 and s.eval_duration > 0 and s.total_duration >= s.eval_duration


def test_num_predict_is_honoured(engine, spec):
    for n in (1, 5):
        _, final = collect(engine.run(spec, Request(messages=Q, options={"temperature": 0, "num_predict": n})))
        assert final.stats.eval_count == n and final.done_reason == "length"


def test_stop_sequence_cuts_output(engine, spec):
    full, _ = collect(engine.run(spec, Request(messages=Q, options=GREEDY)))
    word = full.split()[2]
    cut, final = collect(engine.run(spec, Request(messages=Q, options={**GREEDY, "stop": [word]})))
    assert word not in cut and full.startswith(cut) and final.done_reason == "stop"
    assert final.stats.eval_count < 24


def test_model_stops_at_end_of_turn(engine, spec):
    _, final = collect(engine.run(spec, Request(messages=[{"role": "user", "content": "Say OK."}],
                                                options={"temperature": 0, "num_predict": 200})))
    assert final.done_reason == "stop" and final.stats.eval_count < 200


def test_raw_generate_and_system_override(engine, spec):
    text, _ = collect(engine.run(spec, Request(prompt="The capital of France is", raw=True,
                                               options={"temperature": 0, "num_predict": 3})))
    assert "Paris" in text
    with pytest.raises(InvalidInput, match="empty prompt"):
        collect(engine.run(spec, Request(prompt="", raw=True)))


def test_prompt_longer_than_context_is_a_clear_error(engine, spec):
    long = "word " * 400  # llama.cpp rounds contexts up to a multiple of 256; the message gives the real size
    with pytest.raises(ContextOverflow, match=r"prompt is \d+ tokens but the context holds 256 \(num_ctx\)"):
        collect(engine.run(spec, Request(messages=[{"role": "user", "content": long}], options={"num_ctx": 256})))


def test_generation_stops_with_length_at_the_context_end(engine, spec):
    _, final = collect(engine.run(spec, Request(prompt="Count: 1, 2, 3,", raw=True,
                                                options={"num_ctx": 256, "temperature": 0, "num_predict": -1,
                                                         "repeat_penalty": 1.0})))
    assert final.done_reason == "length"
    assert 200 < final.stats.prompt_eval_count + final.stats.eval_count <= 256


def test_unknown_and_ill_typed_options_are_reported(engine, spec):
    with pytest.raises(InvalidOption, match='unknown option "temprature"'):
        engine.run(spec, Request(messages=Q, options={"temprature": 0}))
    with pytest.raises(InvalidOption, match='option "top_k" must be an integer'):
        engine.run(spec, Request(messages=Q, options={"top_k": "many"}))
    typed, ignored = opts.validate({"main_gpu": 0, "mirostat": 0, "temperature": "0.5", "num_gpu": 0})
    assert ignored == ["main_gpu", "mirostat"] and typed["temperature"] == 0.5 and typed["num_gpu"] == 0
    with pytest.raises(InvalidOption, match="num_gpu must be -1"):
        opts.to_load({"num_gpu": -5}, opts.LoadParams(num_ctx=512), 4096)
    assert opts.to_load({"num_gpu": 999}, opts.LoadParams(num_ctx=512, kv_type="q8_0"), 4096).num_gpu == 999


def test_threads_default_to_physical_cores():
    assert opts.LoadParams(num_ctx=512).threads == opts.physical_cores() >= 1


def test_chat_history_reuses_the_cached_prefix(engine, spec):
    first, _ = collect(engine.run(spec, Request(messages=Q, options=GREEDY)))
    history = Q + [{"role": "assistant", "content": first}, {"role": "user", "content": "And three more?"}]
    _, final = collect(engine.run(spec, Request(messages=history, options=GREEDY)))
    assert final.stats.cached_prompt_tokens > 10


# Counting after a shared preamble: a continuation greedy decoding is sure of, so batch-shape rounding cannot flip a
# token, and prompts that share a long prefix.
SHARED = "Numbers follow, one after another, separated by commas. " * 12
COUNT = {"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0}


def counting(*starts: int) -> list[str]:
    return [SHARED + ", ".join(str(i) for i in range(k, k + 6)) + "," for k in starts]


def count_on(engine: Engine, spec, prompt: str, options: dict = COUNT):
    return collect(engine.run(spec, Request(prompt=prompt, raw=True, options=options)))


def alone(spec, prompts: list[str], options: dict = COUNT) -> list[str]:
    """Each prompt's answer from an engine that serves nothing else."""
    out = []
    for p in prompts:
        fresh = Engine(default_ctx=1024, num_parallel=1)
        out.append(count_on(fresh, spec, p, options)[0])
        fresh.close()
    return out


def released_together(engine: Engine, spec, prompts: list[str], options: dict = COUNT):
    """Each prompt's (text, final record), the requests held at the runner until all are queued, so that they
    reach its scheduler in one step."""
    runner = engine.load_model(spec)[0].runner
    gate = threading.Event()
    with cf.ThreadPoolExecutor(len(prompts) + 1) as pool:
        held = pool.submit(runner.call, lambda: gate.wait(30))  # the runner waits between two steps
        futures = [pool.submit(count_on, engine, spec, p, options) for p in prompts]
        while runner._inbox.qsize() < len(prompts):  # all queued before the runner's next step
            time.sleep(0.01)
        gate.set()
        held.result()
        return [f.result() for f in futures]


def test_a_prefix_restored_from_host_memory_decodes_as_if_evaluated(spec):
    """A prefix evicted from the KV cache's spare sequences to host memory comes back by copy
    (``llama_state_seq_set_data``); greedy output must not change for it, nor when the copy cannot be made and the
    runner evaluates the cached tokens instead."""
    turns = counting(1, 300)
    expected = alone(spec, turns)

    def run(engine: Engine, prompt: str):
        return count_on(engine, spec, prompt)

    cached = Engine(default_ctx=1024, num_parallel=1)  # one spare sequence: the second prompt evicts the first
    try:
        assert run(cached, turns[0])[0] == expected[0]
        assert run(cached, turns[1])[0] == expected[1]  # turns[0] goes to host memory
        text, final = run(cached, turns[0])
        assert final.stats.cached_prompt_tokens == final.stats.prompt_eval_count - 1  # all of it, from the host
        assert text == expected[0]
        decoder = cached.load_model(spec)[0].runner.decoder  # llama.cpp keeps the host copies
        assert decoder._saved  # turns[1] went to host memory in its turn
        decoder._saved.clear()  # as if no copy could be made: the restore falls back to evaluating the tokens
        text, final = run(cached, turns[1])
        assert final.stats.cached_prompt_tokens == final.stats.prompt_eval_count - 1 and text == expected[1]
    finally:
        cached.close()


def test_requests_riding_along_with_one_prefill_decode_as_if_alone(spec):
    """Three prompts that share a long prefix reach the runner in one step: the shared part is evaluated once, as
    tokens that belong to all three sequences (one KV cell each, held by every sequence listed), and each answer is
    the one its prompt gets alone."""
    prompts = counting(1, 300, 5000)
    expected = alone(spec, prompts)
    together = Engine(default_ctx=1024, num_parallel=4)
    try:
        results = released_together(together, spec, prompts)
        runner = together.load_model(spec)[0].runner
        assert [text for text, _ in results] == expected and all(expected)
        cached = sorted(final.stats.cached_prompt_tokens for _, final in results)
        assert cached[0] == 0 and cached[1] == cached[2] > 100  # one evaluated the shared part, two rode along
        assert runner.steps == COUNT["num_predict"]  # all three prompts in the first step, then one per token
        assert runner.max_batch == 3  # sequences, not items: the shared chunk and the leader's own tokens are two
    finally:
        together.close()


def test_finished_riders_stay_in_the_kv_tier_together(spec):
    """Three prompts ride one prefill of their shared preamble; when they finish, the KV tier (one context: 256
    cells here) keeps all three, because it counts the preamble's cells once: counted per entry they would need
    ~480 and two would go to host memory. Each answer is the one its prompt gets alone."""
    prompts = counting(1, 300, 5000)
    expected = alone(spec, prompts)
    together = Engine(default_ctx=256, num_parallel=4)
    try:
        results = released_together(together, spec, prompts)
        assert [text for text, _ in results] == expected and all(expected)
        runner = together.load_model(spec)[0].runner
        runner.call(lambda: None)  # the finished sequences' moves into the cache have run
        entries = list(runner.scheduler.cache.entries.values())
        assert len(entries) == 3 and sum(len(e.tokens) for e in entries) > 256 >= runner.scheduler.cache.used_tokens
        assert not runner.decoder._saved  # nothing went to host memory
    finally:
        together.close()

def test_prompts_arriving_together_get_first_tokens_one_step_apart(spec):
    """Three short unrelated prompts reach the runner in one step. One step's token budget holds all three, but a
    step finishes at most one prompt: the second's first token would otherwise wait for the third's evaluation,
    which brings the third's no sooner. So each prompt is evaluated in the step after the one before, beside the
    decodes of those already answered, and each answer is the one its prompt gets alone."""
    options = {**COUNT, "num_predict": 3}
    prompts = [", ".join(str(i) for i in range(k, k + 8)) + "," for k in (1, 300, 5000)]
    expected = alone(spec, prompts, options)
    together = Engine(default_ctx=1024, num_parallel=4)
    try:
        results = released_together(together, spec, prompts, options)
        runner = together.load_model(spec)[0].runner
        assert [text for text, _ in results] == expected and all(expected)
        assert all(final.stats.cached_prompt_tokens == 0 for _, final in results)  # nothing shared to reuse
        # prompts in steps 1, 2 and 3, each followed by its two decodes: 5 steps (all three in step 1: 3 steps)
        assert runner.steps == 5
        assert runner.max_batch == 3  # step 3: the first's last decode, the second's, the third's prompt
    finally:
        together.close()


def test_a_rider_whose_leader_is_cancelled_decodes_as_if_alone(spec):
    """The scheduler and llama.cpp's context driven step by step: a prompt rides along with another's prefill for
    a chunk (cells held by both sequences), the leader is cancelled, and the rider evaluates the rest of its
    prompt on its own from the cells it holds; its greedy answer is the one it gets alone."""
    model = LlamaModel(str(spec.model_path))
    prompts = [model.tokenize(p) for p in counting(1, 300)]

    def answer(reqs: dict[int, list[int]], cancel_after: int = 0) -> list[int]:
        ctx = LlamaContext(model, opts.LoadParams(num_ctx=1024, num_batch=128), n_seq_max=2)
        decoder, s = LlamaDecoder(model, ctx), Scheduler(2, 1024, token_budget=128)
        for r, prompt in reqs.items():
            s.add(r, prompt)
        out, steps = [], 0
        try:
            while len(out) < 8:
                batch = s.schedule()
                for op in batch.ops:
                    decoder.memory(op)
                decoder.decode(batch.items)
                sampled, end = {}, -1
                for item in batch.items:
                    end += len(item.tokens)
                    if item.sample:
                        sampled[item.req_id] = int(np.argmax(ctx.logits(end)))
                s.update(batch, sampled)
                out += [sampled[1]] if 1 in sampled else []
                steps += 1
                if steps == cancel_after:
                    assert s.running[1].leader is s.running[0]  # still riding
                    s.cancel(0)
            return out
        finally:
            ctx.close()

    try:
        alone = answer({1: prompts[1]})
        assert answer({0: prompts[0], 1: prompts[1]}, cancel_after=1) == alone
        assert model.detokenize(alone).startswith(" 306, 30")  # it counts on from 305
    finally:
        model.close()


def test_closing_the_stream_cancels_and_the_next_request_is_unaffected(engine, spec):
    expected, _ = collect(engine.run(spec, Request(messages=Q, options=GREEDY)))
    it = engine.run(spec, Request(messages=Q, options={"temperature": 0, "num_predict": 200}))
    next(it)
    next(it)
    it.close()
    again, _ = collect(engine.run(spec, Request(messages=Q, options=GREEDY)))
    assert again == expected


def test_seeded_sampling_is_reproducible(engine, spec):
    o = {"temperature": 0.9, "seed": 42, "num_predict": 16}
    a, _ = collect(engine.run(spec, Request(messages=Q, options=o)))
    b, _ = collect(engine.run(spec, Request(messages=Q, options=o)))
    assert a == b


def test_greedy_picks_the_token_llama_cpps_greedy_sampler_picks(spec):
    """Greedy sampling is an argmax in Python; at every step it names the token llama.cpp's own chain names."""
    import llama_cpp as lc
    import numpy as np

    from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel, SamplerChain
    model = LlamaModel(spec.model_path)
    ctx = LlamaContext(model, opts.LoadParams(num_ctx=512))
    ref = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(ref, lc.llama_sampler_init_greedy())
    prompt = model.tokenize("Once upon a time, in a land far away,", add_special=True, parse_special=True)
    chain = SamplerChain(model, opts.SamplingParams(temperature=0, repeat_penalty=1.0), 512, prompt)
    try:
        n = len(prompt)
        want = np.zeros(n, dtype=np.int8)
        want[-1] = 1
        ctx.decode_batch(np.array(prompt, dtype=np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32), want)
        idx, picks = n - 1, []
        for pos in range(n, n + 48):
            ours, theirs = chain.sample(ctx, idx), lc.llama_sampler_sample(ref, ctx.ptr, idx)
            picks.append((ours, theirs))
            ctx.decode_batch(np.array([ours], np.int32), np.array([pos], np.int32), np.zeros(1, np.int32),
                             np.ones(1, np.int8))
            idx = 0
        assert all(a == b for a, b in picks) and len({a for a, _ in picks}) > 5
    finally:
        chain.close()
        lc.llama_sampler_free(ref)
        ctx.close()
        model.close()


@pytest.mark.parametrize("params", [
    {"repeat_penalty": 1.5, "repeat_last_n": 64},
    {"repeat_penalty": 1.0, "frequency_penalty": 0.8, "presence_penalty": 0.6, "repeat_last_n": 16},
    {"repeat_penalty": 1.3, "repeat_last_n": -1, "temperature": 0.8, "seed": 7},
])
def test_penalties_on_the_window_match_llama_cpps_penalties_sampler(spec, params):
    """The same tokens as llama.cpp's own penalties sampler at the head of an otherwise identical chain (and, for
    greedy sampling, its greedy sampler in place of the argmax)."""
    import llama_cpp as lc
    import numpy as np

    from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel, SamplerChain
    model = LlamaModel(spec.model_path)
    ctx = LlamaContext(model, opts.LoadParams(num_ctx=512))
    sampling = opts.SamplingParams(**{"temperature": 0, **params})
    prompt = model.tokenize("The cat sat on the mat. The cat sat on the mat. The cat", add_special=True,
                            parse_special=True)
    last_n = 512 if sampling.repeat_last_n == -1 else sampling.repeat_last_n

    def reference() -> SamplerChain:
        chain = SamplerChain(model, sampling, 512, prompt)
        ref = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(ref, lc.llama_sampler_init_penalties(
            model.n_vocab, last_n, sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty))
        for t in prompt[-last_n:]:
            lc.llama_sampler_accept(ref, t)
        for _ in range(lc.llama_sampler_chain_n(chain.ptr)):  # then the same samplers, moved over
            lc.llama_sampler_chain_add(ref, lc.llama_sampler_chain_remove(chain.ptr, 0))
        chain.close()
        chain.ptr, chain._window, chain._greedy = ref, None, False  # llama.cpp applies the penalties and picks
        return chain

    def generate(chain: SamplerChain) -> list[int]:
        ctx.seq_drop(0)
        n = len(prompt)
        want = np.zeros(n, dtype=np.int8)
        want[-1] = 1
        ctx.decode_batch(np.array(prompt, dtype=np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32), want)
        out, idx = [], n - 1
        for pos in range(n, n + 40):
            tok = chain.sample(ctx, idx)
            out.append(tok)
            ctx.decode_batch(np.array([tok], np.int32), np.array([pos], np.int32), np.zeros(1, np.int32),
                             np.ones(1, np.int8))
            idx = 0
        chain.close()
        return out

    try:
        ours = generate(SamplerChain(model, sampling, 512, prompt))
        assert ours == generate(reference())
        plain = replace(sampling, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
        assert ours != generate(SamplerChain(model, plain, 512, prompt))  # the penalties did change something
    finally:
        ctx.close()
        model.close()


def test_greedy_with_penalties_picks_the_penalized_argmax_whether_or_not_the_top_token_is_in_the_window(spec):
    """Greedy sampling with penalties that only lower logits takes the plain argmax when that token is outside the
    window and applies the penalties otherwise; both give the argmax of the penalized logits."""
    import numpy as np

    from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel, SamplerChain
    model = LlamaModel(spec.model_path)
    ctx = LlamaContext(model, opts.LoadParams(num_ctx=512))
    window = [5, 17, 300, 301, 302]
    sampling = opts.SamplingParams(temperature=0, repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1,
                                   repeat_last_n=8)
    chain = SamplerChain(model, sampling, 512, window + [17])
    try:
        ctx.decode_batch(np.array([1, 2], np.int32), np.arange(2, dtype=np.int32), np.zeros(2, np.int32),
                         np.array([0, 1], np.int8))
        logits = ctx.logits(1)
        rng = np.random.default_rng(3)
        picks = []
        for k, top in enumerate((17, 300, 9000, 5, 12345)):  # in the window, in it, outside, slid out, outside
            counts = dict(chain._counts)
            logits[:] = rng.normal(0, 0.5, logits.size)
            logits[top] = 6.0
            logits[20000 + k] = 5.0  # a runner-up outside the window: wins when the top token is penalized
            expected = logits.copy()
            for t, c in counts.items():
                v = expected[t]
                expected[t] = (v * 1.3 if v <= 0 else v / 1.3) - c * 0.2 - 0.1
            before = logits.copy()
            picks.append(chain.sample(ctx, 1))
            assert picks[-1] == int(expected.argmax())
            assert np.array_equal(logits, before)  # the logits are left as they were
        assert picks == [20000, 20001, 9000, 5, 12345]
    finally:
        chain.close()
        ctx.close()
        model.close()


def test_logits_follow_the_rows_each_step_asks_for(spec):
    """Each step's logits view names its own row, as the output buffer grows and shrinks between steps; a row the
    step did not compute is a clear error."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    from slmops.engine.llamacpp.bindings import LlamaContext, LlamaModel
    from slmops.types.errors import EngineError
    model = LlamaModel(spec.model_path)
    ctx = LlamaContext(model, opts.LoadParams(num_ctx=512), n_seq_max=4)
    try:
        for n_out in (1, 4, 64, 2):
            ctx.seq_drop(0)
            toks = np.arange(100, 164, dtype=np.int32)
            want = np.zeros(64, np.int8)
            want[-n_out:] = 1
            ctx.decode_batch(toks, np.arange(64, dtype=np.int32), np.zeros(64, np.int32), want)
            for i in range(64 - n_out, 64):
                ptr = lc.llama_get_logits_ith(ctx.ptr, i)
                ref = np.ctypeslib.as_array(ptr, shape=(model.n_vocab,))
                view = ctx.logits(i)
                assert view.ctypes.data == ctypes.addressof(ptr.contents) and np.array_equal(view, ref)
            if n_out < 64:
                with pytest.raises(EngineError, match="no logits"):
                    ctx.logits(64 - n_out - 1)
    finally:
        ctx.close()
        model.close()
