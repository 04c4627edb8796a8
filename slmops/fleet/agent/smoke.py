"""The smoke test a staged release passes before it serves: the release's golden prompts, asked greedily
(temperature 0, at most ``max_tokens`` tokens) of the warm-loaded slot model.

A golden prompt passes when the answer contains ``expect`` (case-insensitive) and matches ``expect_regex``
(``re.search``), whichever it sets; one that sets neither passes with any non-empty answer. The score is the share
that passed; the release serves only with a score of at least the threshold (1.0 unless the agent is told
otherwise: every golden prompt must pass). A release without golden prompts scores None and passes: it loaded,
which is all that can be asked of it. Only the score and the indexes of failed prompts leave this module, never a
prompt's or an answer's text.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from slmops.api.fleet import Golden
from slmops.types.errors import SlmopsError

Ask = Callable[[str, int], Awaitable[str]]  # (prompt, max_tokens) -> answer


@dataclass(frozen=True)
class SmokeResult:
    score: float | None  # share of golden prompts passed; None without any
    passed: bool
    failed: tuple[int, ...] = field(default=())  # indexes of golden prompts that failed
    errors: int = 0  # prompts the server could not answer at all

    def describe(self) -> str:
        """What happened, after the release's name in a log line."""
        if self.passed:
            return f"passed its smoke test (score {self.score})"
        which = ", ".join(str(i + 1) for i in self.failed)
        return (f"failed its smoke test: golden prompt(s) {which} of its list did not pass (score "
                f"{self.score:.2f}); it does not serve on this device")


def passes(golden: Golden, answer: str) -> bool:
    """Whether ``answer`` is what ``golden`` expects."""
    if golden.expect is not None and golden.expect.casefold() not in answer.casefold():
        return False
    if golden.expect_regex is not None:
        try:
            return re.search(golden.expect_regex, answer) is not None
        except re.error:
            return False  # a pattern that does not compile cannot be met
    return golden.expect is not None or bool(answer.strip())


def score(results: Sequence[bool], threshold: float = 1.0) -> SmokeResult:
    """The result of golden prompts that passed (True) or failed (False), against ``threshold``."""
    if not results:
        return SmokeResult(None, True)
    value = sum(results) / len(results)
    failed = tuple(i for i, ok in enumerate(results) if not ok)
    return SmokeResult(value, value >= threshold, failed)


async def run(golden: Sequence[Golden], ask: Ask, threshold: float = 1.0) -> SmokeResult:
    """Ask each golden prompt in turn; a prompt the server fails to answer counts as failed (and as an error)."""
    results: list[bool] = []
    errors = 0
    for g in golden:
        try:
            answer = await ask(g.prompt, g.max_tokens)
        except SlmopsError:
            errors += 1
            results.append(False)
            continue
        results.append(passes(g, answer))
    result = score(results, threshold)
    return SmokeResult(result.score, result.passed, result.failed, errors)


__all__ = ["SmokeResult", "passes", "run", "score"]
