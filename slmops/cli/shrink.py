"""``slmops shrink`` and ``slmops distill``: a smaller, faster model without its least important transformer blocks,
what that cost, and training that wins some of it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from slmops.cli.common import audited, console, err_console, local_engine, print_table, store
from slmops.cli.ops import TensorBar
from slmops.types.errors import InvalidInput, ModelNotFound
from slmops.types.name import ModelName


def _blocks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise InvalidInput(f"--blocks takes block numbers separated by commas, such as 12,14; got {text!r}") from None


def shrink_cmd(
    source: str = typer.Argument(..., help="Model to shrink (it is not changed)."),
    to: str = typer.Option(..., "--to", help="Name of the new model."),
    drop: int = typer.Option(0, "--drop", min=0, help="Drop this many blocks, the least important measured."),
    blocks: str = typer.Option(None, "--blocks", help="Drop these blocks instead (numbers, comma-separated)."),
    calibration: Path = typer.Option(None, "--calibration", help="Text to measure importance on "
                                     "(default: the shipped calibration text)."),
    tokens: int = typer.Option(512, "--tokens", min=16, help="Calibration tokens to measure on."),
    report: bool = typer.Option(True, "--report/--no-report",
                                help="Measure both models: held-out perplexity, golden prompts, speed, memory."),
    runs: int = typer.Option(3, "--runs", min=1, help="Speed runs per model in the report; medians are reported."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Drop whole transformer blocks (llama.cpp models), chosen by how little they change the hidden state."""
    from slmops.ops.shrink import shrink_model

    s = store()
    src, dst = ModelName.parse(source), ModelName.parse(to)
    if not s.exists(src):
        raise ModelNotFound(src.display)
    text = _read(calibration)
    with audited("shrink", to, source=src.display), TensorBar("measuring blocks") as bar:
        size_before = s.record(src).size
        shrunk = shrink_model(s, src, dst, drop, _blocks(blocks), text, tokens,
                              lambda item: bar(item["done"], item["total"]) if item.get("step") == "block" else None)
    out: dict[str, Any] = {"model": dst.display, "source": src.display, "blocks": shrunk.blocks_before,
                           "dropped": shrunk.dropped, "size_bytes": [size_before, s.record(dst).size]}
    if shrunk.importance is not None:
        out["angular_distance"] = shrunk.importance.distances
        out["calibration_tokens"] = shrunk.importance.tokens
    if report:
        out["report"] = _measure(s, [src, dst], runs)
    if json_:
        print(json.dumps(out, indent=2))
        return
    _print(out)


