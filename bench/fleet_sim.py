"""The fleet simulator at scale: 10,000 simulated devices, a 4-wave rollout of a signed release with a variant that
fails to load on one class and a TTFT regression on another, on SQLite and on PostgreSQL (a throw-away cluster).

    python bench/fleet_sim.py                                  # 10,000 devices, both databases
    python bench/fleet_sim.py --devices 2000 --db sqlite --poll 2s --report 2s

Each run is ``slmops fleet simulate`` (slmops/fleet/sim): a real ``slmops fleet serve`` process, a real
``docker-registry`` with two releases whose variants are signed and verified, every device enrolled through the
API with its own key, polling its signed desired state and reporting histograms. Writes
``bench/results/fleet_sim_<db>_<devices>.json`` and ``.png`` (devices per release over time, gate values per wave)
per run and prints a table of all runs (Markdown with ``--markdown``). After each rollout, ``--probe`` unrelated
changes are timed: what one change costs the control plane per device, since every change makes every device's
next poll recompute its desired state.

The goal on a 2-core machine (issue #15): 10,000 devices; the rollout converges in < 60 s; the bad variant is
stopped within one wave and every device that took it is back within 60 s of the decision; no violation; the final
state equals the ledger. The rates the devices poll and report at are chosen so that the machine is not saturated
by steady traffic (10,000 devices x (1/poll + 1/report) requests a second); see docs/fleet.md for the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slmops.config.settings import parse_duration
from slmops.fleet.sim import report, runner
from slmops.fleet.sim.devices import Timing
from slmops.fleet.sim.faults import Faults


def scenario(args: argparse.Namespace, db: str) -> runner.Scenario:
    return runner.Scenario(devices=args.devices, db=db, waves=tuple(float(w) for w in args.waves.split(",")),
                           bake_s=parse_duration(args.bake), faults=Faults.parse(args.faults),
                           timing=Timing(poll_s=parse_duration(args.poll), report_s=parse_duration(args.report)),
                           deadline_s=parse_duration(args.deadline), probe_changes=args.probe, seed=args.seed,
                           tick_s=parse_duration(args.tick))


def progress(t0: float):  # type: ignore[no-untyped-def]
    return lambda line: print(f"[{time.monotonic() - t0:7.1f}] {line}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--waves", default="1,10,50,100")
    parser.add_argument("--bake", default="5s")
    parser.add_argument("--faults", default="default")
    parser.add_argument("--poll", default="10s", help="devices' poll interval (each drawn +-20%%)")
    parser.add_argument("--report", default="10s", help="devices' report window")
    parser.add_argument("--tick", default="500ms", help="the control plane's rollout tick")
    parser.add_argument("--deadline", default="10m")
    parser.add_argument("--probe", type=int, default=2, help="unrelated changes timed after the rollout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    results = []
    for db in (("sqlite", "postgresql") if args.db == "both" else (args.db,)):
        load = os.getloadavg()  # other work on the machine shows here
        result = runner.run(scenario(args, db), say=progress(time.monotonic())).to_json()
        result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "load_before": load}
        stem = args.out / f"fleet_sim_{db}_{args.devices}"
        args.out.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        report.chart(result, stem.with_suffix(".png"))
        print(f"{db}: {stem}.json, {stem}.png", file=sys.stderr)
        results.append(result)
    if args.markdown:
        print(report.markdown(results))
    else:
        from rich.console import Console
        Console().print(report.rich_table(results))
        for r in results:
            Console().print(report.goals_table(r))


if __name__ == "__main__":
    main()
