"""Golden prompts as a smoke test: what passes, the score against the threshold, and prompts the server could not
answer. No model: the answers are given."""

from __future__ import annotations

import asyncio

import pytest

from slmops.api.fleet import Golden
from slmops.fleet.agent import smoke
from slmops.types.errors import EngineError


@pytest.mark.parametrize("golden,answer,ok", [
    (Golden(prompt="capital of France?", expect="Paris"), "It is PARIS, of course.", True),
    (Golden(prompt="capital of France?", expect="Paris"), "Lyon", False),
    (Golden(prompt="2+2", expect_regex=r"\b4\b"), "The answer is 4.", True),
    (Golden(prompt="2+2", expect_regex=r"\b4\b"), "The answer is 42.", False),
    (Golden(prompt="2+2", expect="4", expect_regex=r"^\D*4\D*$"), "four: 4", True),  # both must hold
    (Golden(prompt="2+2", expect="4", expect_regex=r"^five"), "4", False),
    (Golden(prompt="x", expect_regex="(unclosed"), "(unclosed", False),  # a pattern that cannot compile fails
    (Golden(prompt="say anything"), "something", True),
    (Golden(prompt="say anything"), "  \n", False),
])
def test_what_passes(golden: Golden, answer: str, ok: bool) -> None:
    assert smoke.passes(golden, answer) is ok


def test_score_and_threshold() -> None:
    assert smoke.score([]) == smoke.SmokeResult(None, True)  # no golden prompts: loading was the test
    assert smoke.score([True, True]).passed and smoke.score([True, True]).score == 1.0
    half = smoke.score([True, False, True, False])
    assert (half.score, half.passed, half.failed) == (0.5, False, (1, 3))
    assert smoke.score([True, False, True, False], threshold=0.5).passed
    assert "golden prompt(s) 2, 4" in half.describe() and "does not serve" in half.describe()


def test_a_prompt_the_server_cannot_answer_fails_and_counts_as_an_error() -> None:
    golden = [Golden(prompt="a", expect="yes"), Golden(prompt="b", expect="yes"), Golden(prompt="c")]
    asked: list[tuple[str, int]] = []

    async def ask(prompt: str, max_tokens: int) -> str:
        asked.append((prompt, max_tokens))
        if prompt == "b":
            raise EngineError("the runner died")
        return "yes"

    result = asyncio.run(smoke.run(golden, ask))
    assert asked == [("a", 32), ("b", 32), ("c", 32)]
    assert (result.passed, result.failed, result.errors) == (False, (1,), 1)
    assert result.score == pytest.approx(2 / 3)
