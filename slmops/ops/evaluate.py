"""Quality checks a pipeline can gate on: perplexity on a held-out text, and a small golden-prompt set.

Perplexity is computed as llama.cpp's ``llama-perplexity`` does (:mod:`slmops.engine.llamacpp.perplexity`): the text
is cut into windows of ``n_ctx`` tokens, each decoded on its own from a clear cache, and only the second half of
each window is scored, so every scored token sees at least ``n_ctx/2`` tokens of context. The text
(``data/heldout.txt``: the Declaration of Independence, the Gettysburg Address and Lincoln's second inaugural, all
public domain) is shipped, so numbers compare across machines and runs. Golden prompts (``data/golden.json``) check
answers by regex or JSON Schema at temperature 0: what a quantization that breaks a model gets wrong first.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import jsonschema

from slmops.engine.client import ModelSpec, Request
from slmops.types.errors import InvalidInput


def heldout_text() -> str:
    return resources.files("slmops.ops").joinpath("data/heldout.txt").read_text()


def golden_set() -> list[dict[str, Any]]:
    return json.loads(resources.files("slmops.ops").joinpath("data/golden.json").read_text())


@dataclass
class Perplexity:
    value: float
    tokens: int  # tokens scored
    windows: int


def perplexity(spec: ModelSpec, text: str, n_ctx: int = 512, max_windows: int = 0, threads: int = 0) -> Perplexity:
    """``max_windows``: score only the first windows (0: all), for a quick check."""
    from slmops.engine.llamacpp.perplexity import score  # llama.cpp loads only when a model is scored

    if n_ctx < 16:
        raise InvalidInput("the evaluation context must be at least 16 tokens")
    nll, count, windows = score(spec, text, n_ctx, max_windows, threads)
    return Perplexity(value=math.exp(nll / count), tokens=count, windows=windows)


def answer_perplexity(spec: ModelSpec, conversations: list[list[dict[str, Any]]], n_ctx: int = 1024,
                      threads: int = 0) -> Perplexity:
    """Perplexity of each conversation's answer given the turns before it, rendered as serving renders them: the
    held-out score of a model tuned on rated feedback (:mod:`slmops.ops.tune`)."""
    from slmops.engine.llamacpp.perplexity import score_answers

    if not conversations:
        raise InvalidInput("no held-out conversations to score")
    nll, count, n = score_answers(spec, conversations, n_ctx, threads)
    return Perplexity(value=math.exp(nll / count), tokens=count, windows=n)


@dataclass
class GoldenResult:
    passed: int
    total: int
    failures: list[str] = field(default_factory=list)


def run_golden(engine, spec: ModelSpec, cases: list[dict[str, Any]]) -> GoldenResult:  # type: ignore[no-untyped-def]
    """Each case: ``prompt`` (chat) or ``raw`` (completion), and ``regex`` or ``schema`` to check the answer."""
    failures = []
    for case in cases:
        options = {"temperature": 0, "num_predict": case.get("num_predict", 48)}
        if "raw" in case:
            req = Request(prompt=case["raw"], raw=True, options=options)
        else:
            req = Request(messages=[{"role": "user", "content": case["prompt"]}], options=options,
                          format=case.get("schema"))
        answer = "".join(out.text for out in engine.run(spec, req))
        problem = _check(case, answer)
        if problem:
            failures.append(f"{case['name']}: {problem}")
    return GoldenResult(passed=len(cases) - len(failures), total=len(cases), failures=failures)


def _check(case: dict[str, Any], answer: str) -> str | None:
    if "regex" in case and not re.search(case["regex"], answer, re.IGNORECASE | re.DOTALL):
        return f"answer {answer[:60]!r} does not match /{case['regex']}/"
    if "schema" in case:
        try:
            jsonschema.validate(json.loads(answer), case["schema"])
        except (ValueError, jsonschema.ValidationError) as err:
            return f"answer is not valid for its schema ({str(err).splitlines()[0][:80]})"
    return None


@dataclass
class EvalReport:
    model: str
    perplexity: float
    tokens: int
    windows: int
    n_ctx: int
    golden_passed: int
    golden_total: int
    failures: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(engine, spec: ModelSpec, n_ctx: int = 512, max_windows: int = 0,  # type: ignore[no-untyped-def]
             text: str | None = None, golden: bool = True) -> EvalReport:
    t0 = time.perf_counter()
    ppl = perplexity(spec, text if text is not None else heldout_text(), n_ctx, max_windows)
    gold = run_golden(engine, spec, golden_set() if golden else [])
    return EvalReport(model=spec.name, perplexity=ppl.value, tokens=ppl.tokens, windows=ppl.windows, n_ctx=n_ctx,
                      golden_passed=gold.passed, golden_total=gold.total, failures=gold.failures,
                      seconds=time.perf_counter() - t0)


def increase(candidate: EvalReport, baseline: EvalReport) -> float:
    """Perplexity increase over the baseline, in percent (negative: better)."""
    return 100 * (candidate.perplexity / baseline.perplexity - 1)


def gate(candidate: EvalReport, baseline: EvalReport, max_increase: float) -> str | None:
    """Why ``candidate`` must not replace ``baseline`` (its perplexity rose more than ``max_increase`` percent), or
    ``None`` when it may. Golden-prompt failures are reported beside it, not gated."""
    delta = increase(candidate, baseline)
    if delta <= max_increase:
        return None
    return (f"gate failed: perplexity of {candidate.model} is {delta:+.1f}% over {baseline.model} "
            f"(limit {max_increase:+.1f}%); keep the baseline")
