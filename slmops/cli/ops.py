"""``slmops quantize`` and ``slmops eval``: make a smaller or faster model, and measure what it lost."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Self

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from slmops.cli.common import audited, console, err_console, local_engine, print_table, store
from slmops.types.errors import InvalidInput, ModelNotFound, SlmopsError
from slmops.types.name import ModelName


class TensorBar:
    """Steps of a long job done so far (tensors quantized, blocks measured, training steps), with a note such as
    the last loss."""

    def __init__(self, what: str):
        self.progress = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[note]}"), console=err_console,
                                 disable=not sys.stderr.isatty())
        self.task = self.progress.add_task(what, total=None, note="")

    def __call__(self, done: int, total: int, note: str = "") -> None:
        self.progress.update(self.task, completed=done, total=total, note=note)

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def warn(message: str) -> None:
    err_console.print(f"warning: {message}", markup=False, soft_wrap=True)


def quantize_cmd(
    source: str = typer.Argument(..., help="Model to quantize (it is not changed)."),
    type_: str = typer.Option(..., "--type", "-t", help="f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q4_1, q3_k_m, q2_k ..."),
    output: str = typer.Option(..., "--output", "-o", help="Name of the new model."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize",
                                          help="Allow an already-quantized source (quality may be lost)."),
) -> None:
    """Write a new model with the source's weights quantized by llama.cpp; template and parameters are kept."""
    from slmops.ops.quantize import quantize_model

    s = store()
    src, dst = ModelName.parse(source), ModelName.parse(output)
    if not s.exists(src):
        raise ModelNotFound(src.display)
    with audited("quantize", output, source=src.display, type=type_), TensorBar(f"quantizing to {type_}") as bar:
        quantize_model(s, src, dst, type_, allow_requantize, bar, warn)
    info = s.inspect(dst)
    size = s.record(dst).size
    console.print(f"wrote {dst.display}: {info.file_type}, {size / 1e6:.0f} MB", markup=False)


