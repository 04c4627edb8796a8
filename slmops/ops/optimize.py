"""``slmops optimize``: find the fastest weight layout for this machine, and prove what it costs in quality.

Which layout is fastest depends on the CPU (llama.cpp repacks Q4_0, Q4_K and IQ4_NL into interleaved kernels on
AVX2 and NEON; Q8_0 prompt processing has its own fast path), so the candidates are measured here rather than
looked up: each is quantized from the source, benchmarked in a runner process as the server would run it, and
evaluated against the source on the shipped held-out text and golden prompts. A candidate counts as lossless when
its perplexity is within ``max_ppl_increase`` percent of the source's and it passes every golden prompt the source
passes; without ``allow_lossy`` only those may win. Speed is the geometric mean of prompt and decode tokens/s
(chat needs both). The winner is kept as ``<model>-<type>``; the source stays, the other candidates go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from slmops.engine.client import spec_from_store
from slmops.ops.bench import BenchPlan, bench
from slmops.ops.evaluate import EvalReport, evaluate
from slmops.ops.quantize import quantize_model
from slmops.store.store import Store
from slmops.types import quant
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

CANDIDATES = ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "f16")


@dataclass
class Candidate:
    name: str  # model name (the source's own for the baseline)
    qtype: str
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    perplexity: float
    ppl_increase: float  # percent over the source
    golden: str
    lossless: bool

    @property
    def speed(self) -> float:
        return math.sqrt(self.prompt_tokens_per_s * self.decode_tokens_per_s)


@dataclass
class Outcome:
    source: Candidate
    candidates: list[Candidate]
    winner: Candidate | None  # None: nothing beat the source
    why: str


def candidate_types(source_type: str, allow_lossy: bool, types: list[str] | None) -> list[str]:
    """The types worth trying: more bits than the source (or all of them, when lossy layouts may win)."""
    chosen = [quant.parse(t) for t in types] if types else list(CANDIDATES)
    source = quant.of_file_type(source_type)
    chosen = [t for t in chosen if t != source and (allow_lossy or quant.loses_nothing(source_type, t))]
    if not chosen:
        raise InvalidInput(f"no candidate layout for a {source_type} model without quality loss; pass "
                           "--allow-lossy to try smaller types")
    return chosen


def optimize(store: Store, name: ModelName, engine, allow_lossy: bool = False,  # type: ignore[no-untyped-def]
             max_ppl_increase: float = 1.0, types: list[str] | None = None, runs: int = 2,
             progress: Callable[[str], None] = lambda _: None) -> Outcome:
    """Measure, decide, keep the winner; ``engine``: an in-process engine for the golden prompts."""
    info = store.inspect(name)
    qtypes = candidate_types(info.file_type, allow_lossy, types)
    taken = [f"{name.display}-{q}" for q in qtypes if store.exists(ModelName.parse(f"{name.display}-{q}"))]
    if taken:
        raise InvalidInput(f"{', '.join(taken)} already exist; remove them (slmops rm) before optimizing again")
    made: list[tuple[str, ModelName]] = []
    try:
        for qtype in qtypes:
            progress(f"quantizing to {qtype}")
            target = ModelName.parse(f"{name.display}-{qtype}")
            quantize_model(store, name, target, qtype, allow_requantize=True)
            made.append((qtype, target))
        progress("measuring speed")
        names = [name] + [t for _, t in made]
        specs = [(spec_from_store(store, n), "", 0) for n in names]
        speeds = bench(specs, BenchPlan(runs=runs, tokens=64, prompt_tokens=256, parallel=1), progress)
        reports: list[EvalReport] = []
        for spec, _, _ in specs:
            progress(f"evaluating {spec.name}")
            reports.append(evaluate(engine, spec))
        base = _candidate(name.display, quant.of_file_type(info.file_type), speeds[0], reports[0], reports[0],
                          max_ppl_increase)
        cands = [_candidate(t.display, q, s, r, reports[0], max_ppl_increase)
                 for (q, t), s, r in zip(made, speeds[1:], reports[1:])]
        winner, why = _decide(base, cands, allow_lossy)
    except BaseException:
        for _, target in made:
            store.remove(target)
        raise
    for _, target in made:
        if winner is None or target.display != winner.name:
            store.remove(target)
    return Outcome(base, cands, winner, why)


def _candidate(name: str, qtype: str, speed, report: EvalReport, base: EvalReport,  # type: ignore[no-untyped-def]
               limit: float) -> Candidate:
    increase = 100 * (report.perplexity / base.perplexity - 1)
    return Candidate(name=name, qtype=qtype, prompt_tokens_per_s=speed.prompt_tokens_per_s,
                     decode_tokens_per_s=speed.decode_tokens_per_s, perplexity=report.perplexity,
                     ppl_increase=increase, golden=f"{report.golden_passed}/{report.golden_total}",
                     lossless=increase <= limit and report.golden_passed >= base.golden_passed)


def _decide(base: Candidate, cands: list[Candidate], allow_lossy: bool) -> tuple[Candidate | None, str]:
    eligible = [c for c in cands if c.lossless or allow_lossy]
    best = max(eligible, key=lambda c: c.speed, default=None)
    if best is None or best.speed <= base.speed:
        return None, (f"no {'candidate' if allow_lossy else 'lossless candidate'} is faster than {base.name}; "
                      "nothing written")
    kind = "lossless" if best.lossless else f"lossy: perplexity {best.ppl_increase:+.1f}%"
    return best, (f"{best.name}: {best.speed / base.speed:.2f}x as fast as {base.name} "
                  f"({kind}, golden {best.golden})")
