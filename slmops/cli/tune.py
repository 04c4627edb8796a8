"""``slmops tune``: fine-tune a model on the answers people rated well, as a LoRA adapter over it.

    slmops fleet feedback export --release assistant:1.4.0 > feedback.jsonl
    slmops feedback dataset feedback.jsonl -o data/
    slmops tune registry.example.com/models/assistant:1.4.0 --data data/ --to assistant:tuned --plot tune.png
    slmops release assistant:1.5.0 --model assistant:tuned --baseline registry.example.com/models/assistant:1.4.0 \\
        --heldout data/ --golden golden.jsonl --registry registry.example.com/models --key release.pem --no-rollout

The training lives in :mod:`slmops.ops.tune`; the report is the release gate's own measurement (held-out answers,
held-out text, golden prompts) of the base and the tuned model, so what it shows is what the gate will judge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from slmops.cli.common import audited, console, err_console, local_engine, print_table, store
from slmops.cli.ops import TensorBar
from slmops.types.errors import ModelNotFound
from slmops.types.name import ModelName


def tune_cmd(
    base: str = typer.Argument(..., help="Model to tune (it is not changed): the release the feedback is about."),
    data: Path = typer.Option(..., "--data", help="Dataset folder made by `slmops feedback dataset`."),
    to: str = typer.Option(..., "--to", help="Name of the new model (the base plus the adapter)."),
    steps: int = typer.Option(30, "--steps", min=1, help="Training steps."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate (AdamW)."),
    rank: int = typer.Option(8, "--rank", min=1, help="LoRA rank."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (the adapter's scale is alpha / rank)."),
    batch: int = typer.Option(4, "--batch", min=1, help="Examples per step."),
    max_len: int = typer.Option(512, "--max-len", min=32, help="Tokens per example; longer ones keep their end."),
    merge: bool = typer.Option(False, "--merge", help="Fold the adapter into the weights (quantized back to the "
                                                      "base's type): a whole model, decoding at the base's speed."),
    report: bool = typer.Option(True, "--report/--no-report", help="Score the base and the tuned model: held-out "
                                "answers, held-out text, golden prompts."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of the loss curve and the table here."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a LoRA adapter on the well-rated answers of a feedback dataset (CPU); write BASE + ADAPTER as TO."""
    from slmops.ops.dataset import load
    from slmops.ops.tune import TunePlan, tune_model

    s = store()
    src, dst = ModelName.parse(base), ModelName.parse(to)
    if not s.exists(src):
        raise ModelNotFound(src.display)
    if plot is not None:
        from slmops.ops.charts import require
        require()
    ds = load(data)
    plan = TunePlan(steps=steps, lr=lr, rank=rank, alpha=alpha, batch=batch, max_len=max_len, merge=merge)
    with audited("tune", to, source=src.display, dataset=ds.digest), TensorBar("training") as bar:
        tuned = tune_model(s, src, ds, dst, plan, progress=lambda item: bar(
            item["done"], item["total"], f"loss {item['loss']:.4f}") if item.get("step") == "train" else None,
            status=lambda msg: err_console.print(msg, markup=False))
    out: dict[str, Any] = {"model": dst.display, "base": src.display, "dataset": ds.digest,
                           "examples": tuned.examples, "heldout": len(ds.heldout), "steps": steps,
                           "losses": tuned.losses, "seconds": tuned.seconds, "adapter_bytes": tuned.adapter_bytes,
                           "trainable_parameters": tuned.trainable_parameters, "merged": merge,
                           "size_bytes": s.record(dst).size,
                           "replaced_adapters": tuned.replaced_adapters}
    if report:
        out["report"] = _measure(s, src, dst, ds)
    if plot is not None:
        _plot(out, plot)
    if json_:
        print(json.dumps(out, indent=2))
        return
    made = (f"merged into {out['base']}'s weights" if merge else
            f"{out['base']} + a {(tuned.adapter_bytes or 0) / 1e6:.1f} MB adapter")
    console.print(f"wrote {out['model']}: {made}, {steps} steps on {tuned.examples} answers in {tuned.seconds:.0f} s, loss "
                  f"{tuned.losses[0]:.4f} -> {tuned.losses[-1]:.4f}", markup=False)
    if report:
        _print(out["report"])


def _measure(s, base: ModelName, tuned: ModelName, ds) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The release gate's measurement of both models, limits aside (nothing is refused here)."""
    from slmops.ops.dataset import conversations
    from slmops.ops.release import GatePlan, evaluate_gate

    heldout = tuple(tuple(c) for c in conversations(ds.heldout))
    result = evaluate_gate(local_engine, s, base, [base, tuned], GatePlan(heldout=heldout))
    return [{"model": r["model"], "heldout_perplexity": r["heldout"]["perplexity"],
             "heldout_increase_percent": r["heldout"]["increase_percent"],
             "text_perplexity": r["eval"]["perplexity"], "text_increase_percent": r["perplexity_increase_percent"],
             "golden": [r["eval"]["golden_passed"], r["eval"]["golden_total"]]} for r in result["models"]]


def _table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "held-out answers ppl", "held-out text ppl", "golden"]
    return header, [[r["model"], f"{r['heldout_perplexity']:.3f} ({r['heldout_increase_percent']:+.1f}%)",
                     f"{r['text_perplexity']:.2f} ({r['text_increase_percent']:+.1f}%)",
                     "{}/{}".format(*r["golden"])] for r in rows]


def _print(rows: list[dict[str, Any]]) -> None:
    header, cells = _table(rows)
    print_table([[h.upper() for h in header], *cells], gap=2)


def _plot(out: dict[str, Any], path: Path) -> None:
    from slmops.ops.charts import training_chart

    header, cells = _table(out.get("report") or [])
    training_chart(path, out["losses"], f"tuning {out['base']} on {out['examples']} rated answers",
                   "cross-entropy of the answers", header, cells, [0.36, 0.26, 0.24, 0.12])
