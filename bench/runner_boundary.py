"""What the runner process costs: the same generations through the in-process engine and through a runner
process, alternately, timed where the caller receives the pieces. Prints per-token time and the overhead.

    python bench/runner_boundary.py --rounds 5        # uses SLMOPS_HOME (default ~/.slmops) with smollm2:135m

Decode time per token is measured from the first piece to the last, so loading and prefill are left out; at 8
concurrent sequences it is aggregate time per token. The overhead is ``process / in-process - 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from slmops.engine.client import EngineConfig, Request, spec_from_store
from slmops.engine.engine import Engine
from slmops.engine.process import ProcessEngine
from slmops.local import open_store
from slmops.types.name import ModelName

HERE = Path(__file__).resolve().parent


def timed_generation(engine, spec, n_tokens: int, stamps: list[float]) -> int:
    """Run one greedy counting generation; append the arrival time of every piece."""
    req = Request(prompt="1, 2, 3, 4, 5,", raw=True,
                  options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": n_tokens})
    count = 0
    for out in engine.run(spec, req):
        stamps.append(time.perf_counter())
        if out.done:
            count = out.stats.eval_count
    return count


def per_token_ms(engine, spec, n_tokens: int, clients: int) -> float:
    stamps: list[list[float]] = [[] for _ in range(clients)]
    counts = [0] * clients

    def one(i: int) -> None:
        counts[i] = timed_generation(engine, spec, n_tokens, stamps[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(s[0] for s in stamps)  # every sequence decoding
    end = min(s[-1] for s in stamps)
    inside = sum(sum(1 for x in s if start <= x <= end) for s in stamps)
    return (end - start) * 1000 / max(1, inside - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--json", type=Path, default=HERE / "out" / "runner_boundary.json")
    args = ap.parse_args()

    spec = spec_from_store(open_store(), ModelName.parse(args.model))
    config = EngineConfig(default_ctx=2048, num_parallel=8)
    engines = {"in-process": Engine(config), "process": ProcessEngine(config)}
    for e in engines.values():
        e.load(spec)
        per_token_ms(e, spec, 16, 1)  # warm up
    results: dict[str, dict[int, list[float]]] = {k: {1: [], 8: []} for k in engines}
    for r in range(args.rounds):
        for clients in (1, 8):
            for name, e in engines.items():
                results[name][clients].append(per_token_ms(e, spec, args.tokens, clients))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    for e in engines.values():
        e.close()

    summary = {}
    print(f"{'clients':>8} {'in-process ms/tok':>18} {'process ms/tok':>15} {'overhead':>9}")
    for clients in (1, 8):
        a = statistics.median(results["in-process"][clients])
        b = statistics.median(results["process"][clients])
        summary[clients] = {"in_process_ms_per_token": a, "process_ms_per_token": b, "overhead": b / a - 1}
        print(f"{clients:>8} {a:>18.3f} {b:>15.3f} {100 * (b / a - 1):>8.2f}%")
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps({"rounds": args.rounds, "tokens": args.tokens, "summary": summary,
                                     "raw": results}, indent=2))


if __name__ == "__main__":
    main()
