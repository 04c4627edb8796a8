"""What the backend seam costs: the in-process engine of this tree against the same engine at a commit before the
seam, in one run, alternating rounds (A B A B ...), each round a fresh process on the default model.

    python bench/seam_cost.py --before 0ef44d7 --rounds 4

S1: one stream, decode tokens/s (the engine's own eval count and duration); S2: eight streams at once, aggregate
tokens/s over the wall time. Prints medians per tree and the ratios (this tree / before); writes
``bench/results/seam_cost.json``. The machine is noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Runs inside each round's process, against whichever slmops is first on sys.path.
WORKER = r'''
import json, statistics, sys, threading, time
import slmops
from slmops.engine.client import EngineConfig, Request, spec_from_store
from slmops.engine.engine import Engine
from slmops.types.name import ModelName

spec = spec_from_store(slmops.open_store(), ModelName.parse("smollm2:135m"))
engine = Engine(EngineConfig(num_parallel=8, num_thread=int(sys.argv[1])))
opts = {"num_predict": 128, "temperature": 0, "seed": 1}

def once(prompt):
    final = None
    for out in engine.run(spec, Request(prompt=prompt, options=opts)):
        final = out
    return final.stats

once("Warm up.")
s1 = []
for _ in range(3):
    stats = once("Write a story about a fox who learns to sail.")
    s1.append(stats.eval_count / (stats.eval_duration / 1e9))
done = []
def client(i):
    done.append(once(f"Write a story about a robot number {i} who learns to sail."))
t0 = time.perf_counter()
threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
s2 = sum(s.eval_count for s in done) / (time.perf_counter() - t0)
print(json.dumps({"file": slmops.__file__, "s1": statistics.median(s1), "s2": s2}))
engine.close()
'''


def export(commit: str, into: Path) -> Path:
    """The tree at ``commit``, unpacked (``git archive``: nothing in the repository changes)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "slmops"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def round_(tree: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads)], capture_output=True, text=True, env=env,
                         timeout=900, cwd=tree)
    if out.returncode != 0:
        raise SystemExit(f"round on {tree} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["file"].startswith(str(tree)):
        raise SystemExit(f"the round imported {result['file']}, not the tree under {tree}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a commit before the seam")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": export(args.before, Path(tmp) / "before"), "after": export("HEAD", Path(tmp) / "after")}
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for i in range(args.rounds):
            for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                runs[name].append(round_(trees[name], args.threads))
                print(f"round {i + 1} {name}: S1 {runs[name][-1]['s1']:.1f} tok/s, S2 {runs[name][-1]['s2']:.1f} "
                      "tok/s", file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("s1", "s2")} for n, rs in runs.items()}
    ratios = {k: med["after"][k] / med["before"][k] for k in ("s1", "s2")}
    report = {"before": args.before, "rounds": args.rounds, "threads": args.threads, "median": med, "ratio": ratios,
              "runs": runs}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "seam_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"S1 single stream: {med['before']['s1']:.1f} -> {med['after']['s1']:.1f} tok/s ({ratios['s1']:.3f}x)")
    print(f"S2 8 streams:     {med['before']['s2']:.1f} -> {med['after']['s2']:.1f} tok/s ({ratios['s2']:.3f}x)")


if __name__ == "__main__":
    main()
