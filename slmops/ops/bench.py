"""``slmops bench``: how fast a model runs here, measured the way the server runs it.

Each run starts a fresh runner process per model (the server's :class:`ProcessEngine`), so load time is a real
load and peak RSS (``VmHWM`` of that process) is the model's alone. Models are measured alternately, run by run,
so drift on a noisy machine (thermal, other load) spreads over all of them instead of favouring one; medians are
reported. Prompts carry a run-specific prefix so the prefix cache never serves a measured prompt.

One model at a time, not all loaded together: each is measured alone on the machine, as a device serving one
model runs it, and no model's load or decode competes with another's memory or cores.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.engine.client import EngineConfig, ModelSpec, Request
from slmops.ops.evaluate import heldout_text
from slmops.types.errors import InvalidInput

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"


@dataclass
class BenchResult:
    """Medians over the runs; ``raw`` keeps every run's values (and ``cold_start_s``, runner start plus load) so
    the spread on a noisy machine can be judged, not hidden. ``load_s`` is the model load in its runner alone."""

    model: str
    runs: int
    file_type: str
    size_bytes: int
    load_s: float
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    decode_tokens_per_s_parallel: float
    parallel: int
    ttft_ms: float
    peak_rss_bytes: int
    raw: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchPlan:
    runs: int = 3
    tokens: int = 128  # generated per decode measurement
    prompt_tokens: int = 512
    parallel: int = 4


def _peak_rss(pid: int) -> int:
    """The process's high-water mark: the most memory it ever held, not what it holds after the runs."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:  # not Linux: Windows keeps a peak; elsewhere the current size is the best bound
        import psutil

        info = psutil.Process(pid).memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    return 0


def _options(n: int) -> dict[str, Any]:
    return {"temperature": 0, "repeat_penalty": 1.0, "num_predict": n}


def _final(engine, spec: ModelSpec, req: Request) -> tuple[Any, float]:  # type: ignore[no-untyped-def]
    """The final output, and seconds from submitting to the first piece."""
    t0 = time.perf_counter()
    first = None
    for out in engine.run(spec, req):
        if first is None:
            first = time.perf_counter() - t0
        if out.done:
            return out, first
    raise RuntimeError("generation ended without a final record")


def _decode_rate(stats) -> float:  # type: ignore[no-untyped-def]
    """Tokens after the first over the time after the first: the first token comes out of the prompt pass
    (that is prompt speed and first-token time), so counting it here would inflate short runs."""
    return (stats.eval_count - 1) / (stats.eval_duration / 1e9) if stats.eval_duration else 0.0


def _window_rate(stamps: list[list[float]]) -> float:
    """Pieces per second while every sequence decodes: from the last sequence's first piece to the first
    sequence's last, so staggered prefills and the drain, when fewer sequences remain, do not dilute the
    rate at N."""
    if not all(stamps):
        raise RuntimeError("a parallel sequence produced no text")
    start, end = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    if end <= start:  # they never overlapped: no rate at N to report, so report what the span gives
        start, end = min(s[0] for s in stamps), max(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if start < t <= end)
    return inside / (end - start) if end > start else 0.0


def _parallel_decode(engine, spec: ModelSpec, n: int, tokens: int, tag: str) -> float:  # type: ignore[no-untyped-def]
    """Aggregate tokens/s of ``n`` concurrent sequences, timed by the arrival of each piece. A piece may hold
    more than one token (a character split over tokens), so the piece rate is scaled by tokens per piece."""
    stamps: list[list[float]] = [[] for _ in range(n)]
    counts = [0] * n
    errors: list[Exception] = []

    def one(i: int) -> None:
        req = Request(prompt=f"{tag} {i}: {COUNTING}", raw=True, options=_options(tokens))
        try:
            for out in engine.run(spec, req):
                if out.text:
                    stamps[i].append(time.perf_counter())
                if out.done:
                    counts[i] = out.stats.eval_count
        except Exception as err:  # noqa: BLE001 - re-raised on the caller's thread below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return _window_rate(stamps) * sum(counts) / sum(len(s) for s in stamps)