def _measure(s, names: list[ModelName], runs: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Perplexity and golden prompts (``slmops eval``), then speed and memory (``slmops bench``, models alternated)."""
    from slmops.engine.client import spec_from_store
    from slmops.ops.bench import BenchPlan, bench
    from slmops.ops.evaluate import evaluate

    specs = [spec_from_store(s, n) for n in names]
    engine = local_engine()
    try:
        quality = [evaluate(engine, spec, 512, 0, golden=True) for spec in specs]
    finally:
        engine.close()
    speed = bench([(spec, s.inspect(n).file_type, s.record(n).size) for spec, n in zip(specs, names)],
                  BenchPlan(runs=runs, tokens=64, prompt_tokens=256, parallel=4),
                  lambda msg: err_console.print(msg, markup=False))
    return [{"model": n.display, "perplexity": q.perplexity, "golden": [q.golden_passed, q.golden_total],
             "decode_tokens_per_s": b.decode_tokens_per_s, "prompt_tokens_per_s": b.prompt_tokens_per_s,
             "peak_rss_bytes": b.peak_rss_bytes, "size_bytes": b.size_bytes}
            for n, q, b in zip(names, quality, speed)]


def _print(out: dict[str, Any]) -> None:
    dist = out.get("angular_distance")
    if dist:
        console.print(f"block importance (angular distance on {out['calibration_tokens']} tokens):", markup=False)
        top = max(dist)
        for i, d in enumerate(dist):
            mark = "  dropped" if i in out["dropped"] else ""
            console.print(f"  {i:3d}  {d:.4f}  {'█' * max(1, round(24 * d / top))}{mark}", markup=False)
    before, after = out["size_bytes"]
    console.print(f"wrote {out['model']}: {out['blocks'] - len(out['dropped'])} of {out['blocks']} blocks "
                  f"(dropped {', '.join(map(str, out['dropped']))}), {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB",
                  markup=False)
    if out.get("report"):
        _print_report(out["report"])


def _print_report(rows: list[dict[str, Any]]) -> None:
    """One row per model, then each later model against the first."""
    table = [("MODEL", "SIZE", "PERPLEXITY", "GOLDEN", "DECODE tok/s", "PROMPT tok/s", "PEAK RSS")]
    for r in rows:
        table.append((r["model"], f"{r['size_bytes'] / 1e6:.0f} MB", f"{r['perplexity']:.2f}",
                      "{}/{}".format(*r["golden"]), f"{r['decode_tokens_per_s']:.1f}",
                      f"{r['prompt_tokens_per_s']:.0f}", f"{r['peak_rss_bytes'] / 1e6:.0f} MB"))
    base = rows[0]
    for new in rows[1:]:
        table.append((f"  {new['model']} / {base['model']}", f"{new['size_bytes'] / base['size_bytes']:.2f}x",
                      f"{new['perplexity'] / base['perplexity']:.2f}x", "",
                      f"{new['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x",
                      f"{new['prompt_tokens_per_s'] / base['prompt_tokens_per_s']:.2f}x",
                      f"{new['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x"))
    print_table(table, gap=2)


def distill_cmd(
    student: str = typer.Argument(..., help="Model to heal (it is not changed): a pruned or quantized one."),
    teacher: str = typer.Option(..., "--teacher", help="The model it was made from."),
    to: str = typer.Option(..., "--to", help="Name of the new model."),
    steps: int = typer.Option(40, "--steps", min=1, help="Training steps."),
    lr: float = typer.Option(5e-5, "--lr", help="Learning rate (AdamW)."),
    seq_len: int = typer.Option(256, "--seq-len", min=16, help="Tokens per training window."),
    batch: int = typer.Option(2, "--batch", min=1, help="Windows per step."),
    text: Path = typer.Option(None, "--text", help="Text to train on (default: the shipped calibration text)."),
    report: bool = typer.Option(True, "--report/--no-report",
                                help="Measure teacher, student and result: perplexity, golden prompts, speed, memory."),
    runs: int = typer.Option(3, "--runs", min=1, help="Speed runs per model in the report; medians are reported."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of the loss curve and the table here."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a student toward its teacher's token distributions (KL), on the CPU; write it back as a GGUF."""
    from slmops.ops.distill import DistillPlan, distill_model

    s = store()
    names = [ModelName.parse(n) for n in (teacher, student, to)]
    for n in names[:2]:
        if not s.exists(n):
            raise ModelNotFound(n.display)
    if plot is not None:
        from slmops.ops.charts import require
        require()
    plan = DistillPlan(steps=steps, lr=lr, seq_len=seq_len, batch=batch)
    with audited("distill", to, source=names[1].display, teacher=names[0].display), TensorBar("training") as bar:
        result = distill_model(s, names[0], names[1], names[2], plan, _read(text), progress=lambda item: bar(
            item["done"], item["total"], f"loss {item['loss']:.4f}") if item.get("step") == "train" else None,
            status=lambda msg: err_console.print(msg, markup=False))
    out: dict[str, Any] = {"model": names[2].display, "student": names[1].display, "teacher": names[0].display,
                           "steps": steps, "losses": result.losses, "seconds": result.seconds,
                           "tokens_per_step": result.tokens_per_step}
    if report:
        out["report"] = _measure(s, names, runs)
    if plot is not None:
        from slmops.ops.distill import plot as draw
        draw(out, plot)
    if json_:
        print(json.dumps(out, indent=2))
        return
    console.print(f"wrote {out['model']}: {steps} steps in {result.seconds:.0f} s, loss {result.losses[0]:.4f} -> "
                  f"{result.losses[-1]:.4f}", markup=False)
    if report:
        _print_report(out["report"])


def _read(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read {path}: {e}") from None
