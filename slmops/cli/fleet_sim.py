"""`slmops fleet simulate`: a rollout to thousands of simulated devices against a real control plane, measured.

    slmops fleet simulate --devices 1000 --waves 1,10,50,100 --bake 5s --png sim.png
    slmops fleet simulate --devices 10000 --db postgresql --poll 5s --report 5s --json > run.json

Starts its own ``slmops fleet serve`` (on SQLite, a throw-away PostgreSQL, or the database URL given), a
``docker-registry`` with two signed releases, enrols the devices and rolls the second release out with injected
faults (``--faults``, see :mod:`slmops.fleet.sim.faults`). Prints a table of what was measured and whether each
goal was met; exits 1 when a correctness check failed (a violation, a final state that disagrees with the ledger,
no convergence). Registered onto :data:`slmops.cli.fleet.app`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from slmops.cli.common import console, err_console
from slmops.cli.fleet import app
from slmops.types.errors import InvalidInput


def _duration(text: str, what: str) -> float:
    from slmops.config.settings import parse_duration

    try:
        value = parse_duration(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise InvalidInput(f"{what} {text!r}: use a duration such as 500ms, 5s or 2m")
    return value


def _waves(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.replace("%", "").split(",") if p.strip())
    except ValueError:
        raise InvalidInput(f"--waves {text!r}: write cumulative percents such as 1,10,50,100") from None


@app.command("simulate")
def simulate(devices: int = typer.Option(1000, "--devices", min=1, help="Simulated devices."),
             db: str = typer.Option("sqlite", "--db", help="sqlite, postgresql (a throw-away cluster) or a database "
                                                           "URL for the control plane."),
             waves: str = typer.Option("1,10,50,100", "--waves", help="Cumulative percent of each class per wave."),
             bake: str = typer.Option("5s", "--bake", help="How long each wave must pass its gates."),
             faults: str = typer.Option("default", "--faults", help="Injected faults: default, none, or items such "
                                        "as load:npu-aarch64,ttft:cpu-aarch64x1.8,clock:0.01,replay:0.01,return:1,"
                                        "offline:0.02."),
             poll: str = typer.Option("2s", "--poll", help="Devices' poll interval (each drawn +-20%)."),
             report: str = typer.Option("2s", "--report", help="Devices' report window."),
             classes: str = typer.Option("", "--classes", help="Class mix as CLASS=WEIGHT,... (default: the four "
                                                               "classes equally)."),
             gate: Optional[list[str]] = typer.Option(None, "--gate", help="A rollout gate (repeatable); the control "
                                                                          "plane's defaults when none is given."),
             min_devices: int = typer.Option(1, "--min-devices", min=1, help="Rollout: devices a class needs."),
             min_requests: int = typer.Option(0, "--min-requests", min=0, help="Rollout: requests a class needs."),
             tick: str = typer.Option("500ms", "--tick", help="The control plane's rollout tick."),
             deadline: str = typer.Option("5m", "--deadline", help="Give up this long after the rollout started."),
             delay_scale: float = typer.Option(1.0, "--delay-scale", min=0.0, help="Multiply the class model's pull "
                                                                                   "and load times."),
             seed: int = typer.Option(0, "--seed", help="Seed of every random draw of the run."),
             png: Optional[Path] = typer.Option(None, "--png", help="Draw the chart into this PNG."),
             as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON.")) -> None:
    """Simulate a fleet and a rollout against a real control plane; print what was measured."""
    from slmops.fleet.sim import classes as model
    from slmops.fleet.sim import report as output
    from slmops.fleet.sim.devices import Timing
    from slmops.fleet.sim.faults import Faults
    from slmops.fleet.sim.runner import Scenario, run

    scenario = Scenario(devices=devices, db=db, waves=_waves(waves), bake_s=_duration(bake, "--bake"),
                        faults=Faults.parse(faults), mix=model.parse_mix(classes),
                        timing=Timing(poll_s=_duration(poll, "--poll"), report_s=_duration(report, "--report"),
                                      delay_scale=delay_scale),
                        tick_s=_duration(tick, "--tick"), min_devices=min_devices, min_requests=min_requests,
                        gates=tuple(gate) if gate else None, deadline_s=_duration(deadline, "--deadline"), seed=seed)
    result = run(scenario, say=lambda line: err_console.print(line, markup=False, highlight=False,
                                                             soft_wrap=True)).to_json()
    if png is not None:
        output.chart(result, png)
        err_console.print(f"chart: {png}", markup=False)
    if as_json:
        print(json.dumps(result, default=str))
    else:
        console.print(output.rich_table([result]))
        console.print(output.goals_table(result))
    failed = result["failures"]
    if failed:
        where = f"; the run's files are in {result['folder']}" if result.get("folder") else ""
        err_console.print(f"simulation failed: {', '.join(failed)}{where}", markup=False, soft_wrap=True)
        raise typer.Exit(1)
