"""A simulation's results as a table (rich for terminals, Markdown for documents) and a chart (PNG).

The table has one row per run (database, fleet size): setup rates, time to converge, per stopped class the wave
it stopped in and the time until its devices were back, violations, attacks refused, devices whose final state
disagrees with the ledger, and CPU per request on each side. The chart shows devices per release over time with
the rollout's decisions, and the gate values each class had at each decision.

matplotlib is imported only to draw (it comes with ``slmops[bench]``), so the table needs nothing beyond rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.types.errors import ConfigError

HEADER = ("db", "devices", "enrol/s", "converge s", "stopped (wave)", "back s", "returners back s", "violations",
          "attacks refused", "final != ledger", "req/s", "CPU us/req server", "CPU us/req sim",
          "poll ms p95", "timer lag ms p95", "change ms/device", "goals")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row(result: dict[str, Any]) -> list[str]:
    """One run's row of :data:`HEADER`, from ``Result.to_json()``."""
    sc, load = result["scenario"], result.get("load", {})
    stopped = {n: c for n, c in result.get("classes", {}).items() if c.get("status") == "failed"}
    attacks = result.get("attacks", {})
    refused = sum(a["refused"] for a in attacks.values())
    injected = sum(a["injected"] for a in attacks.values())
    goals = result.get("goals", {})
    return [sc["db"], str(sc["devices"]), _num(result.get("setup", {}).get("enrol_per_s"), 0),
            _num(result.get("converge_s")),
            ", ".join(f"{n} ({c.get('stopped_in_wave')})" for n, c in sorted(stopped.items())) or "-",
            ", ".join(_num(c.get("revert_s")) for _, c in sorted(stopped.items())) or "-",
            ", ".join(_num(x["on_previous_s"] - x["back_online_s"]) if x.get("on_previous_s") is not None else "-"
                      for x in result.get("returners", [])) or "-",
            str(len(result.get("violations", []))), f"{refused}/{injected}",
            str(result.get("final", {}).get("mismatches", "-")), _num(load.get("requests_per_s"), 0),
            _num(load.get("server_us_per_request"), 0), _num(load.get("sim_us_per_request"), 0),
            _num((load.get("poll_ms") or {}).get("p95"), 0), _num((load.get("timer_lag_ms") or {}).get("p95"), 0),
            _num(load.get("change_cpu_ms_per_device"), 2), f"{sum(goals.values())}/{len(goals)}"]


def rich_table(results: list[dict[str, Any]]) -> Any:
    """The runs side by side: one column per run, one row per measure (fits a terminal for a few runs)."""
    from rich.table import Table

    out = Table(title="fleet simulation", header_style="bold")
    out.add_column("measure")
    rows = [row(r) for r in results]
    for r in rows:
        out.add_column(f"{r[0]}, {r[1]}")
    for i, name in enumerate(HEADER[2:], start=2):
        out.add_row(name, *(r[i] for r in rows))
    return out


def goals_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    out = Table(title=f"goals ({result['scenario']['db']}, {result['scenario']['devices']} devices)",
                header_style="bold")
    out.add_column("goal")
    out.add_column("met")
    for name, ok in result.get("goals", {}).items():
        out.add_row(name, "yes" if ok else "NO")
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> Path:
    """Devices per release over time (decisions marked) and the gate values per class at each decision."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("drawing the chart needs matplotlib: pip install 'slmops[bench]', or leave out --png"
                          ) from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    _timeline(left, result)
    _gates(right, result)
    sc = result["scenario"]
    fig.suptitle(f"{sc['devices']} simulated devices, {sc['db']}: waves {'/'.join(f'{w:g}' for w in sc['waves'])}%, "
                 f"bake {sc['bake_s']:g} s, faults {sc['faults']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _timeline(ax: Any, result: dict[str, Any]) -> None:
    timeline = result.get("timeline", [])
    releases = sorted({k for _, counts in timeline for k in counts})
    times = [t for t, _ in timeline]
    for release in releases:
        ax.plot(times, [counts.get(release, 0) for _, counts in timeline], label=release, linewidth=2)
    for d in result.get("decisions", []):
        if d["action"] in ("rollout.gate_failed", "rollout.wave_advanced", "rollout.completed"):
            failed = d["action"] == "rollout.gate_failed"
            ax.axvline(d["t"], color="tab:red" if failed else "0.8", linestyle="-" if failed else ":", linewidth=1)
            if failed:
                ax.annotate(f"gate failed: {d['class']}", (d["t"], 0), xytext=(3, 12), textcoords="offset points",
                            rotation=90, fontsize=8, color="tab:red")
    if result.get("converge_s") is not None:
        ax.axvline(result["converge_s"], color="tab:green", linewidth=1.5)
        ax.annotate(f"converged {result['converge_s']:.1f} s", (result["converge_s"], 0), xytext=(3, 12),
                    textcoords="offset points", rotation=90, fontsize=8, color="tab:green")
    ax.set_xlabel("seconds since the rollout started")
    ax.set_ylabel("devices running")
    ax.set_title("devices per release (dotted: wave advanced; red: gate failed)", fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)


def _gates(ax: Any, result: dict[str, Any]) -> None:
    """Each class's gates at each of its decisions, as value / threshold (1 is the limit; above fails for <,
    below fails for >=): the gate nearest to failing, or the one that failed."""
    points: dict[str, list[tuple[int, float, str, bool]]] = {}
    for d in result.get("decisions", []):
        if d["action"] not in ("rollout.wave_advanced", "rollout.gate_failed", "rollout.class_completed"):
            continue
        worst = _worst(d.get("gates", []))
        if worst is not None and d.get("wave") is not None:
            points.setdefault(d["class"], []).append((int(d["wave"]), *worst))
    for name, pts in sorted(points.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        line = ax.plot(xs, ys, marker="o", label=name)[0]
        for x, y, gate, failed in pts:
            if failed:
                ax.annotate(gate, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7,
                            color=line.get_color())
    ax.axhline(1.0, color="tab:red", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("wave")
    ax.set_ylabel("value / threshold of the tightest gate (log)")
    ax.set_title("gate values per wave (past the red line: failed)", fontsize=10)
    if points:
        ax.set_xticks(sorted({p[0] for pts in points.values() for p in pts}))
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")


def _worst(gates: list[dict[str, Any]]) -> tuple[float, str, bool] | None:
    """(how far toward failing, the gate, whether it failed): value/threshold for upper bounds, threshold/value
    for lower bounds, so past 1 is failing either way."""
    best: tuple[float, str, bool] | None = None
    for g in gates:
        value, threshold = g.get("value"), g.get("threshold")
        if value is None or threshold is None:
            continue
        lower = ">" in g["gate"].split(" ")[1]
        ratio = (threshold / value if value else float("inf")) if lower else (value / threshold if threshold
                                                                               else float("inf"))
        ratio = max(ratio, 1e-3)
        if best is None or ratio > best[0]:
            best = (ratio, g["gate"].split(" ")[0], g.get("outcome") == "fail")
    return best