def _prompt(engine, spec: ModelSpec, filler: str, n_tokens: int, tag: str) -> str:  # type: ignore[no-untyped-def]
    """About ``n_tokens`` of prose behind a run-specific tag (the filler repeats when a long prompt is asked)."""
    words = engine.tokenize(spec, filler)
    words = (words * (n_tokens // max(1, len(words)) + 1))[:max(1, n_tokens - 8)]
    return f"[{tag}] " + engine.detokenize(spec, words)


def measure_once(spec: ModelSpec, plan: BenchPlan, filler: str) -> dict[str, float]:
    """One run of every measurement in a fresh runner process."""
    from slmops.engine.process import ProcessEngine

    engine = ProcessEngine(EngineConfig(default_ctx=plan.prompt_tokens + plan.tokens + 64,
                                        num_parallel=max(1, plan.parallel), max_loaded=1))
    try:
        t0 = time.perf_counter()
        load_ns = engine.load(spec)
        cold_start = time.perf_counter() - t0  # runner process start + load: what a first request waits
        tag = uuid.uuid4().hex[:8]  # no two runs share a prompt prefix
        prompt = _prompt(engine, spec, filler, plan.prompt_tokens, tag)
        out, _ = _final(engine, spec, Request(prompt=prompt, raw=True, options=_options(1)))
        prompt_tps = out.stats.prompt_tokens_per_s
        _, ttft = _final(engine, spec, Request(messages=[{"role": "user", "content": f"Hello ({tag})"}],
                                               options=_options(1)))
        out, _ = _final(engine, spec, Request(prompt=f"{tag}: {COUNTING}", raw=True, options=_options(plan.tokens)))
        decode_tps = _decode_rate(out.stats)
        parallel_tps = _parallel_decode(engine, spec, plan.parallel, plan.tokens, tag) if plan.parallel > 1 \
            else decode_tps
        rss = _peak_rss(engine.loaded()[0].pid)
    finally:
        engine.close()
    return {"load_s": load_ns / 1e9, "cold_start_s": cold_start, "prompt_tokens_per_s": prompt_tps,
            "decode_tokens_per_s": decode_tps, "decode_tokens_per_s_parallel": parallel_tps, "ttft_ms": ttft * 1000,
            "peak_rss_bytes": rss}


def bench(specs: list[tuple[ModelSpec, str, int]], plan: BenchPlan,
          progress: Callable[[str], None] | None = None) -> list[BenchResult]:
    """``specs``: (spec, file type, size in bytes) per model; measured alternately, ``plan.runs`` times each."""
    if plan.tokens < 2:
        raise InvalidInput("decode speed needs at least 2 generated tokens; use --tokens 2 or more")
    filler = heldout_text()
    raw: list[dict[str, list[float]]] = [{} for _ in specs]
    for run in range(plan.runs):
        for i, (spec, _, _) in enumerate(specs):
            if progress:
                progress(f"run {run + 1}/{plan.runs}: {spec.name}")
            for key, value in measure_once(spec, plan, filler).items():
                raw[i].setdefault(key, []).append(value)
    results = []
    for (spec, file_type, size), r in zip(specs, raw):
        med = {k: statistics.median(v) for k, v in r.items()}
        results.append(BenchResult(model=spec.name, runs=plan.runs, file_type=file_type, size_bytes=size,
                                   load_s=med["load_s"], prompt_tokens_per_s=med["prompt_tokens_per_s"],
                                   decode_tokens_per_s=med["decode_tokens_per_s"],
                                   decode_tokens_per_s_parallel=med["decode_tokens_per_s_parallel"],
                                   parallel=plan.parallel, ttft_ms=med["ttft_ms"],
                                   peak_rss_bytes=int(med["peak_rss_bytes"]), raw=r))
    return results


def plot(results: list[BenchResult], path: Path) -> None:
    """Bars per metric, one colour per model; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slmops.store.atomic import atomic_writer

    metrics = [("prompt_tokens_per_s", "prompt tok/s"), ("decode_tokens_per_s", "decode tok/s (1 seq)"),
               ("decode_tokens_per_s_parallel", f"decode tok/s ({results[0].parallel} seqs)"),
               ("ttft_ms", "first token ms"), ("load_s", "load s")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4))
    for ax, (key, label) in zip(axes, metrics):
        ax.bar([r.model for r in results], [getattr(r, key) for r in results],
               color=[f"C{i}" for i in range(len(results))])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
