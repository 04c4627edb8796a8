"""`slmops fleet rollout …`: roll a release out to a group in waves per hardware class, watch its gates, and pause,
resume, promote or abort it. Registered onto :data:`slmops.cli.fleet.app` as ``rollout``.

    slmops fleet rollout start smol:1.2.0 --to lyon --waves 1,10,50,100 --bake 10m --min-devices 3 \\
        --gate "load_failure_rate < 0.01" --gate "ttft_p95 <= 1.2 x previous"
    slmops fleet rollout status --watch
    slmops fleet rollout promote ro_1a2b3c4d5e6f --class cpu-aarch64
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from slmops.cli.common import console
from slmops.cli.fleet import client
from slmops.cli.fleet_output import JSON_OPT, listing, print_json, table, when
from slmops.types.errors import InvalidInput, NotFound

rollout_app = typer.Typer(no_args_is_help=True, help="Wave rollouts of a release to a group, judged per hardware "
                                                     "class by gates: start, list, status, pause, resume, promote, "
                                                     "abort.")
FINISHED = ("completed", "aborted")
CLASS_HEADER = ("CLASS", "STATUS", "WAVE", "SHARE", "PREVIOUS", "TOTAL", "TARGETED", "APPLIED", "RUNNING",
                "FAILING", "REVERTED")
GATE_HEADER = ("CLASS", "GATE", "VALUE", "THRESHOLD", "RESULT", "NOTE")
ID_ARG = typer.Argument(..., help="The rollout's id (ro_…); `slmops fleet rollout list` shows them.")


def parse_percents(text: str) -> list[float]:
    try:
        return [float(p) for p in text.replace("%", "").split(",") if p.strip()]
    except ValueError:
        raise InvalidInput(f"--waves {text!r}: write cumulative percents such as 1,10,50,100") from None


def rollout_request(fields: dict[str, Any]) -> Any:
    """A RolloutRequest, with a refusal said as one line naming the option."""
    from slmops.api.fleet import RolloutRequest

    try:
        return RolloutRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(p) for p in problem.get("loc", ()))
        raise InvalidInput(f"--{where.replace('_', '-')}: {problem['msg']}" if where else problem["msg"]) from None


@rollout_app.command("start")
def start(release: str = typer.Argument(..., help="NAME:VERSION of the release."),
          to: str = typer.Option(..., "--to", help="The group whose devices take the release."),
          waves: Optional[str] = typer.Option(None, "--waves", help="Cumulative percent of each hardware class per "
                                                                   "wave (default 1,10,50,100)."),
          base_percent: Optional[float] = typer.Option(None, "--base-percent", help="Instead of --waves: the first "
                                                                                   "wave's percent ..."),
          increment_factor: Optional[float] = typer.Option(None, "--increment-factor",
                                                           help="... and how many times bigger each next wave is."),
          bake: str = typer.Option("60s", "--bake", help="How long each wave must pass its gates (30s, 10m, 1h)."),
          min_devices: int = typer.Option(1, "--min-devices", help="Devices of a class that must report before it "
                                                                   "is judged."),
          min_requests: int = typer.Option(0, "--min-requests", help="Requests they must have served."),
          gate: Optional[list[str]] = typer.Option(None, "--gate", help='A gate such as "error_rate < 0.02" or '
                                                   '"ttft_p95 <= 1.2 x previous"; repeatable; the defaults when '
                                                   "none is given."),
          as_json: bool = JSON_OPT) -> None:
    """Start a rollout: wave 1 of each hardware class of the group gets the release now.

    The control plane moves each class to its next wave when its gates pass and reverts a class whose gates fail."""
    req = rollout_request({"release": release, "group": to, "waves": parse_percents(waves) if waves else None,
                    "base_percent": base_percent, "increment_factor": increment_factor, "bake": bake,
                    "min_devices": min_devices, "min_requests": min_requests, "gates": gate or None})
    with client() as c:
        info = c.start_rollout(req)
    if as_json:
        return print_json(info)
    console.print(f"rollout {info.id} started: {info.release} to group {info.group}", markup=False)
    _show(info)


@rollout_app.command("list")
def list_cmd(group: Optional[str] = typer.Option(None, "--group", help="Only rollouts to this group."),
             status: Optional[str] = typer.Option(None, "--status", help="running, paused, completed or aborted."),
             as_json: bool = JSON_OPT) -> None:
    """Rollouts, newest first."""
    with client() as c:
        found = c.rollouts(group=group, status=status)
    listing(found, as_json, ("ID", "RELEASE", "GROUP", "STATUS", "CLASSES", "STARTED", "BY"),
            lambda r: (r.id, r.release, r.group, r.status, _classes_text(r.classes), when(r.created_at),
                       r.created_by))


def _classes_text(classes: Iterable[Any]) -> str:
    return ", ".join(f"{c.hardware_class} {c.status} {_pct(c.share)}" for c in classes) or "-"


@rollout_app.command("status")
def status(rollout_id: Optional[str] = typer.Argument(None, help="The rollout (default: the newest under way, "
                                                                 "else the newest)."),
           watch: bool = typer.Option(False, "--watch", help="Keep the view live until the rollout ends (Ctrl-C "
                                                             "stops watching, not the rollout)."),
           interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between refreshes with --watch."),
           as_json: bool = JSON_OPT) -> None:
    """Waves per hardware class, devices per state, and gate values (the last tick's while it runs)."""
    with client() as c:
        info = c.rollout(rollout_id) if rollout_id else _newest(c)
        if as_json:
            return print_json(info)
        if not watch:
            return _show(info)
        try:
            with Live(_renderable(info), console=console, refresh_per_second=4) as live:
                while info.status not in FINISHED:
                    time.sleep(interval)
                    info = c.rollout(info.id)
                    live.update(_renderable(info))
        except KeyboardInterrupt:
            pass


def _newest(c: Any) -> Any:
    found = c.rollouts(limit=100)
    if not found:
        raise NotFound("no rollout yet; start one with `slmops fleet rollout start NAME:VERSION --to GROUP`")
    live = [r for r in found if r.status not in FINISHED]
    return c.rollout((live or found)[0].id)


def _action(rollout_id: str, action: str, hardware_class: str | None = None) -> None:
    with client() as c:
        info = c.rollout_action(rollout_id, action, hardware_class)
    console.print(f"rollout {info.id}: {info.status}", markup=False)
    _show(info)


@rollout_app.command("pause")
def pause(rollout_id: str = ID_ARG) -> None:
    """Hold every class where it is: no wave moves and no gate is judged until it is resumed."""
    _action(rollout_id, "pause")


@rollout_app.command("resume")
def resume(rollout_id: str = ID_ARG) -> None:
    """Go on from where it was paused; each class bakes its wave again from now."""
    _action(rollout_id, "resume")


@rollout_app.command("promote")
def promote(rollout_id: str = ID_ARG,
            hardware_class: Optional[str] = typer.Option(None, "--class", help="Only this hardware class (default: "
                                                                               "every active one).")) -> None:
    """Take a class (or all) to the last wave now; it still has to pass its gates there."""
    _action(rollout_id, "promote", hardware_class)


@rollout_app.command("abort")
def abort(rollout_id: str = ID_ARG) -> None:
    """Stop the rollout and send every device it moved back to the release before."""
    _action(rollout_id, "abort")


# -- the status view ---------------------------------------------------------------------------------------------

def _pct(share: float) -> str:
    return f"{share * 100:g}%"


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _summary(info: Any) -> str:
    plan = info.plan
    waves = ", ".join(_pct(w) for w in plan.get("waves", []))
    return (f"rollout {info.id}: {info.release} to group {info.group}, {info.status} (started "
            f"{when(info.created_at)} UTC by {info.created_by}); waves {waves}; bake {plan.get('bake_s', 0):g}s; "
            f"at least {plan.get('min_devices')} devices and {plan.get('min_requests')} requests per wave")


def _class_rows(info: Any) -> list[tuple[Any, ...]]:
    previous = info.plan.get("previous", {})
    rows = []
    for c in info.classes:
        n = c.devices
        rows.append((c.hardware_class, c.status, f"{c.wave}/{len(info.plan.get('waves', []))}", _pct(c.share),
                     previous.get(c.hardware_class) or "-", n.get("total", 0), n.get("targeted", 0),
                     n.get("applied", 0), n.get("running", 0), n.get("failing", 0), n.get("reverted", 0)))
    return rows


def _gate_rows(info: Any) -> list[tuple[Any, ...]]:
    return [(c.hardware_class, g.get("gate"), _number(g.get("value")), _number(g.get("threshold")), g.get("outcome"),
             g.get("note", "")) for c in info.classes for g in c.gates]


def _show(info: Any) -> None:
    console.print(_summary(info), markup=False, soft_wrap=True)
    table(CLASS_HEADER, _class_rows(info))
    gates = _gate_rows(info)
    if gates:
        console.print()
        table(GATE_HEADER, gates)


def _renderable(info: Any) -> Group:
    """The same view as :func:`_show`, as one rich renderable for ``--watch``."""
    parts: list[Any] = [Text(_summary(info))]
    for header, rows in ((CLASS_HEADER, _class_rows(info)), (GATE_HEADER, _gate_rows(info))):
        if not rows:
            continue
        out = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for name in header:
            out.add_column(name, no_wrap=True)
        for row in rows:
            cells = [Text("-" if v is None else str(v)) for v in row]
            outcome = str(row[4]) if header is GATE_HEADER else ""
            if outcome in ("pass", "fail"):
                cells[4].stylize("green" if outcome == "pass" else "red")
            out.add_row(*cells)
        parts += [Text(""), out]
    return Group(*parts)
