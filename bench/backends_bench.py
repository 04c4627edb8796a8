"""The ONNX Runtime GenAI variant of the default model against its llama.cpp variants, in one run: load time, time to
first token, single-stream decode tokens/s, aggregate tokens/s of 8 concurrent streams, peak RSS. Each variant runs
in a fresh process of its own (so RSS is its own), through slmops' engine with the same threads; variants alternate
within each round so drift hits all alike. Prints ratios to the shipped Q4_1 file and writes JSON.

    python bench/backends_bench.py --rounds 3        # needs slmops[convert,onnx] for the ONNX variant
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Write a long story about a fox who learns to sail."
N_TOKENS = 128
STREAMS = 8
# name in the bench store -> (catalog model, variant)
VARIANTS = {"bench/cpu-q4_1": ("smollm2:135m", "cpu-q4_1"), "bench/cpu-q8_0": ("smollm2:135m", "cpu-q8_0"),
            "bench/cpu-onnx-int4": ("smollm2:135m-onnx", "cpu-onnx-int4")}
BASE = "bench/cpu-q4_1"


def prepare(home: Path) -> None:
    """Each variant pulled through the catalog (the ONNX one exported from the shipped file), under its own name."""
    from slmops.ops.variants import MachinePolicy
    from slmops.store.store import Store
    from slmops.types.name import ModelName

    store = Store(home / "models", variants=MachinePolicy(fallback=("cpu",)))
    for name, (model, variant) in VARIANTS.items():
        if store.exists(ModelName.parse(name)):
            continue
        print(f"pulling {model} ({variant})", flush=True)
        store.pull(ModelName.parse(model), variant=variant)
        store.copy(ModelName.parse(model), ModelName.parse(name))
        store.remove(ModelName.parse(model))


def one(home: Path, name: str, threads: int) -> dict:
    """Measured in this process: the engine loads ``name`` and serves one stream, then eight."""
    from slmops.engine.client import Request, spec_from_store
    from slmops.engine.engine import Engine
    from slmops.store.store import Store
    from slmops.types.name import ModelName

    spec = spec_from_store(Store(home / "models"), ModelName.parse(name))
    engine = Engine(num_thread=threads, num_parallel=STREAMS, default_ctx=1024)
    t0 = time.perf_counter()
    engine.load(spec)
    load_s = time.perf_counter() - t0
    options = {"temperature": 0, "num_predict": N_TOKENS}

    def request(i: int) -> Request:
        return Request(messages=[{"role": "user", "content": f"{PROMPT} ({i})"}], options=options)

    engine.run(spec, Request(messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})).close()
    t0 = time.perf_counter()
    ttft, final = None, None
    for out in engine.run(spec, request(0)):
        if ttft is None and out.text:
            ttft = time.perf_counter() - t0
        if out.done:
            final = out
    single = final.stats.eval_count / (final.stats.eval_duration / 1e9)

    counts = [0] * STREAMS
    def client(i: int) -> None:
        for out in engine.run(spec, request(i)):
            if out.done:
                counts[i] = out.stats.eval_count
    threads_ = [threading.Thread(target=client, args=(i,)) for i in range(STREAMS)]
    t0 = time.perf_counter()
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    aggregate = sum(counts) / (time.perf_counter() - t0)
    engine.close()
    return {"load_s": load_s, "ttft_s": ttft, "single_tok_s": single, "aggregate8_tok_s": aggregate,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--home", default=str(HERE / "out" / "backends-home"))
    ap.add_argument("--out", default=str(HERE / "results" / "backends_bench.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    home = Path(args.home)
    if args.one:
        print(json.dumps(one(home, args.one, args.threads)))
        return
    prepare(home)
    runs: dict[str, dict[str, list[float]]] = {}
    for rnd in range(args.rounds):
        for name in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--home", str(home), "--threads",
                                   str(args.threads)], capture_output=True, text=True, env=os.environ)
            if proc.returncode != 0:
                sys.exit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
            for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                runs.setdefault(name, {}).setdefault(k, []).append(v)
            print(f"round {rnd + 1} {name}: done", flush=True)
    medians = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in runs.items()}
    keys = list(medians[BASE])
    lines = ["| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, med in medians.items():
        cells = [f"{med[k]:.3g}" + ("" if name == BASE else f" ({med[k] / medians[BASE][k]:.2f}x)") for k in keys]
        lines.append(f"| {name.split('/')[1]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(),
                                           "cores": os.cpu_count(), "threads": args.threads},
                               "runs": runs, "medians": medians, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
