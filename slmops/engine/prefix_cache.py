"""A radix tree of token prefixes whose KV state is kept in host memory, with LRU eviction under a token budget.

Pure bookkeeping: it decides which cache entry holds which tokens; the runner saves a finished sequence's KV into
an entry and restores an entry into a new request's sequence (``llama_state_seq_get_data``/``set_data``: a memory
copy, some fifty times faster than evaluating the tokens again). Requests that share a system prompt or a chat
history find the longest cached prefix here and skip evaluating it.

Entries live in host memory rather than in spare sequences of the KV cache: the KV cache then holds only running
sequences (cells in use widen every decode step's attention, and cells reserved for a cache are memory a device
may lack), while host memory holds many more chat histories (1 GiB: ~46,000 tokens of SmolLM2-135M, against two
contexts before). Sequences that are still running share their prefixes through the KV cache directly (a
metadata-only copy; see the scheduler).
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


@dataclass
class _Entry:
    slot: int
    tokens: tuple[int, ...]
    last_used: int


class PrefixCache:
    def __init__(self, slots: list[int], budget_tokens: int):
        """``slots``: the entry ids it may hand out (the most entries held at once)."""
        self.free = list(slots)
        self.budget = budget_tokens
        self.root = _Node()
        self.entries: dict[int, _Entry] = {}
        self._clock = itertools.count(1)

    @property
    def used_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries.values())

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
            self.entries[best[0]].last_used = next(self._clock)
        return best

    def insert(self, tokens: list[int]) -> tuple[int | None, list[int]]:
        """Reserve an entry for ``tokens``; returns (entry or None if it cannot fit, entries dropped: evicted to make
        room, or superseded).

        A sequence already cached whole is not stored twice, and entries it extends (the previous turn of a chat)
        are dropped: every prefix they matched, it matches too.
        """
        if not tokens or len(tokens) > self.budget:
            return None, []
        if self.match(tokens)[1] == len(tokens):
            return None, []
        evicted = [e.slot for e in list(self.entries.values())
                   if len(e.tokens) < len(tokens) and tuple(tokens[:len(e.tokens)]) == e.tokens]
        for slot in evicted:
            self.remove(slot)
        while self.entries and (not self.free or self.used_tokens + len(tokens) > self.budget):
            evicted.append(self._evict_lru())
        if not self.free:
            return None, evicted
        slot = self.free.pop(0)
        self.entries[slot] = _Entry(slot, tuple(tokens), next(self._clock))
        self._add_path(tuple(tokens), slot)
        return slot, evicted

    def _evict_lru(self) -> int:
        victim = min(self.entries.values(), key=lambda e: e.last_used)
        self.remove(victim.slot)
        return victim.slot

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
