"""Continuous batching as a pure state machine: ``schedule() -> Batch`` and ``update(batch, sampled)``.

It never touches llama.cpp, so it is tested with made-up tokens. Each step:

1. every running sequence decodes its last sampled token (streams stay smooth),
2. waiting requests are admitted into free sequence slots (3.), then the rest of the per-step token budget goes
   to prompt chunks, the shortest remaining prompt first (chunked prefill: a long prompt is spread over several
   steps instead of stalling everyone's stream). A step finishes at most one prompt and then carries no other
   prompt work: the first token would wait for work that brings the others' first tokens no sooner (the total
   before each is the same either way). Eight clients whose two system prompts arrive together get the first
   prompt's answers after one prefill instead of two, and chat turns arriving together get their first tokens
   one step apart instead of all at the end of one longer step; a prompt passed over ``MAX_PASSED`` steps in a
   row goes first, so a stream of short requests cannot starve a long one,
3. admission reuses the longest prefix whose KV exists:
   in a sequence still running or in the prefix cache's first tier, spare sequences of the KV cache (copying
   cells from either is metadata-only), or in its second tier in host memory (copied back into the new
   sequence). A request whose
   prompt shares a long prefix with one still being prefilled rides along with it: it takes a slot, copies the
   cells computed so far, and each later chunk of the shared part is evaluated once for all of them (llama.cpp
   writes such a token's KV into one cell that every sequence listed for it holds). Its own tokens follow in the
   step that ends the shared part, so eight clients sending one system prompt at once evaluate it once and get
   their first tokens together.

Each active sequence owns one slot with ``n_ctx_seq`` KV cells reserved, so admission never over-commits the
cache; spare slots hold cached prefixes within their own budget (``cache``), and what that tier evicts spills to
host memory (``spill``) within another. Memory operations the runner must perform before decoding (prefix
copies, saves to and restores from host memory, frees) travel in the batch, in order.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from slmops.engine.prefix_cache import Entry, PrefixCache, Span, clip
from slmops.types.errors import Busy, ContextOverflow


class State(Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class Seq:
    req_id: int
    prompt: list[int]
    max_new: int  # -1: until the context is full
    n_ctx: int  # this request's context (its num_ctx), at most the slot's
    slot: int = -1
    state: State = State.WAITING
    n_past: int = 0  # tokens whose KV is in the slot, counting chunks scheduled in the current step
    n_kv: int = 0  # tokens whose KV is in the slot for certain (decoded in an earlier step)
    cached: int = 0  # of which came from the prefix cache, or from a prefill it rode along with
    passed: int = 0  # steps in a row its prefill was left out of the batch
    generated: list[int] = field(default_factory=list)
    leader: "Seq | None" = None  # the prefill it rides along with, until ``share_end``
    share_end: int = 0
    cells: tuple[Span, ...] = ()  # the KV cells it started from, copied from another sequence (see prefix_cache)
    origin: int = -1  # the cells it evaluates itself, after those

    def spans(self, n: int) -> tuple[Span, ...]:
        """Where its first ``n`` cells came from."""
        start = self.cells[-1][2] if self.cells else 0
        return clip(self.cells, n) + (((self.origin, start, n),) if n > start else ())

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


@dataclass(frozen=True)
class MemOp:
    """What the runner does to KV memory before a step. Sequences are slots, entries are prefix-cache entries.

    ``copy``: share cells [0, n) of sequence ``src`` with sequence ``dst``; ``drop``: free every cell of sequence
    ``src``; ``save``: copy sequence ``src``'s KV (``n`` tokens) to host-memory entry ``dst``; ``restore``: load
    host-memory entry ``src`` into sequence ``dst`` and keep its first ``n`` tokens (``tokens``, to evaluate
    instead should the KV cache have no room for the copy); ``forget``: discard host-memory entry ``src``.
    """

    kind: str
    src: int
    dst: int = -1
    n: int = -1
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Item:
    req_id: int
    slot: int
    tokens: tuple[int, ...]
    pos0: int
    sample: bool  # logits wanted for the last token: a token is sampled for this request after the step
    also: tuple[int, ...] = ()  # other slots these tokens belong to: sequences riding along with this prefill


@dataclass
class Batch:
    ops: list[MemOp] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    riders: list[int] = field(default_factory=list)  # requests whose prompt advances only through ``also``

    def requests(self) -> list[int]:
        """Every request this step works for, once (with riders, a shared chunk is several items of its leader)."""
        ids = [i.req_id for i in self.items]
        return list(dict.fromkeys(ids + self.riders)) if self.riders else ids

    @property
    def n_tokens(self) -> int:
        return sum(len(i.tokens) for i in self.items)

    def __bool__(self) -> bool:
        return bool(self.items or self.ops)


@dataclass(frozen=True)
class Finished:
    req_id: int
    reason: str  # "length" (max_new or context) | "stop" | "cancelled"


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared start; a binary search over slice comparisons, which run in C (prompts are long
    and this runs for every waiting request at every step)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Scheduler:
    SHARE_WAIT = 64  # a waiting request rides along with a running prefill that will give it this many tokens more
    MAX_PASSED = 8  # steps a prefill may be left out for shorter ones before it goes first
    LONG_PREFILL = 128  # a prompt with this many tokens to evaluate moves unreused cached prefixes out of the KV cache

    def __init__(self, n_slots: int, n_ctx_seq: int, token_budget: int = 512, max_queue: int = 512,
                 cache: PrefixCache | None = None, spill: PrefixCache | None = None):
        """``cache``: cached prefixes in spare sequences (its entries are sequence ids); ``spill``: those it evicts,
        in host memory (its entries are the runner's)."""
        self.n_ctx_seq = n_ctx_seq
        self.token_budget = token_budget
        self.max_queue = max_queue
        self.cache = cache
        self.spill = spill
        self.free_slots = list(range(n_slots))
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}
        self._ops: list[MemOp] = []
        self._origins = itertools.count()

    # -- requests ------------------------------------------------------------------------------------------
    def add(self, req_id: int, prompt: list[int], max_new: int = -1, n_ctx: int | None = None) -> None:
        """Queue a request; ``n_ctx`` (its num_ctx) may be smaller than a slot's, never larger."""
        n_ctx = min(n_ctx or self.n_ctx_seq, self.n_ctx_seq)
        if not prompt:
            raise ContextOverflow("empty prompt")
        if len(prompt) >= n_ctx:
            raise ContextOverflow.prompt(len(prompt), n_ctx)
        if len(self.waiting) >= self.max_queue + len(self.free_slots):  # a free slot takes it at the next step
            raise Busy(f"server busy: {self.max_queue} requests already wait; retry later")
        self.waiting.append(Seq(req_id, list(prompt), max_new, n_ctx))

    def cancel(self, req_id: int) -> Finished | None:
        for seq in list(self.waiting):
            if seq.req_id == req_id:
                self.waiting.remove(seq)
                return Finished(req_id, "cancelled")
        if req_id in self.running:
            self._release(self.running.pop(req_id), keep=False)
            return Finished(req_id, "cancelled")
        return None

    def finish(self, req_id: int, reason: str = "stop") -> Finished | None:
        """The runner saw an end-of-generation token or a stop string."""
        seq = self.running.pop(req_id, None)
        if seq is None:
            return None
        self._release(seq, keep=True)
        return Finished(req_id, reason)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self._ops

    # -- stepping ------------------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        batch = Batch(ops=self._ops)
        self._ops = []
        budget = self.token_budget
        for seq in self.running.values():
            if seq.state is State.DECODE:
                batch.items.append(Item(seq.req_id, seq.slot, (seq.generated[-1],), seq.n_past, True))
                budget -= 1
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            leader, shared = self._leader_for(seq)
            if leader is not None:
                self._ride(seq, leader, shared, batch)
            else:
                self._admit(seq, batch)
        prefills = [seq for seq in self.running.values() if seq.state is State.PREFILL and seq.leader is None]
        prefills.sort(key=lambda q: (q.passed < self.MAX_PASSED, len(q.prompt) - q.n_past))  # stable: by arrival
        finishing = False
        for seq in prefills:
            rest = len(seq.prompt) - seq.n_past
            if budget > 0 and (seq.passed >= self.MAX_PASSED or not finishing):
                finishing |= rest <= budget
                budget -= self._prefill_chunk(seq, budget, batch)
                seq.passed = 0
            else:
                seq.passed += 1
        return batch

    def update(self, batch: Batch, sampled: dict[int, int]) -> list[Finished]:
        """Record the step: KV now holds each item's tokens; ``sampled`` maps request → token sampled for it."""
        done = []
        for req_id in batch.riders:  # what the shared chunks gave them is in KV now
            rider = self.running.get(req_id)
            if rider is not None:
                rider.n_kv = rider.n_past
        for item in batch.items:
            seq = self.running.get(item.req_id)
            if seq is None:
                continue
            seq.n_past = seq.n_kv = item.pos0 + len(item.tokens)
            if not item.sample:
                continue
            seq.state = State.DECODE
            tok = sampled.get(item.req_id)
            if tok is None:
                continue
            seq.generated.append(tok)
            at_limit = 0 <= seq.max_new <= len(seq.generated)
            if at_limit or seq.n_past + 1 >= seq.n_ctx:
                done.append(self.finish(seq.req_id, "length"))
        return [d for d in done if d is not None]

    # -- internals -----------------------------------------------------------------------------------------
    def _take_slot(self, seq: Seq) -> None:
        seq.slot = self.free_slots.pop(0)
        seq.state = State.PREFILL
        seq.origin = next(self._origins)
        self.running[seq.req_id] = seq

    def _admit(self, seq: Seq, batch: Batch) -> None:
        self._take_slot(seq)
        usable = len(seq.prompt) - 1  # at least one token is evaluated, for its logits
        n, op, chosen = 0, None, None
        if self.spill is not None:
            entry, n = self.spill.match(seq.prompt, touch=False)
            if entry is not None:
                op, chosen = MemOp("restore", entry, seq.slot, min(n, usable), tuple(seq.prompt[:min(n, usable)])), \
                    (self.spill, entry)
        cells: tuple[Span, ...] = ()  # a restore writes cells of its own
        if self.cache is not None:  # cells shared for free: preferred on a tie
            slot, shared = self.cache.match(seq.prompt, touch=False)
            if slot is not None and shared >= n:
                n, op, chosen = shared, MemOp("copy", slot, seq.slot, min(shared, usable)), (self.cache, slot)
                cells = clip(self.cache.entries[slot].cells, op.n)
        for other in self.running.values():
            shared = common_prefix(seq.prompt, other.tokens[: other.n_kv])
            if shared >= n and shared > 0:
                n, op, chosen = shared, MemOp("copy", other.slot, seq.slot, min(shared, usable)), None
                cells = other.spans(op.n)
        if op is not None and op.n > 0:
            batch.ops.append(op)
            seq.n_past = seq.cached = op.n
            seq.cells = cells
            if chosen is not None:
                chosen[0].touch(chosen[1])
        if self.cache is not None and len(seq.prompt) - seq.n_past >= self.LONG_PREFILL:
            self._clear_unreused(batch)

    def _clear_unreused(self, batch: Batch) -> None:
        """Before a long prefill, the cached prefixes no request has reused yet (one-off prompts, chat turns not yet
        continued) leave the KV cache, for host memory when it has room beside the reused prefixes it holds. In
        llama.cpp's unified KV cache every prompt token's attention passes over every cell in use, masked or
        not: a 512-token prefill took 12 %, 28 % and 58 % longer beside 2,048, 4,096 and 8,192 cached cells, where
        a save to host memory costs ~13 ms per 750 tokens and a later restore about as much."""
        for entry in [e for e in self.cache.entries.values() if not e.reused]:
            self.cache.remove(entry.slot)
            self._spill(entry, batch.ops)

    def _reusable(self, seq: Seq) -> int:
        """Leading tokens of the prompt whose KV exists now: in either tier of the cache or a running sequence."""
        have = max((c.match(seq.prompt, touch=False)[1] for c in (self.cache, self.spill) if c is not None),
                   default=0)
        for other in self.running.values():
            have = max(have, common_prefix(seq.prompt, other.tokens[: other.n_kv]))
        return have

    def _leader_for(self, seq: Seq) -> tuple[Seq | None, int]:
        """A running prefill that will soon hold a long prefix of this prompt that no KV holds yet, and how many
        of this prompt's tokens it shares; (None, 0) when none is worth riding along with."""
        have = self._reusable(seq)
        usable = len(seq.prompt) - 1  # at least one token of its own, for its logits
        best, shared = None, 0
        for other in self.running.values():
            if other.state is State.PREFILL and other.leader is None:
                n = min(common_prefix(seq.prompt, other.prompt), usable)
                if n - max(have, other.n_past) >= self.SHARE_WAIT and n > shared:
                    best, shared = other, n
        return best, shared

    def _ride(self, seq: Seq, leader: Seq, shared: int, batch: Batch) -> None:
        """Admit ``seq`` beside ``leader``: the cells the leader has so far are copied (llama.cpp requires
        sequences that share a batch's tokens to hold the same positions before it), the rest of the shared prefix
        comes with the leader's chunks."""
        self._take_slot(seq)
        if leader.n_past > 0:  # its cells exist once the ops before it have run (a copy it started from, too)
            batch.ops.append(MemOp("copy", leader.slot, seq.slot, leader.n_past))
        seq.n_past = leader.n_past
        seq.cached = shared
        seq.leader, seq.share_end = leader, shared
        seq.cells = leader.spans(shared)  # the cells the leader holds and will write for both

    def _prefill_chunk(self, seq: Seq, budget: int, batch: Batch) -> int:
        """Schedule the next chunk of ``seq``'s prompt, split where riders' shared parts end; the riders whose
        shared part it completes follow with their own tokens, in this step when the budget allows."""
        rest = seq.prompt[seq.n_past:]
        chunk = rest[:budget] if budget > 0 else []
        if not chunk:
            return 0
        start, end = seq.n_past, seq.n_past + len(chunk)
        riders = [q for q in self.running.values() if q.leader is seq]
        ending = [q for q in riders if q.share_end <= end]
        over = len(chunk) + sum(len(q.prompt) - q.share_end for q in ending) - budget
        if ending and over > 0:  # room for the riders' own tokens, so that they finish in this step
            end = max(end - over, max(q.share_end for q in ending))
        cuts = sorted({q.share_end for q in riders if start < q.share_end < end} | {end})
        for a, b in zip([start] + cuts, cuts):
            also = tuple(q.slot for q in riders if q.share_end >= b)
            batch.items.append(Item(seq.req_id, seq.slot, tuple(seq.prompt[a:b]), a, b == len(seq.prompt), also))
        seq.n_past = end  # provisional, confirmed by update(); lets a later chunk follow in one step
        used = end - start
        for q in riders:
            q.n_past = min(end, q.share_end)
            batch.riders.append(q.req_id)
            if q.n_past == q.share_end:  # its own tokens now: after the shared ones, in the same step if they fit
                q.leader = None
                used += self._prefill_chunk(q, budget - used, batch)
        return used

    def _release(self, seq: Seq, keep: bool) -> None:
        """Free the slot; with ``keep`` its tokens first move to the prefix cache (when it has room)."""
        if keep and self.cache is not None:
            tokens = seq.tokens[: seq.n_past]
            slot, superseded, evicted = self.cache.insert(tokens, reused=seq.cached > 0,
                                                          cells=seq.spans(len(tokens)))
            self._ops.extend(MemOp("drop", s) for s in superseded)
            for entry in evicted:
                if entry.reused:  # a one-off evicted for room is not worth host memory
                    self._spill(entry, self._ops)
                else:
                    self._ops.append(MemOp("drop", entry.slot))
            if slot is not None:
                self._ops.append(MemOp("copy", seq.slot, slot, len(tokens)))
                if self.spill is not None:  # host copies of its earlier turns serve nothing it does not
                    self._ops.extend(MemOp("forget", e) for e in self.spill.supersede(tokens))
        self._ops.append(MemOp("drop", seq.slot))
        self.free_slots.append(seq.slot)
        for q in self.running.values():  # riding along with a cancelled prefill: on their own from what they have
            if q.leader is seq:
                q.leader, q.cached, q.cells = None, q.n_past, clip(q.cells, q.n_past)

    def _spill(self, entry: Entry, ops: list[MemOp]) -> None:
        """An entry that leaves the KV tier: copied to host memory when that tier takes it, then freed. An entry
        no request has reused takes only room that no reused one (a shared system prompt, a chat's history) needs:
        one-off prompts must not push out what requests ask for again."""
        if self.spill is not None:
            kept, superseded, evicted = self.spill.insert(list(entry.tokens), reused=entry.reused,
                                                          evict_reused=entry.reused)
            ops.extend(MemOp("forget", e) for e in superseded + [x.slot for x in evicted])
            if kept is not None:
                ops.append(MemOp("save", entry.slot, kept, len(entry.tokens)))
        ops.append(MemOp("drop", entry.slot))
