"""The batching scheduler and the prefix cache, with made-up tokens and no model (as vLLM tests its scheduler)."""

import pytest
from hypothesis import given, settings, strategies as st

from slmops.engine.prefix_cache import PrefixCache
from slmops.engine.scheduler import Batch, Finished, MemOp, Scheduler
from slmops.types.errors import Busy, ContextOverflow


def step(s: Scheduler, token: int = 7):
    """Run one step, sampling ``token`` for everything that wants a sample."""
    batch = s.schedule()
    sampled = {i.req_id: token for i in batch.items if i.sample}
    return batch, s.update(batch, sampled)


def test_admission_up_to_slots_and_queue_bound():
    s = Scheduler(n_slots=2, n_ctx_seq=64, token_budget=100, max_queue=2)
    for r in range(2):
        s.add(r, [1, 2, 3])
    batch, _ = step(s)
    assert set(s.running) == {0, 1} and [i.req_id for i in batch.items] == [0]  # one prompt finishes per step
    s.add(2, [1, 2, 3])
    s.add(3, [1])
    assert step(s)[0].items and [q.req_id for q in s.waiting] == [2, 3]  # no free slot
    with pytest.raises(Busy):  # two already wait
        s.add(4, [1])
    none_waiting = Scheduler(n_slots=1, n_ctx_seq=64, max_queue=0)
    none_waiting.add(0, [1])  # a free slot: it runs, it does not wait
    with pytest.raises(Busy):
        none_waiting.add(1, [1])
    s.finish(0)
    batch, _ = step(s)
    assert 2 in {i.req_id for i in batch.items}  # a freed slot admits the next in line


def test_prompt_over_context_is_refused():
    s = Scheduler(n_slots=1, n_ctx_seq=8)
    with pytest.raises(ContextOverflow, match="prompt is 8 tokens but the context holds 8"):
        s.add(0, list(range(8)))


def test_decode_tokens_come_first_and_prefill_is_chunked_by_budget():
    s = Scheduler(n_slots=4, n_ctx_seq=4096, token_budget=16)
    s.add(0, [1, 2, 3])
    step(s)  # request 0 prefilled, now decoding
    s.add(1, list(range(100, 140)))  # a 40-token prompt
    chunks = []
    while 1 not in s.running or s.running[1].state.value != "decode":
        batch, _ = step(s)
        assert batch.n_tokens <= 16
        assert batch.items[0].req_id == 0 and len(batch.items[0].tokens) == 1  # the stream is never stalled
        chunks += [len(i.tokens) for i in batch.items if i.req_id == 1]
    assert chunks == [15, 15, 10] and sum(chunks) == 40


def test_positions_and_sampling_flags_follow_the_sequence():
    s = Scheduler(n_slots=1, n_ctx_seq=64, token_budget=4)
    s.add(0, [1, 2, 3, 4, 5, 6])
    b1, _ = step(s)
    assert b1.items[0].tokens == (1, 2, 3, 4) and b1.items[0].pos0 == 0 and not b1.items[0].sample
    b2, _ = step(s, token=9)
    assert b2.items[0].tokens == (5, 6) and b2.items[0].pos0 == 4 and b2.items[0].sample
    b3, _ = step(s)
    assert b3.items[0].tokens == (9,) and b3.items[0].pos0 == 6


def test_max_new_and_context_end_finish_with_length():
    s = Scheduler(n_slots=2, n_ctx_seq=10, token_budget=64)
    s.add(0, [1, 2, 3], max_new=2)
    s.add(1, [1, 2, 3, 4, 5, 6, 7])
    finished = []
    for _ in range(6):
        finished += step(s)[1]
    assert Finished(0, "length") in finished and Finished(1, "length") in finished
    assert s.running == {} and sorted(s.free_slots) == [0, 1]


