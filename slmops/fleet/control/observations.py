"""What the gates judge: per hardware class, the numbers of one release over a time window, computed by the
database (SUM / COUNT / AVG ... GROUP BY hardware_class) and never by loading report rows into Python: a wave of
thousands of devices reporting every minute is millions of rows a day, and the ``(release, hardware_class,
window_end)`` indexes of ``reports`` and ``report_buckets`` keep each gate's question to the rows it is about.

The numbers (``gates.METRICS``), for one class, over the windows about the release that end in the time window:

- ``load_failure_rate``: devices that had a window with ``load_failures > 0`` / devices that had any window, both
  counting distinct devices. A device that tried the release and failed reports its failure against it
  (``Window.release``) while it serves the release before, so it is one device that tried, and one that failed.
- ``error_rate``: failed requests / requests (none while no request was served).
- ``oom_rate``: out-of-memory events / devices.
- ``ttft_p50``, ``ttft_p95``, ``itl_p50``, ``itl_p95``: read from the class's summed histogram buckets
  (``SUM(count) GROUP BY metric, bucket``, then ``histogram.quantile``): a percentile cannot be averaged. When no
  device of the class sent buckets, the requests-weighted mean of the windows' own percentiles stands in.
- ``tokens_per_s``: the windows' speeds weighted by their requests (a plain mean when none served requests).
- ``golden_score``: the mean over the windows that have one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, case, distinct, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.fleet import histogram
from slmops.fleet.control.gates import Observation
from slmops.fleet.control.models import Report, ReportBucket
from slmops.fleet.control.reports import ITL, TTFT

_reports: Table = Report.__table__  # type: ignore[assignment]
_buckets: Table = ReportBucket.__table__  # type: ignore[assignment]
LOOKBACK_S = 3600.0  # "previous" without a control group: this long before the rollout started
_LATENCIES = (("ttft", TTFT, "ttft_p50_ms", "ttft_p95_ms"), ("itl", ITL, "itl_p50_ms", "itl_p95_ms"))


def _scope(table: Table, release: str, since: Mapping[str, float], until: float | None) -> list[ColumnElement[bool]]:
    """Rows about ``release`` of each class in ``since`` whose window ended after the class's time (and, with
    ``until``, not after it): one range of the (release, hardware_class, window_end) index per class."""
    per_class = [and_(table.c.hardware_class == c, table.c.window_end > t) for c, t in sorted(since.items())]
    where = [table.c.release == release, or_(*per_class)]
    if until is not None:
        where.append(table.c.window_end <= until)
    return where


def _weighted(column: Any) -> Any:
    """Requests-weighted mean of a per-window value over the windows that have one; their plain mean when those
    windows served no requests."""
    r = _reports.c.requests
    weight = func.sum(case((column.is_not(None), r), else_=0))
    return func.coalesce(func.sum(column * r) / func.nullif(weight, 0), func.avg(column))


async def observe(s: AsyncSession, release: str, since: Mapping[str, float],
                  until: float | None = None) -> dict[str, Observation]:
    """``release``'s numbers per hardware class, over the windows that ended after ``since[class]`` (and not
    after ``until``); a class without a window is absent."""
    if not since:
        return {}
    c = _reports.c
    q = (select(c.hardware_class, func.count(distinct(c.device_id)).label("devices"),
                func.count(distinct(case((c.load_failures > 0, c.device_id)))).label("failed"),
                func.sum(c.requests).label("requests"), func.sum(c.errors).label("errors"),
                func.sum(c.oom).label("oom"), _weighted(c.tokens_per_s).label("tokens_per_s"),
                func.avg(c.golden_score).label("golden_score"),
                *(_weighted(c[col]).label(col) for _, _, p50, p95 in _LATENCIES for col in (p50, p95)))
         .where(*_scope(_reports, release, since, until)).group_by(c.hardware_class))
    rows = {r.hardware_class: r for r in await s.execute(q)}
    counts = await _bucket_counts(s, release, {k: v for k, v in since.items() if k in rows}, until)
    return {name: _observation(row, counts.get(name, {})) for name, row in rows.items()}


async def _bucket_counts(s: AsyncSession, release: str, since: Mapping[str, float],
                         until: float | None) -> dict[str, dict[int, list[int]]]:
    """class -> metric -> the summed count of each histogram bucket."""
    if not since:
        return {}
    b = _buckets.c
    q = (select(b.hardware_class, b.metric, b.bucket, func.sum(b["count"]).label("n"))
         .where(*_scope(_buckets, release, since, until)).group_by(b.hardware_class, b.metric, b.bucket))
    out: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for name, metric, index, n in await s.execute(q):
        if 0 <= index < histogram.BUCKETS and n:
            out[name].setdefault(metric, [0] * histogram.BUCKETS)[index] += int(n)
    return out


def _observation(row: Any, counts: Mapping[int, list[int]]) -> Observation:
    devices, requests = int(row.devices or 0), int(row.requests or 0)
    metrics: dict[str, float | None] = {
        "load_failure_rate": (row.failed or 0) / devices if devices else None,
        "error_rate": (row.errors or 0) / requests if requests else None,
        "oom_rate": (row.oom or 0) / devices if devices else None,
        "tokens_per_s": _float(row.tokens_per_s),
        "golden_score": _float(row.golden_score),
    }
    for name, metric, p50, p95 in _LATENCIES:
        summed = counts.get(metric)
        if summed:
            metrics[f"{name}_p50"], metrics[f"{name}_p95"] = (histogram.quantile(summed, 0.5),
                                                              histogram.quantile(summed, 0.95))
        else:
            metrics[f"{name}_p50"], metrics[f"{name}_p95"] = _float(getattr(row, p50)), _float(getattr(row, p95))
    return Observation(devices, requests, metrics)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


async def observe_previous(s: AsyncSession, previous: Mapping[str, str | None], since: Mapping[str, float],
                           started_at: float) -> dict[str, Observation]:
    """The numbers of the release each class ran before (``previous``: class -> NAME:VERSION) over the same time
    windows: the class's devices not yet in the wave are the control group. A class whose control group reported
    nothing (the wave took every device, or none reported yet) is compared with the ``LOOKBACK_S`` before the
    rollout started. A class with neither is absent (relative gates then have nothing to regress from)."""
    by_release: dict[str, list[str]] = defaultdict(list)
    for name in since:
        if previous.get(name):
            by_release[previous[name]].append(name)  # type: ignore[index]
    out: dict[str, Observation] = {}
    for release, names in sorted(by_release.items()):
        found = await observe(s, release, {n: since[n] for n in names})
        out.update({n: o for n, o in found.items() if o.devices})
        before = [n for n in names if n not in out]
        if before:
            found = await observe(s, release, {n: started_at - LOOKBACK_S for n in before}, until=started_at)
            out.update({n: o for n, o in found.items() if o.devices})
    return out

