"""A radix tree of token prefixes whose KV is held somewhere reusable, with LRU eviction under a token budget.

Pure bookkeeping: it decides which entry holds which tokens; the runner performs the memory operations this
implies. Two instances make the two tiers of the prefix cache (see the scheduler): spare sequences of the KV
cache, where a copy into a new request's sequence only shares cells (metadata, no data), and host memory, where
entries evicted from the first tier go (``llama_state_seq_get_data``) and come back by copy
(``set_data``: milliseconds, against seconds to evaluate the tokens again). Requests that share a system prompt
or a chat history find the longest cached prefix here and skip evaluating it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class _Node:
    edge: tuple[int, ...] = ()
    children: dict[int, "_Node"] = field(default_factory=dict)
    slots: set[int] = field(default_factory=set)  # entries whose tokens pass through (or end at) this node
    parent: "_Node | None" = None


Span = tuple[int, int, int]  # (origin, start, end): cells [start, end) that the sequence ``origin`` evaluated


@dataclass
class Entry:
    slot: int
    tokens: tuple[int, ...]
    last_used: int
    reused: bool = False  # a request started from it, or it continues one that started from the cache
    cells: tuple[Span, ...] = ()  # where its KV cells came from; empty: cells of its own, one per token


def clip(cells: tuple[Span, ...], n: int) -> tuple[Span, ...]:
    """The spans of the first ``n`` cells."""
    return tuple((o, a, min(b, n)) for o, a, b in cells if a < n)


def cells_used(entries) -> int:  # type: ignore[no-untyped-def]
    """KV cells that ``entries`` hold together. Sequences that copied a prefix share its cells (a copy in
    llama.cpp's KV cache adds a sequence id to a cell), so eight chats on one system prompt hold it once. Every
    holder of an origin's cells copied a prefix of them, so per origin they are one run from its start."""
    runs: dict[int, tuple[int, int]] = {}
    own = 0
    for e in entries:
        if not e.cells:
            own += len(e.tokens)
        for origin, start, end in e.cells:
            s0, e0 = runs.get(origin, (start, end))
            runs[origin] = (min(s0, start), max(e0, end))
    return own + sum(end - start for start, end in runs.values())


class PrefixCache:
    def __init__(self, slots: list[int], budget_tokens: int):
        """``slots``: the entry ids it may hand out (the most entries held at once)."""
        self.free = list(slots)
        self.budget = budget_tokens
        self.root = _Node()
        self.entries: dict[int, Entry] = {}
        self._clock = itertools.count(1)

    @property
    def used_tokens(self) -> int:
        """Cells held, each counted once however many entries share it."""
        return cells_used(self.entries.values())

    def match(self, tokens: list[int], touch: bool = True) -> tuple[int | None, int]:
        """(entry, number of leading tokens it holds) for the longest cached prefix of ``tokens``; with
        ``touch`` the entry counts as used (LRU), without it this is only a look."""
        node, depth, best = self.root, 0, (None, 0)
        while True:
            child = node.children.get(tokens[depth]) if depth < len(tokens) else None
            if child is None:
                break
            n = 0
            while n < len(child.edge) and depth + n < len(tokens) and child.edge[n] == tokens[depth + n]:
                n += 1
            depth += n
            if child.slots:
                best = (min(child.slots, key=lambda s: -self.entries[s].last_used), depth)
            if n < len(child.edge):
                break
            node = child
        if touch and best[0] is not None:
            self.touch(best[0])
        return best

    def touch(self, slot: int) -> None:
        """Count ``slot`` as used now (LRU), by a request that starts from it."""
        entry = self.entries[slot]
        entry.last_used = next(self._clock)
        entry.reused = True

    def insert(self, tokens: list[int], reused: bool = False, evict_reused: bool = True,
               cells: tuple[Span, ...] = ()) -> tuple[int | None, list[int], list[Entry]]:
        """Reserve an entry for ``tokens``: (entry, or None if it is not stored; entries it supersedes; entries
        evicted to make room, with their tokens, so a lower tier can take them). ``cells``: where its KV cells
        came from, so that cells it shares with other entries take no more room. Without ``evict_reused`` only
        entries no request has reused make room, and nothing changes when they cannot.

        A sequence already cached whole is not stored twice, and entries it extends (the previous turn of a chat)
        are superseded: every prefix they matched, it matches too.
        """
        new = Entry(-1, tuple(tokens), 0, reused, cells)
        if not tokens or cells_used([new]) > self.budget or self.match(tokens)[1] == len(tokens):
            return None, [], []
        if not evict_reused:
            kept = [e for e in self.entries.values() if e.reused]
            if cells_used(kept + [new]) > self.budget or (not self.free and len(kept) == len(self.entries)):
                return None, [], []
        superseded = self.supersede(tokens)
        evicted: list[Entry] = []
        while self.entries and (not self.free or cells_used([*self.entries.values(), new]) > self.budget):
            evicted.append(self._evict_lru(evict_reused))
        if not self.free:
            return None, superseded, evicted
        new.slot, new.last_used = self.free.pop(0), next(self._clock)
        self.entries[new.slot] = new
        self._add_path(new.tokens, new.slot)
        return new.slot, superseded, evicted

    def supersede(self, tokens: list[int]) -> list[int]:
        """Remove the entries whose tokens start ``tokens`` (a sequence holding ``tokens`` now serves them)."""
        gone = [e.slot for e in list(self.entries.values())
                if len(e.tokens) <= len(tokens) and tuple(tokens[:len(e.tokens)]) == e.tokens]
        for slot in gone:
            self.remove(slot)
        return gone

    def _evict_lru(self, reused_too: bool = True) -> Entry:
        victim = min((e for e in self.entries.values() if reused_too or not e.reused), key=lambda e: e.last_used)
        self.remove(victim.slot)
        return victim

    def remove(self, slot: int) -> None:
        entry = self.entries.pop(slot)
        node, depth = self.root, 0
        path = []
        while depth < len(entry.tokens):
            node = node.children[entry.tokens[depth]]
            node.slots.discard(slot)
            path.append(node)
            depth += len(node.edge)
        for n in reversed(path):
            if not n.slots and not n.children and n.parent is not None:
                del n.parent.children[n.edge[0]]
        self.free.append(slot)

    def _add_path(self, tokens: tuple[int, ...], slot: int) -> None:
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                leaf = _Node(edge=tokens[depth:], parent=node, slots={slot})
                node.children[tokens[depth]] = leaf
                return
            n = 0
            while n < len(child.edge) and depth + n < len(tokens) and child.edge[n] == tokens[depth + n]:
                n += 1
            if n < len(child.edge):  # split the edge where the new sequence leaves it
                mid = _Node(edge=child.edge[:n], parent=node, slots=set(child.slots))
                node.children[tokens[depth]] = mid
                child.edge = child.edge[n:]
                child.parent = mid
                mid.children[child.edge[0]] = child
                child = mid
            child.slots.add(slot)
            node, depth = child, depth + n