def test_cancel_waiting_and_running_frees_the_slot():
    s = Scheduler(n_slots=1, n_ctx_seq=64)
    s.add(0, [1, 2])
    s.add(1, [3, 4])
    step(s)
    assert s.cancel(1) == Finished(1, "cancelled") and not s.waiting
    assert s.cancel(0) == Finished(0, "cancelled") and s.free_slots == [0]
    batch = s.schedule()
    assert MemOp("drop", 0) in batch.ops and not batch.items
    assert s.cancel(42) is None


def test_finished_sequence_is_cached_and_reused_by_the_next_request():
    cache = PrefixCache(slots=[8, 9], budget_tokens=1000)
    s = Scheduler(n_slots=2, n_ctx_seq=256, token_budget=512, cache=cache)
    system = list(range(1000, 1100))  # a shared 100-token system prompt
    s.add(0, system + [1, 2, 3])
    step(s)
    s.finish(0)
    s.add(1, system + [4, 5])
    batch = s.schedule()
    slot = s.running[1].slot
    assert batch.ops == [MemOp("copy", 0, 8, 103), MemOp("drop", 0),  # the finished sequence went to slot 8 ...
                         MemOp("copy", 8, slot, 100)]  # ... and the new request starts from its 100 shared tokens
    item = next(i for i in batch.items if i.req_id == 1)
    assert item.tokens == (4, 5) and item.pos0 == 100 and s.running[1].cached == 100


def test_identical_prompt_still_evaluates_one_token():
    cache = PrefixCache(slots=[5], budget_tokens=100)
    s = Scheduler(n_slots=1, n_ctx_seq=64, cache=cache)
    s.add(0, [1, 2, 3, 4])
    step(s)
    s.finish(0)
    s.add(1, [1, 2, 3, 4])
    batch = s.schedule()
    item = batch.items[0]
    assert item.tokens == (4,) and item.pos0 == 3 and item.sample


def test_prefix_cache_match_split_and_lru_eviction():
    c = PrefixCache(slots=[1, 2], budget_tokens=10)
    assert c.insert([1, 2, 3, 4]) == (1, [], [])
    assert c.insert([1, 2, 9]) == (2, [], [])
    assert c.match([1, 2, 3, 4, 5]) == (1, 4)
    assert c.match([1, 2, 9, 9]) == (2, 3)
    assert c.match([1, 2, 7])[1] == 2
    assert c.match([5]) == (None, 0)
    c.match([1, 2, 9])  # slot 2 is now the most recently used
    slot, _, evicted = c.insert([7, 7, 7, 7, 7])  # needs room: the least recently used (slot 1) goes
    assert [(e.slot, e.tokens) for e in evicted] == [(1, (1, 2, 3, 4))] and slot == 1 and c.used_tokens == 8
    assert c.match([1, 2, 3, 4])[0] == 2  # only the shared [1, 2] prefix remains, in slot 2
    assert c.insert([1, 2, 9]) == (None, [], [])  # already cached whole: not stored twice
    assert c.insert(list(range(11))) == (None, [], [])  # larger than the whole budget


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=12))
def test_prefix_cache_matches_agree_with_brute_force(seqs):
    c = PrefixCache(slots=list(range(4)), budget_tokens=16)
    for seq in seqs:
        c.insert(seq)
        for probe in seqs:
            slot, n = c.match(probe)
            best = max((sum(1 for _ in _common(e.tokens, probe)) for e in c.entries.values()), default=0)
            assert n == best
            if slot is not None:
                assert list(c.entries[slot].tokens[:n]) == probe[:n]
        assert c.used_tokens <= 16 and len(c.entries) + len(c.free) == 4


