"""Structured pruning and distillation in one run: the source model, the pruned one and the distilled one, measured
together (held-out perplexity, golden prompts, decode and prompt speed, peak memory; speeds alternated run by run
so machine noise spreads over all three), with the loss curve and the table as one PNG.

    python bench/shrink_bench.py [--home DIR] [--drop 3] [--steps 40] [--runs 3]

It runs the real CLI: ``slmops shrink SRC --to SRC-sN --drop N`` then ``slmops distill SRC-sN --teacher SRC``
with the report on. Output: ``bench/results/shrink_distill.json`` and ``docs/bench/shrink_distill.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent / "slmops"


def cli(home: Path, *args: str) -> dict:
    proc = subprocess.run([str(BIN), *args, "--json"], env={**os.environ, "SLMOPS_HOME": str(home)},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"slmops {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=Path(os.environ.get("SLMOPS_HOME", Path.home() / ".slmops")))
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--drop", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    pruned, healed = f"{a.model}-s{a.drop}", f"{a.model}-s{a.drop}-distilled"
    shrunk = cli(a.home, "shrink", a.model, "--to", pruned, "--drop", str(a.drop), "--no-report")
    png = HERE.parent / "docs" / "bench" / "shrink_distill.png"
    out = cli(a.home, "distill", pruned, "--teacher", a.model, "--to", healed, "--steps", str(a.steps),
              "--runs", str(a.runs), "--plot", str(png))
    result = {"shrink": shrunk, "distill": out, "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "shrink_distill.json").write_text(json.dumps(result, indent=2) + "\n")
    base = out["report"][0]
    print(f"dropped blocks {shrunk['dropped']} of {shrunk['blocks']}; {a.steps} distillation steps "
          f"in {out['seconds']:.0f} s")
    print("| model | size | perplexity | golden | decode tok/s | prompt tok/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in out["report"]:
        print(f"| `{r['model']}` | {r['size_bytes'] / 1e6:.0f} MB | {r['perplexity']:.2f} | "
              f"{r['golden'][0]}/{r['golden'][1]} | {r['decode_tokens_per_s']:.1f} "
              f"({r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}×) | {r['prompt_tokens_per_s']:.0f} | "
              f"{r['peak_rss_bytes'] / 1e6:.0f} MB |")


if __name__ == "__main__":
    main()