def eval_cmd(
    model: str = typer.Argument(..., help="Model to evaluate."),
    baseline: str | None = typer.Option(None, "--baseline", help="Compare with this model."),
    max_ppl_increase: float | None = typer.Option(
        None, "--max-ppl-increase", help="Exit 1 if perplexity rises more than this many percent over --baseline."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per perplexity window."),
    windows: int = typer.Option(0, "--windows", help="Score only this many windows (0: the whole text)."),
    golden: bool = typer.Option(True, "--golden/--no-golden", help="Also run the golden prompts."),
    json_: bool = typer.Option(False, "--json", help="Print the reports as JSON."),
) -> None:
    """Perplexity on a shipped public-domain text and a golden-prompt set; with a baseline, the delta and a gate."""
    from slmops.engine.client import spec_from_store
    from slmops.ops.evaluate import evaluate, gate, increase

    if max_ppl_increase is not None and baseline is None:
        raise InvalidInput("--max-ppl-increase compares with a baseline; add --baseline MODEL")
    s = store()
    names = [ModelName.parse(model)] + ([ModelName.parse(baseline)] if baseline else [])
    for n in names:
        if not s.exists(n):
            raise ModelNotFound(n.display)
    engine = local_engine()
    try:
        reports = [evaluate(engine, spec_from_store(s, n), ctx, windows, golden=golden) for n in names]
    finally:
        engine.close()
    delta = increase(reports[0], reports[1]) if baseline else None
    if json_:
        out = {"model": reports[0].to_json()}
        if baseline:
            out.update(baseline=reports[1].to_json(), perplexity_increase_percent=delta)
        print(json.dumps(out, indent=2))
    else:
        _print_reports(reports, delta)
    verdict = gate(reports[0], reports[1], max_ppl_increase) if max_ppl_increase is not None else None
    if verdict:
        raise SlmopsError(verdict)


def _print_reports(reports, delta: float | None) -> None:  # type: ignore[no-untyped-def]
    rows = [("MODEL", "PERPLEXITY", "TOKENS", "GOLDEN", "SECONDS")]
    for r in reports:
        rows.append((r.model, f"{r.perplexity:.3f}", str(r.tokens), f"{r.golden_passed}/{r.golden_total}",
                     f"{r.seconds:.1f}"))
    print_table(rows)
    for r in reports:
        for failure in r.failures:
            console.print(f"  {r.model}: {failure}", markup=False, soft_wrap=True)
    if delta is not None:
        console.print(f"perplexity change: {delta:+.2f}% ({reports[0].model} against {reports[1].model})",
                      markup=False)


def bench_cmd(
    models: list[str] = typer.Argument(..., help="Models to measure (alternately)."),
    runs: int = typer.Option(3, "--runs", min=1, help="Runs per model; medians are reported."),
    tokens: int = typer.Option(128, "--tokens", min=1, help="Tokens generated per decode measurement."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", min=16, help="Prompt length for prompt speed."),
    parallel: int = typer.Option(4, "--parallel", min=1, help="Sequences decoded together for the aggregate."),
    json_: bool = typer.Option(False, "--json", help="Print results as JSON."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG chart here."),
) -> None:
    """Prompt and decode speed (1 and N sequences), time to first token, load time and peak memory."""
    from slmops.engine.client import spec_from_store
    from slmops.ops.bench import BenchPlan, bench

    if plot is not None:
        from slmops.ops.charts import require
        require()
    s = store()
    names = [ModelName.parse(m) for m in models]
    for n in names:
        if not s.exists(n):
            raise ModelNotFound(n.display)
    specs = [(spec_from_store(s, n), s.inspect(n).file_type, s.record(n).size) for n in names]
    results = bench(specs, BenchPlan(runs, tokens, prompt_tokens, parallel),
                    lambda msg: err_console.print(msg, markup=False))
    if plot is not None:
        from slmops.ops.bench import plot as draw
        draw(results, plot)
    if json_:
        print(json.dumps([r.to_json() for r in results], indent=2))
        return
    rows = [("MODEL", "TYPE", "SIZE", "LOAD s", "PROMPT tok/s", "DECODE tok/s", f"x{parallel} tok/s",
             "FIRST TOKEN ms", "PEAK RSS")]
    for r in results:
        rows.append((r.model, r.file_type, f"{r.size_bytes / 1e6:.0f} MB", f"{r.load_s:.2f}",
                     f"{r.prompt_tokens_per_s:.0f}", f"{r.decode_tokens_per_s:.1f}",
                     f"{r.decode_tokens_per_s_parallel:.1f}", f"{r.ttft_ms:.0f}", f"{r.peak_rss_bytes / 1e6:.0f} MB"))
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            rows.append((f"  {r.model} / {base.model}", "", "", f"{r.load_s / base.load_s:.2f}x",
                         f"{r.prompt_tokens_per_s / base.prompt_tokens_per_s:.2f}x",
                         f"{r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x",
                         f"{r.decode_tokens_per_s_parallel / base.decode_tokens_per_s_parallel:.2f}x",
                         f"{r.ttft_ms / base.ttft_ms:.2f}x", f"{r.peak_rss_bytes / base.peak_rss_bytes:.2f}x"))
    print_table(rows, gap=2)


def optimize_cmd(
    model: str = typer.Argument(..., help="Model to optimize (it is not changed)."),
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="Let a faster layout win even if it loses quality."),
    max_ppl_increase: float = typer.Option(1.0, "--max-ppl-increase",
                                           help="Perplexity increase (percent) still counted as no loss."),
    types: list[str] = typer.Option(None, "--type", "-t", help="Candidate types to try (repeatable)."),
    runs: int = typer.Option(2, "--runs", min=1, help="Benchmark runs per candidate."),
    json_: bool = typer.Option(False, "--json", help="Print the measurements as JSON."),
) -> None:
    """Quantize candidates, benchmark and evaluate each here, keep the fastest that loses no quality."""
    from dataclasses import asdict

    from slmops.ops.optimize import optimize

    s = store()
    name = ModelName.parse(model)
    if not s.exists(name):
        raise ModelNotFound(name.display)
    engine = local_engine()
    try:
        with audited("optimize", model):
            out = optimize(s, name, engine, allow_lossy, max_ppl_increase, types or None, runs,
                           lambda msg: err_console.print(msg, markup=False))
    finally:
        engine.close()
    if json_:
        print(json.dumps({"source": asdict(out.source), "candidates": [asdict(c) for c in out.candidates],
                          "winner": out.winner.name if out.winner else None, "why": out.why}, indent=2))
        return
    rows = [("MODEL", "PROMPT tok/s", "DECODE tok/s", "SPEED", "PERPLEXITY", "CHANGE", "GOLDEN", "LOSSLESS")]
    for c in [out.source, *out.candidates]:
        rows.append((c.name, f"{c.prompt_tokens_per_s:.0f}", f"{c.decode_tokens_per_s:.1f}",
                     f"{c.speed / out.source.speed:.2f}x", f"{c.perplexity:.3f}", f"{c.ppl_increase:+.2f}%", c.golden,
                     "yes" if c.lossless else "no"))
    print_table(rows, gap=2)
    console.print(("wrote " if out.winner else "") + out.why, markup=False, soft_wrap=True)