def _common(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def test_a_new_request_shares_the_prefix_a_running_sequence_holds():
    s = Scheduler(n_slots=3, n_ctx_seq=4096, token_budget=512)
    system = list(range(1000, 1300))
    s.add(0, system + [1, 2])
    while 0 not in s.running or s.running[0].state.value != "decode":
        step(s)
    s.add(1, system + [5, 6, 7])
    batch, _ = step(s)
    assert MemOp("copy", s.running[0].slot, s.running[1].slot, 300) in batch.ops
    first = next(i for i in batch.items if i.req_id == 1)
    assert first.tokens == (5, 6, 7) and first.pos0 == 300 and s.running[1].cached == 300


def prompt_work(s: Scheduler, reqs) -> tuple[dict[int, int], dict[int, int], list[Batch]]:
    """Step until every request in ``reqs`` decodes: prompt tokens each evaluated as its own, the step at which
    each got its first token, and the batches."""
    evaluated, first, batches = {r: 0 for r in reqs}, {}, []
    while any(r not in s.running or s.running[r].state.value != "decode" for r in reqs):
        batch, _ = step(s)
        batches.append(batch)
        for i in batch.items:
            if i.pos0 < len(s.running[i.req_id].prompt):  # prompt tokens, not decode steps
                evaluated[i.req_id] += len(i.tokens)
            if i.sample:
                first.setdefault(i.req_id, len(batches))
    return evaluated, first, batches


def test_requests_arriving_together_evaluate_their_shared_prompt_once_and_finish_together():
    s = Scheduler(n_slots=4, n_ctx_seq=4096, token_budget=256)
    system = list(range(1000, 1600))  # three steps of prefill
    for r in range(3):
        s.add(r, system + [r])
    s.add(9, list(range(5000, 5100)))  # unrelated: never held back
    evaluated, first, batches = prompt_work(s, (0, 1, 2, 9))
    assert evaluated[0] == 601 and evaluated[9] == 100
    assert evaluated[1] == evaluated[2] == 1  # each evaluated only its own last token
    slots = {r: s.running[r].slot for r in (1, 2)}
    shared = [i for b in batches for i in b.items if i.also]
    assert sum(len(i.tokens) for i in shared) == 600 and all(set(i.also) == set(slots.values()) for i in shared)
    assert first[0] == first[1] == first[2]  # the riders' own tokens come in the step that ends the shared part
    assert not [op for b in batches for op in b.ops if op.kind == "copy"]  # they rode from the first chunk


def test_a_request_arriving_mid_prefill_copies_what_exists_and_rides_along_for_the_rest():
    s = Scheduler(n_slots=3, n_ctx_seq=4096, token_budget=256)
    system = list(range(1000, 1600))
    s.add(0, system + [0])
    step(s)  # 256 tokens of it exist
    s.add(1, system[:500] + [7, 8])  # shares 500 tokens
    batch, _ = step(s)
    rider = s.running[1]
    assert MemOp("copy", s.running[0].slot, rider.slot, 256) in batch.ops
    # the leader's chunk is cut where the shared part ends; the rider's own tokens follow in the same step
    assert [(i.req_id, i.pos0, len(i.tokens), i.also) for i in batch.items] == [
        (0, 256, 244, (rider.slot,)), (0, 500, 10, ()), (1, 500, 2, ())]
    assert rider.state.value == "decode" and rider.cached == 500 and batch.riders == [1]


def test_riders_of_a_cancelled_prefill_go_on_from_the_cells_they_have():
    s = Scheduler(n_slots=3, n_ctx_seq=4096, token_budget=128)
    system = list(range(1000, 1400))
    for r in range(2):
        s.add(r, system + [r])
    step(s)
    assert s.running[1].leader is s.running[0] and s.running[1].n_kv == 128
    leader_cells = s.running[0].spans(128)
    s.cancel(0)
    assert s.running[1].cached == 128  # what it holds without having evaluated it
    assert s.running[1].spans(130) == leader_cells + ((s.running[1].origin, 128, 130),)  # its own from there
    evaluated, _, batches = prompt_work(s, (1,))
    assert evaluated[1] == 401 - 128  # the rest of its prompt, from where its shared cells end
    assert batches[0].items[0].pos0 == 128 and not any(i.also for b in batches for i in b.items)


def test_chat_turns_arriving_together_get_their_first_tokens_one_step_apart():
    """Three short prompts arriving in one step: each finishes in its own step, so the first gets its token after
    its own work rather than after all three (the total before the last is the same)."""
    s = Scheduler(n_slots=4, n_ctx_seq=4096, token_budget=512)
    for r in range(3):
        s.add(r, list(range(100 * r, 100 * r + 27)))
    _, first, batches = prompt_work(s, (0, 1, 2))
    assert sorted(first.values()) == [1, 2, 3]
    assert [b.n_tokens for b in batches] == [27, 28, 29]  # each step: one prompt and the streams already running


def test_a_short_shared_prefix_does_not_hold_a_request_back():
    s = Scheduler(n_slots=2, n_ctx_seq=4096, token_budget=256)
    s.add(0, list(range(200)))
    s.add(1, list(range(10)) + [9999] * 50)  # shares only 10 tokens
    batch, _ = step(s)
    assert [i.req_id for i in batch.items] == [1]  # not held for request 0's prefill: the shorter goes first


def first_token_steps(s: Scheduler, reqs: list[int]) -> dict[int, int]:
    """Step until every request in ``reqs`` has sampled its first token; the step (1-based) at which each did,
    and the tokens each step evaluated (a step's time is about its token count)."""
    first, cost = {}, []
    while len(first) < len(reqs):
        batch, _ = step(s)
        cost.append(batch.n_tokens)
        for i in batch.items:
            if i.sample and i.req_id not in first:
                first[i.req_id] = sum(cost)
    return first


def test_the_shortest_prompt_goes_first_and_a_finishing_step_carries_no_partial_chunk():
    """Two system prompts, four clients each, arriving together (S3 of bench/serve_bench.py): the first prompt's
    clients get their first token after one prefill, not after both are interleaved."""
    s = Scheduler(n_slots=8, n_ctx_seq=4096, token_budget=512)
    a, b = list(range(1000, 1650)), list(range(5000, 5650))
    for r in range(8):
        s.add(r, (a if r % 2 == 0 else b) + [r])
    done_after = first_token_steps(s, list(range(8)))  # tokens evaluated when each got its first token
    assert max(done_after[r] for r in (0, 2, 4, 6)) < 700 + 8  # a's clients: a's prefill and their own tokens
    assert min(done_after[r] for r in (1, 3, 5, 7)) > 1300  # b's clients: after both prefills
    # interleaved (the whole budget every step), a's clients would wait for ~1,000 tokens of work


def test_a_long_prompt_is_not_starved_by_a_stream_of_short_ones():
    s = Scheduler(n_slots=4, n_ctx_seq=4096, token_budget=64)
    s.add(0, list(range(1000, 1500)))  # 500 tokens: eight steps of 64
    steps, short = 0, 100
    while s.running.get(0) is None or s.running[0].state.value != "decode":
        s.add(short, [short, short + 1])  # a new short request every step
        short += 2
        step(s)
        for r in [r for r, q in s.running.items() if r != 0 and q.state.value == "decode"]:
            s.finish(r)
        steps += 1
        assert steps < 100
    assert steps <= 8 * (Scheduler.MAX_PASSED + 1) + 1  # it goes first after MAX_PASSED steps left out


def test_a_chat_turn_supersedes_the_cached_previous_turn():
    c = PrefixCache(slots=[1, 2, 3], budget_tokens=100)
    assert c.insert([1, 2, 3]) == (1, [], [])
    assert c.insert([1, 2, 3, 4, 5]) == (2, [1], [])  # extends entry 1, which can serve nothing it cannot
    assert c.match([1, 2, 3, 9]) == (2, 3) and c.used_tokens == 5
    assert c.insert([1, 2]) == (None, [], [])  # held whole inside entry 2


class Reused(PrefixCache):
    """Every entry counts as reused (only those spill): these tests follow where spilled entries go."""

    def insert(self, tokens, reused=False, evict_reused=True, cells=()):
        return super().insert(tokens, True, evict_reused, cells)


def test_evicted_prefixes_spill_to_host_memory_and_come_back():
    s = Scheduler(n_slots=2, n_ctx_seq=256, cache=Reused(slots=[2, 3], budget_tokens=12),
                  spill=PrefixCache(slots=[70, 71], budget_tokens=12))
    ops = []
    for req, prompt in enumerate([list(range(8)), list(range(100, 108)), list(range(200, 208))]):
        s.add(req, prompt)
        ops += step(s)[0].ops
        s.finish(req)
    ops += s.schedule().ops
    # each finished sequence went to a spare slot; the KV tier holds 12 tokens, so the oldest spilled to host
    # memory (saved, then its cells freed), and the host tier, 12 tokens too, let go of the oldest there
    assert [(op.kind, op.src, op.dst) for op in ops] == [
        ("copy", 0, 2), ("drop", 0, -1),
        ("save", 2, 70), ("drop", 2, -1), ("copy", 1, 3), ("drop", 1, -1),
        ("forget", 70, -1), ("save", 3, 71), ("drop", 3, -1), ("copy", 0, 2), ("drop", 0, -1)]
    s.add(3, list(range(100, 104)) + [1, 2])  # only host memory holds its first 4 tokens
    batch, _ = step(s)
    assert batch.ops == [MemOp("restore", 71, s.running[3].slot, 4, (100, 101, 102, 103))]
    assert s.running[3].cached == 4
    s.add(4, list(range(200, 206)) + [9])  # the KV tier holds 6 of them: a copy, no restore
    batch, _ = step(s)
    assert batch.ops == [MemOp("copy", 2, s.running[4].slot, 6)]


def test_a_cached_turn_makes_host_copies_of_its_earlier_turns_redundant():
    s = Scheduler(n_slots=1, n_ctx_seq=256, cache=Reused(slots=[1], budget_tokens=8),
                  spill=PrefixCache(slots=[50, 51], budget_tokens=100))
    s.add(0, [1, 2, 3])
    step(s)
    s.finish(0)
    s.add(1, [9, 9, 9])  # evicts [1, 2, 3] to host memory
    step(s)
    s.finish(1)
    s.add(2, [1, 2, 3, 4, 5])  # the next turn: restored from host memory, then cached in the KV tier
    ops = step(s)[0].ops
    assert ops[-1].kind == "restore"
    s.finish(2)
    ops = s.schedule().ops
    assert MemOp("forget", 50) in ops and [e.tokens for e in s.spill.entries.values()] == [(9, 9, 9)]


def test_only_reused_prefixes_spill_to_host_memory():
    """A one-off prompt evicted from the KV tier is dropped; one a later request started from (or a chat turn that
    continued a cached one) is kept in host memory."""
    s = Scheduler(n_slots=1, n_ctx_seq=256, cache=PrefixCache(slots=[1], budget_tokens=8),
                  spill=PrefixCache(slots=[50, 51], budget_tokens=100))
    for req, prompt in enumerate([[1, 2, 3], [7, 7, 7]]):  # the second evicts the first, never reused
        s.add(req, prompt)
        step(s)
        s.finish(req)
    ops = s.schedule().ops
    assert not any(op.kind == "save" for op in ops) and not s.spill.entries
    s.add(2, [7, 7, 7, 8])  # starts from the cached [7, 7, 7]: that entry is now reused
    step(s)
    s.finish(2)
    s.add(3, [4, 4, 4])  # once cached, evicts the chat turn [7, 7, 7, 8] (it continued a cached prefix): spilled
    step(s)
    s.finish(3)
    assert MemOp("save", 1, 50, 4) in s.schedule().ops
    assert [e.tokens for e in s.spill.entries.values()] == [(7, 7, 7, 8)]


def test_a_long_prefill_moves_unreused_cached_prefixes_to_host_memory():
    """In llama.cpp's unified KV cache each prompt token's attention passes over every cached cell, masked or not:
    before a long prefill, the prefixes no request has reused leave the KV tier for host memory. A reused one stays,
    and a short prompt moves nothing."""
    s = Scheduler(n_slots=2, n_ctx_seq=1024, token_budget=512, cache=PrefixCache(slots=[2, 3, 4], budget_tokens=1000),
                  spill=PrefixCache(slots=[50, 51], budget_tokens=300))
    one_off, chat = list(range(1000, 1200)), list(range(2000, 2100))
    for req, prompt in enumerate([one_off, chat, chat + [5]]):  # the third continues the second: reused
        s.add(req, prompt)
        step(s)
        s.finish(req)
    assert sorted(len(e.tokens) for e in s.cache.entries.values()) == [101, 200]  # the short prompts moved nothing
    s.add(3, list(range(3000, 3300)))  # 300 tokens to evaluate
    batch, _ = step(s)
    gone = next(op.src for op in batch.ops if op.kind == "save")
    assert batch.ops[-2:] == [MemOp("save", gone, 50, 200), MemOp("drop", gone)]
    assert [e.tokens for e in s.cache.entries.values()] == [tuple(chat + [5])]
    assert [(e.tokens, e.reused) for e in s.spill.entries.values()] == [(tuple(one_off), False)]


def test_a_one_off_takes_host_memory_only_beside_reused_prefixes():
    c = PrefixCache(slots=[1, 2, 3], budget_tokens=10)
    c.insert([1] * 6, reused=True)
    assert c.insert([2] * 3, evict_reused=False)[0] is not None  # room beside it
    assert c.insert([3] * 5, evict_reused=False) == (None, [], [])  # only the one-off could make room: too little
    slot, _, evicted = c.insert([4] * 4, evict_reused=False)  # the one-off makes room for another
    assert slot is not None and [e.tokens for e in evicted] == [(2, 2, 2)]
    assert sorted(e.tokens for e in c.entries.values()) == [(1,) * 6, (4,) * 4]


def test_cached_prefixes_that_share_cells_count_them_once():
    """Two chats copied from one system prompt hold its cells together (a copy adds a sequence id to a cell): the
    KV tier counts them once. A sequence restored from host memory wrote cells of its own, and they count."""
    c = PrefixCache(slots=[1, 2, 3], budget_tokens=10)
    system = [1, 2, 3, 4, 5, 6]
    assert c.insert(system + [7], cells=((0, 0, 6), (1, 6, 7)))[0] is not None
    slot, _, evicted = c.insert(system + [8], cells=((0, 0, 6), (2, 6, 7)))
    assert slot is not None and not evicted and c.used_tokens == 8  # 14 if each counted the system prompt
    slot, _, evicted = c.insert(system + [9], cells=((3, 0, 7),))  # its own copy of the system prompt
    assert slot is not None and len(evicted) == 2 and c.used_tokens == 7


def test_chats_on_one_system_prompt_stay_in_the_kv_tier_together():
    """Four clients send one system prompt at once and ride one prefill; their finished sequences go to the KV
    tier, which holds the shared prompt once: all four stay, nothing goes to host memory, and the next turn of
    one of them copies its cells from there and supersedes its entry."""
    s = Scheduler(n_slots=4, n_ctx_seq=1024, token_budget=512, cache=PrefixCache(slots=[4, 5, 6, 7], budget_tokens=150),
                  spill=PrefixCache(slots=[50, 51, 52, 53], budget_tokens=1000))
    system = list(range(1000, 1100))
    for r in range(4):
        s.add(r, system + [r])
    step(s)  # one prefill, three riders
    step(s)  # a decode each
    for r in range(4):
        s.finish(r)
    ops = s.schedule().ops
    assert len(s.cache.entries) == 4 and s.cache.used_tokens == 100 + 4 * 2  # 408 counted per entry
    assert not [op for op in ops if op.kind in ("save", "restore")] and not s.spill.entries
    s.add(4, system + [0, 7, 9])  # client 0's next turn: its 102 tokens are cached
    batch, _ = step(s)
    assert batch.ops[0].kind == "copy" and batch.ops[0].n == 102 and s.running[4].cached == 102
    s.finish(4)
    s.schedule()
    assert len(s.cache.entries) == 4 and s.cache.used_tokens == 100 + 3 * 2 + 3  # its turn superseded its entry
