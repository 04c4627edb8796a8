"""The grammar, before llama.cpp: a dry run of llama.cpp's GBNF parser that counts what it would build.

llama.cpp parses a grammar on the model's runner thread with a parser that recurses once per nested group, and
builds rules and elements for every repetition. A grammar too deep, too large or that no token can match kills
or stalls the runner with every request on it, so each grammar a request brings, however it was made, is
measured here first and refused with a one-line ``InvalidInput`` naming the limit it is over.
"""

from __future__ import annotations

import re

from slmops.types.errors import InvalidInput

# Limits on what reaches llama.cpp, measured with smollm2:135m's vocabulary (49,152 tokens) on a busy 2-core x86-64
# machine, each experiment in a throwaway process with the grammar initialised on a thread as a runner does.
#
# The most a repetition may count. It is llama.cpp's own MAX_REPETITION_THRESHOLD: it refuses a larger minimum and
# silently drops a larger maximum, which would let output break its schema. It also caps (rules in a repeated
# group) x (count), as llama.cpp does. ``char{0,2000}`` initialises in 1.4 ms, and samples no slower than ``char*``.
MAX_REPEAT = 2000
# Nested groups. llama.cpp's parser takes ~450 bytes of stack per level: a thread with 1 MiB of stack crashed
# between 2,000 and 2,500 levels, one with the usual 8 MiB between 17,500 and 20,000. The converter nests ≤ ~20.
MAX_GRAMMAR_DEPTH = 100
# Rules llama.cpp builds, repetitions included: 1-4 µs and ~70 bytes each to set up (20,000 rules: 21-44 ms;
# 50,000: 83-135 ms; 100,000: 320 ms). 20,000 keeps a request's grammar setup well under 100 ms.
MAX_GRAMMAR_RULES = 20_000
# Grammar elements (one per literal character, class range, reference), each repetition's copies included:
# ~0.04 µs and ~20 bytes of memory each (1M: 38 ms, +14 MB; 20M: 1 s, +430 MB; a 100 KB literal repeated 2,000
# times would have asked for 4 GB).
MAX_GRAMMAR_ELEMENTS = 1_000_000
# Alternatives (``a | b``: enum values, anyOf branches, optional properties). Every alternative alive at a position
# is checked against the whole vocabulary at every token: ~0.28 ms each (100 sharing a prefix: 27 ms a token;
# 1,000: 287 ms; 3,000: 861 ms). 2,048 admits the 1,000-value integer ranges of ``enforceable``.
MAX_GRAMMAR_ALTERNATIVES = 2048
# Grammar text, which bounds this module's own dry run of it (~50 ms for 256 KiB).
MAX_GRAMMAR_BYTES = 256 * 1024


def shown_count(n: int) -> str:
    """A count for a one-line message, however many digits it came with."""
    return str(n) if n < 10**12 else f"of {len(str(n))} digits"


def check_grammar(gbnf: str) -> str:
    """``gbnf`` unchanged if llama.cpp can parse it and sample with it safely; else an ``InvalidInput`` naming the
    limit it is over. Every grammar a request brings goes through here, however it was made."""
    try:
        size = len(gbnf.encode())
    except UnicodeEncodeError:
        raise InvalidInput("JSON Schema: holds a lone surrogate (half of a UTF-16 pair), which is not text; "
                           "remove it") from None
    if size > MAX_GRAMMAR_BYTES:
        raise InvalidInput(f"JSON Schema: compiles to a grammar of {size} bytes, over the limit of "
                           f"{MAX_GRAMMAR_BYTES} for constrained output; shorten it")
    _DryRun(gbnf).run()
    return gbnf


_SPACE = re.compile(r"(?:[ \t]+|#[^\r\n]*)*")
_SPACE_NL = re.compile(r"(?:[ \t\r\n]+|#[^\r\n]*)*")
_NAME = re.compile(r"[a-zA-Z0-9-]+")
_INT = re.compile(r"[0-9]+")
_PLAIN = re.compile(r'[^"\\]+')  # literal text without escapes, taken in one step
_ESCAPES = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
_HEX = {"x": 2, "u": 4, "U": 8}
_TOP = 0x10FFFF  # model output decodes to code points 1..0x10FFFF; NUL ends a token's text


class _Unparsable(Exception):
    pass


