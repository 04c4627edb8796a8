"""``slmops shrink``: a smaller, faster model without its least important transformer blocks, and what it cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from slmops.cli.common import audited, console, err_console, local_engine, store
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
    text = None
    if calibration is not None:
        try:
            text = calibration.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInput(f"cannot read the calibration text {calibration}: {e}") from None
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
    rows = out.get("report")
    if not rows:
        return
    table = [("MODEL", "SIZE", "PERPLEXITY", "GOLDEN", "DECODE tok/s", "PROMPT tok/s", "PEAK RSS")]
    for r in rows:
        table.append((r["model"], f"{r['size_bytes'] / 1e6:.0f} MB", f"{r['perplexity']:.2f}",
                      "{}/{}".format(*r["golden"]), f"{r['decode_tokens_per_s']:.1f}",
                      f"{r['prompt_tokens_per_s']:.0f}", f"{r['peak_rss_bytes'] / 1e6:.0f} MB"))
    base, new = rows
    table.append(("  new / source", f"{new['size_bytes'] / base['size_bytes']:.2f}x",
                  f"{new['perplexity'] / base['perplexity']:.2f}x", "",
                  f"{new['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x",
                  f"{new['prompt_tokens_per_s'] / base['prompt_tokens_per_s']:.2f}x",
                  f"{new['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        console.print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), markup=False, soft_wrap=True)
