"""A radix tree of token prefixes whose KV is held in spare sequences of the context, with LRU eviction.

Pure bookkeeping: it decides which spare sequence ("cache slot") holds which tokens; the runner performs the KV
copies it implies. Requests that share a system prompt or a chat history find the longest cached prefix here and
skip evaluating it (in llama.cpp's unified KV cache a copy between sequences only shares cells, it copies no data).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class _Node:
    edge: tuple[int, ...] = ()
    children: dict[int, "_Node"] = field(default_factory=dict)
    slots: set[int] = field(default_factory=set)  # cache slots whose tokens pass through (or end at) this node
    parent: "_Node | None" = None


@dataclass
class _Entry:
    slot: int
    tokens: tuple[int, ...]
    last_used: int


class PrefixCache:
    def __init__(self, slots: list[int], budget_tokens: int):
        self.free = list(slots)
        self.budget = budget_tokens
        self.root = _Node()
        self.entries: dict[int, _Entry] = {}
        self._clock = itertools.count(1)

    @property
    def used_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries.values())

    def match(self, tokens: list[int], touch: bool = True) -> tuple[int | None, int]:
        """(cache slot, number of leading tokens it holds) for the longest cached prefix of ``tokens``; with
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
        """Reserve a slot for ``tokens``; returns (slot or None if it cannot fit, slots evicted to make room).

        A sequence already fully cached is not stored twice.
        """
        if not tokens or len(tokens) > self.budget:
            return None, []
        slot, n = self.match(tokens)
        if slot is not None and n == len(tokens) and len(self.entries[slot].tokens) == n:
            return None, []
        evicted: list[int] = []
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