class _DryRun:
    """llama.cpp's GBNF parser (``llama_grammar_parser`` in llama-grammar.cpp) followed step by step, building
    nothing but counts: how deep groups nest, how many rules, elements and alternatives llama.cpp would build,
    including each repetition's chain of rules and copies, and the limits llama.cpp itself enforces by throwing.

    It also refuses two things that parse but then hurt a runner: a character that no model output can hold (a
    class matching nothing, NUL): the sampler finds no token to allow and llama.cpp aborts the process; and a
    repeated part that can be empty (``(a?){100}``), which llama.cpp explores every way round: 2 s a token at 100.
    """

    def __init__(self, gbnf: str):
        self.src = gbnf.split("\0", 1)[0]  # llama.cpp reads a C string
        self.symbols: dict[str, int] = {}
        self.n_symbols = self.elements = self.alternatives = 0
        self.rules: dict[int, list[list[tuple[int | None, bool]]]] = {}  # alternatives of (rule referenced, empty)
        self.repeated: list[tuple[int | None, bool]] = []  # items repeated more than once

    def run(self) -> None:
        try:
            pos = self._space(0, True)
            while pos < len(self.src):
                pos = self._rule(pos)
            missing = set(range(self.n_symbols)) - set(self.rules)
            if missing or "root" not in self.symbols:
                raise _Unparsable("a rule is used but not defined" if missing else "no root rule")
        except (_Unparsable, IndexError, ValueError) as err:
            raise InvalidInput(f"JSON Schema: compiles to a grammar llama.cpp cannot parse ({str(err)[:80]}); "
                               f"simplify the schema") from None
        empty = self._nullable()
        if any(flag or (ref is not None and ref in empty) for ref, flag in self.repeated):
            raise InvalidInput("JSON Schema: a pattern repeats a part that can be empty, as (a?){2} or (a*)* do, "
                               "which makes every token slow to check; make the repeated part non-empty")

    # -- lexical ---------------------------------------------------------------------------------------------------
    def _space(self, pos: int, newline_ok: bool) -> int:
        return (_SPACE_NL if newline_ok else _SPACE).match(self.src, pos).end()

    def _at(self, pos: int) -> str:
        return self.src[pos] if pos < len(self.src) else ""

    def _char(self, pos: int) -> tuple[int, int]:
        c = self._at(pos)
        if c != "\\":
            if not c:
                raise _Unparsable("unexpected end of input")
            return ord(c), pos + 1
        e = self._at(pos + 1)
        if e in _HEX:
            digits = self.src[pos + 2:pos + 2 + _HEX[e]]
            if len(digits) != _HEX[e] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise _Unparsable(f"expecting {_HEX[e]} hex chars")
            return int(digits, 16), pos + 2 + _HEX[e]
        if e in _ESCAPES:
            return _ESCAPES[e], pos + 2
        raise _Unparsable(f"unknown escape \\{e}")

    def _symbol(self, name: str) -> int:
        if name not in self.symbols:
            self.symbols[name] = self._generate()
        return self.symbols[name]

    def _generate(self) -> int:
        self.n_symbols += 1
        if self.n_symbols > MAX_GRAMMAR_RULES:
            raise InvalidInput(f"JSON Schema: compiles to more than {MAX_GRAMMAR_RULES} grammar rules, over the "
                               f"limit for constrained output; lower its maxLength, maxItems or pattern counts")
        return self.n_symbols - 1

    def _grow(self, n: int) -> None:
        self.elements += n
        if self.elements > MAX_GRAMMAR_ELEMENTS:
            raise InvalidInput(f"JSON Schema: compiles to a grammar of more than {MAX_GRAMMAR_ELEMENTS} elements, "
                               f"over the limit for constrained output; shorten its constants or lower its counts")

    # -- syntactic -------------------------------------------------------------------------------------------------
    def _rule(self, pos: int) -> int:
        m = _NAME.match(self.src, pos)
        if not m:
            raise _Unparsable("expecting name")
        rule_id = self._symbol(m.group())
        pos = self._space(m.end(), False)
        if not self.src.startswith("::=", pos):
            raise _Unparsable("expecting ::=")
        pos = self._alternates(self._space(pos + 3, True), rule_id, False, 0)
        if not self._at(pos):
            return pos
        if self._at(pos) not in ("\r", "\n"):
            raise _Unparsable("expecting newline or end")
        return self._space(pos + (2 if self.src.startswith("\r\n", pos) else 1), True)

    def _alternates(self, pos: int, rule_id: int, nested: bool, depth: int) -> int:
        alternatives: list[list[tuple[int | None, bool]]] = [[]]
        rule = [0]  # elements in the rule so far, shared by its alternatives as in llama.cpp
        pos = self._sequence(pos, rule, alternatives[-1], nested, depth)
        while self._at(pos) == "|":
            rule[0] += 1
            self._grow(1)
            alternatives.append([])
            pos = self._sequence(self._space(pos + 1, True), rule, alternatives[-1], nested, depth)
        self._grow(1)
        self.alternatives += len(alternatives) if len(alternatives) > 1 else 0
        if self.alternatives > MAX_GRAMMAR_ALTERNATIVES:
            raise InvalidInput(f"JSON Schema: compiles to more than {MAX_GRAMMAR_ALTERNATIVES} alternatives (enum "
                               f"values, anyOf branches, optional properties), over the limit for constrained "
                               f"output; shorten it")
        self.rules[rule_id] = alternatives
        return pos

    def _sequence(self, pos: int, rule: list[int], items: list[tuple[int | None, bool]], nested: bool,
                  depth: int) -> int:
        last_start, n_prev = rule[0], 1
        while pos < len(self.src):
            c = self.src[pos]
            if c in '"[<!.' or _NAME.match(c) or c == "(":
                last_start, n_prev = rule[0], 1
                if c == '"':
                    pos, n = self._literal(pos + 1)
                    items.append((None, n == 0))
                elif c == "[":
                    pos, n = self._class(pos + 1)
                    items.append((None, n == 0))
                elif c in "<!":
                    pos, n = self._token(pos), 1
                    items.append((None, False))
                elif c == ".":
                    pos, n = pos + 1, 1
                    items.append((None, False))
                elif c == "(":
                    if depth + 1 > MAX_GRAMMAR_DEPTH:
                        raise InvalidInput(f"JSON Schema: compiles to a grammar nested more than "
                                           f"{MAX_GRAMMAR_DEPTH} levels deep, over the limit for constrained "
                                           f"output; nest its pattern's groups less")
                    before = self.n_symbols
                    sub = self._generate()
                    pos = self._alternates(self._space(pos + 1, True), sub, True, depth + 1)
                    n_prev = max(1, self.n_symbols - before)
                    if self._at(pos) != ")":
                        raise _Unparsable("expecting )")
                    pos, n = pos + 1, 1
                    items.append((sub, False))
                else:
                    m = _NAME.match(self.src, pos)
                    pos, n = m.end(), 1
                    items.append((self._symbol(m.group()), False))
                rule[0] += n
                self._grow(n)
                pos = self._space(pos, nested)
            elif c in "*+?{":
                low, high, pos = self._counts(pos, nested)
                n_prev = self._repeat(rule, last_start, n_prev, items, low, high)
            else:
                break
        return pos

    def _literal(self, pos: int) -> tuple[int, int]:
        n = 0
        while self._at(pos) != '"':
            m = _PLAIN.match(self.src, pos)
            if m:  # raw text: no NUL (cut above), nothing beyond U+10FFFF (not in a str)
                n, pos = n + m.end() - pos, m.end()
                continue
            code, pos = self._char(pos)
            if code == 0 or code > _TOP:
                raise InvalidInput("JSON Schema: it asks for a character no model can write (NUL, or beyond "
                                   "U+10FFFF); remove it")
            n += 1
        return pos + 1, n

    def _class(self, pos: int) -> tuple[int, int]:
        negated = self._at(pos) == "^"
        pos += negated
        ranges, n = [], 0
        while self._at(pos) != "]":
            low, pos = self._char(pos)
            high, n = low, n + 1
            if self._at(pos) == "-" and self._at(pos + 1) not in ("]", ""):
                high, pos = self._char(pos + 1)
                n += 1
            elif self._at(pos) == "-" and not self._at(pos + 1):
                raise _Unparsable("unexpected end of input")
            ranges.append((low, high))
        if ranges and not _matches_something(ranges, negated):
            raise InvalidInput("JSON Schema: a pattern has a character class that matches no character a model "
                               "can write; remove it")
        return pos + 1, n

    def _token(self, pos: int) -> int:
        pos += self._at(pos) == "!"
        if self._at(pos) != "<":
            raise _Unparsable("expecting <")
        end = self.src.find(">", pos)
        if end < 0:
            raise _Unparsable("expecting >")
        return end + 1

    def _counts(self, pos: int, nested: bool) -> tuple[int, int | None, int]:
        c = self.src[pos]
        if c != "{":
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c] + (self._space(pos + 1, nested),)
        pos = self._space(pos + 1, nested)
        m = _INT.match(self.src, pos)
        if not m:
            raise _Unparsable("expecting an int")
        low = high = int(m.group())
        pos = self._space(m.end(), nested)
        if self._at(pos) == ",":
            pos = self._space(pos + 1, nested)
            m = _INT.match(self.src, pos)
            high = int(m.group()) if m else None
            pos = self._space(m.end(), nested) if m else pos
        if self._at(pos) != "}":
            raise _Unparsable("expecting }")
        return low, high, self._space(pos + 1, nested)

    def _repeat(self, rule: list[int], last_start: int, n_prev: int, items: list[tuple[int | None, bool]],
                low: int, high: int | None) -> int:
        """``handle_repetitions``: the item is copied ``low`` times, then chained through one rule per optional
        repetition; the new n_prev (rules a later repetition of this one would multiply)."""
        span = rule[0] - last_start
        if span == 0 or not items:
            raise _Unparsable("expecting an item before */+/?/{")
        for count in (low, high):
            if count is not None and count > MAX_REPEAT:
                raise InvalidInput(f"JSON Schema: a repetition of {shown_count(count)} (a maxLength, maxItems or a "
                                   f"pattern's {{m,n}}) is over the limit of {MAX_REPEAT} for constrained output; "
                                   f"lower it")
        if high is not None and high < low:  # llama.cpp would count max - min unsigned, and never stop
            raise InvalidInput(f"JSON Schema: a repetition {{{low},{high}}} has its minimum over its maximum; "
                               f"swap them")
        total = high if high else (low or 1)
        if n_prev * total > MAX_REPEAT:
            raise InvalidInput(f"JSON Schema: repeating a part that holds {n_prev} grammar rules {total} times is "
                               f"over the limit of {MAX_REPEAT} rules for constrained output; lower its maxItems, "
                               f"maxLength or pattern counts")
        optional = 1 if high is None else high - low
        self._grow(span * max(low - 1, 0) + optional * (span + 3))
        for _ in range(optional):
            self.rules[self._generate()] = []  # a link of the chain; its item stands for it in ``items``
        rule[0] = last_start + span * low + (optional > 0)
        ref, empty = items[-1]
        if high is None or high > 1:
            self.repeated.append((ref, empty))
        items[-1] = (ref, empty or low == 0)
        return n_prev * total

    # -- semantic --------------------------------------------------------------------------------------------------
    def _nullable(self) -> set[int]:
        """Rules that can match nothing: a worklist over the rules each alternative still waits on."""
        waiting: dict[int, list[list[int]]] = {}  # rule -> [pending count] of each alternative referencing it
        done, todo = set(), []
        for rule_id, alternatives in self.rules.items():
            for alt in alternatives:
                if any(ref is None and not empty for ref, empty in alt):
                    continue  # holds a character: never empty
                refs = [ref for ref, empty in alt if ref is not None and not empty]
                pending = [len(refs), rule_id]
                for ref in refs:
                    waiting.setdefault(ref, []).append(pending)
                if not refs and rule_id not in done:
                    done.add(rule_id)
                    todo.append(rule_id)
        while todo:
            for pending in waiting.pop(todo.pop(), []):
                pending[0] -= 1
                if pending[0] == 0 and pending[1] not in done:
                    done.add(pending[1])
                    todo.append(pending[1])
        return done


def _matches_something(ranges: list[tuple[int, int]], negated: bool) -> bool:
    """Whether a character class admits a code point a model can write (1..U+10FFFF)."""
    spans = sorted((max(lo, 1), min(hi, _TOP)) for lo, hi in ranges if lo <= hi and hi >= 1 and lo <= _TOP)
    if not negated:
        return bool(spans)
    reach = 0  # every code point up to here is excluded
    for lo, hi in spans:
        if lo > reach + 1:
            return True
        reach = max(reach, hi)
    return reach < _TOP
