"""What rollout gates are computed from, on SQLite and PostgreSQL: report windows written by the real batcher from
JSON bodies (release, histograms), observations per hardware class from SQL aggregates (percentiles read from the
summed bucket counts, exactly ``histogram.quantile`` of those sums), the previous release's numbers with their
fallback, and the in-memory channel resolution that rollouts use agreeing with the blueprint merge devices get."""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import pytest
from fleet_app import run
from fleet_db import fleet_db_url, postgres  # noqa: F401
from sqlalchemy import event, func, select

from slmops.api.fleet import ReportRequest
from slmops.fleet import histogram
from slmops.fleet.control import membership
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import Blueprint, Channel, Device, Group, Release, ReportBucket
from slmops.fleet.control.observations import LOOKBACK_S, observe, observe_previous
from slmops.fleet.control.reports import ReportBatcher, parse_report
from slmops.fleet.control.rollout_store import Channels, members, previous_by_class
from slmops.types.errors import InvalidInput

NEW, OLD = "smol:2.0.0", "smol:1.0.0"
A, B = "cpu-x86_64", "cuda-x86_64"


async def database(url: str, devices: dict[str, str]) -> Database:
    """A migrated database with ``devices`` (id -> hardware class) enrolled as rows."""
    db = Database(url)
    await db.migrate()
    async with db.write() as s:
        for device_id, hardware_class in devices.items():
            s.add(Device(id=device_id, name=device_id, public_key=bytes(32), hardware_class=hardware_class,
                         enrolled_at=1.0, last_seen=1.0, tags={"site": "lyon"}))
    return db


def body(running: str | None, *windows: dict[str, Any]) -> bytes:
    return json.dumps({"running": {"release": running}, "health": "ok", "windows": list(windows)}).encode()


def hist(values: list[float]) -> list[int]:
    h = histogram.Histogram()
    for v in values:
        h.add(v)
    return h.to_wire()


async def send(db: Database, reports: list[tuple[str, bytes]]) -> None:
    """Through the batcher as the device route hands them over: parsed from JSON, queued, written at once."""
    batcher = ReportBatcher(db)
    for device_id, raw in reports:
        assert batcher.offer(device_id, 0.0, parse_report(raw))
    await batcher.flush()


def test_observations_read_percentiles_from_the_summed_buckets(fleet_db_url):
    async def scenario() -> None:
        rng = random.Random(7)
        devices = {"dev_a1": A, "dev_a2": A, "dev_a3": A, "dev_a4": A, "dev_b1": B}
        db = await database(fleet_db_url, devices)
        try:
            latencies = {d: [rng.lognormvariate(4.6 if d != "dev_a3" else 6.0, 0.3) for _ in range(60)]
                         for d in ("dev_a1", "dev_a2", "dev_a3")}  # dev_a3 is much slower than the others
            itl = {d: [rng.uniform(10, 40) for _ in range(60)] for d in latencies}
            reports = []
            for d in latencies:
                for w in range(2):  # two windows of 30 requests each
                    part = slice(30 * w, 30 * (w + 1))
                    reports.append((d, body(NEW, {
                        "start": 1000.0 + 10 * w, "end": 1010.0 + 10 * w, "requests": 30, "errors": w,
                        "oom": 1 if d == "dev_a2" and w else 0, "ttft_hist": hist(latencies[d][part]),
                        "itl_hist": hist(itl[d][part]), "ttft_p95_ms": 1.0, "tokens_per_s": 40.0 + 10 * w,
                        "golden_score": 0.5 if d == "dev_a1" and w == 0 else None})))
            reports += [
                # a device that failed to load the release, while it serves the old one: one device that tried
                ("dev_a4", body(OLD, {"start": 1000.0, "end": 1010.0, "release": NEW, "load_failures": 1})),
                # before the window, and another release: neither counts
                ("dev_a1", body(NEW, {"start": 900.0, "end": 910.0, "requests": 999, "ttft_hist": hist([9999.0])})),
                ("dev_a2", body(OLD, {"start": 1100.0, "end": 1110.0, "requests": 999, "ttft_hist": hist([1.0])})),
                # a class without histograms: the requests-weighted mean of its windows' own p95s
                ("dev_b1", body(NEW, {"start": 1000.0, "end": 1010.0, "requests": 10, "ttft_p95_ms": 100.0,
                                      "ttft_p50_ms": 50.0, "itl_p95_ms": 20.0}, {
                    "start": 1010.0, "end": 1020.0, "requests": 30, "ttft_p95_ms": 200.0, "ttft_p50_ms": 70.0}))]
            await send(db, reports)
            await send(db, reports)  # a replay adds nothing (one row per window, one per bucket)

            statements: list[str] = []
            event.listen(db.engine.sync_engine, "before_cursor_execute",
                         lambda conn, cursor, sql, *args: statements.append(sql))
            async with db.read() as s:
                found = await observe(s, NEW, {A: 950.0, B: 950.0})
            assert len(statements) == 2  # one aggregate over reports, one over buckets: no row comes to Python

            a = found[A]
            summed = [0] * histogram.BUCKETS
            for d in latencies:
                for i, c in enumerate(hist(latencies[d])):
                    summed[i] += c
            assert (a.devices, a.requests) == (4, 180)
            assert a.get("ttft_p95") == histogram.quantile(summed, 0.95)
            assert a.get("ttft_p50") == histogram.quantile(summed, 0.5)
            exact = sorted(v for d in latencies for v in latencies[d])
            assert a.get("ttft_p95") == pytest.approx(exact[int(0.95 * len(exact))], rel=0.1)
            per_device_mean = sum(histogram.quantile(hist(latencies[d]), 0.95) for d in latencies) / 3
            assert abs(a.get("ttft_p95") - per_device_mean) > 0.2 * per_device_mean  # a percentile is not averaged
            itl_summed = histogram.Histogram()
            for d in itl:
                itl_summed.merge(hist(itl[d]))
            assert a.get("itl_p95") == itl_summed.quantile(0.95)
            assert a.get("load_failure_rate") == 1 / 4 and a.get("oom_rate") == 1 / 4
            assert a.get("error_rate") == pytest.approx(3 / 180)
            assert a.get("tokens_per_s") == pytest.approx(45.0)  # 40 and 50, 90 requests each
            assert a.get("golden_score") == 0.5  # the one window that has one

            b = found[B]
            assert (b.devices, b.requests) == (1, 40)
            assert b.get("ttft_p95") == pytest.approx((10 * 100 + 30 * 200) / 40)
            assert b.get("ttft_p50") == pytest.approx((10 * 50 + 30 * 70) / 40)
            assert b.get("itl_p95") == pytest.approx(20.0)  # only the window that has one
            assert b.get("error_rate") == 0 and b.get("tokens_per_s") is None and b.get("golden_score") is None

            async with db.read() as s:
                assert await observe(s, NEW, {A: 1020.0}) == {}  # no window ended after 1020
                later = await observe(s, NEW, {A: 1015.0})
                rows = await s.scalar(select(func.count()).select_from(ReportBucket))
            assert (later[A].devices, later[A].requests) == (3, 90)
            assert rows == sum(len([c for c in hist(v) if c]) for d in latencies for v in (
                latencies[d][:30], latencies[d][30:], itl[d][:30], itl[d][30:])) + 2
        finally:
            await db.close()

    run(scenario())


def test_the_previous_release_falls_back_to_the_hour_before_the_rollout(fleet_db_url):
    """The control group (devices still on the previous release) over the same windows; when it reported nothing,
    the previous release on that class in the hour before the rollout started."""
    async def scenario() -> None:
        db = await database(fleet_db_url, {"dev_a1": A, "dev_a2": A, "dev_b1": B})
        started = 10_000.0
        try:
            await send(db, [
                ("dev_a1", body(OLD, {"start": started - 100, "end": started - 50, "requests": 10,
                                      "ttft_hist": hist([200.0] * 10)})),
                ("dev_a1", body(OLD, {"start": started - LOOKBACK_S - 100, "end": started - LOOKBACK_S - 10,
                                      "requests": 10, "ttft_hist": hist([900.0] * 10)})),  # over an hour before
                ("dev_b1", body(OLD, {"start": started - 100, "end": started - 50, "requests": 10,
                                      "ttft_hist": hist([300.0] * 10)})),
                ("dev_a2", body(OLD, {"start": started + 10, "end": started + 20, "requests": 10,
                                      "ttft_hist": hist([100.0] * 10)})),  # A's control group, during the wave
            ])
            async with db.read() as s:
                prev = await observe_previous(s, {A: OLD, B: OLD}, {A: started, B: started}, started)
                nothing = await observe_previous(s, {A: None, B: "smol:0.1"}, {A: started, B: started}, started)
            assert prev[A].devices == 1 and prev[A].get("ttft_p95") < 120  # the control group, not the past
            assert prev[B].devices == 1 and 250 < prev[B].get("ttft_p95") < 360  # the hour before (~300 ms)
            assert nothing == {}
        finally:
            await db.close()

    run(scenario())


def test_channels_resolved_in_memory_agree_with_each_devices_layers(fleet_db_url):
    async def scenario() -> None:
        db = await database(fleet_db_url, {})
        try:
            tags = {"dev_1": {"site": "lyon"}, "dev_2": {"site": "lyon", "ring": "0"},
                    "dev_3": {"site": "lyon", "ring": "0", "late": "1"}, "dev_4": {"site": "lyon"},
                    "dev_5": {"site": "paris"}}
            async with db.write() as s:
                releases = {}
                for v in ("1.0.0", "2.0.0", "3.0.0"):
                    releases[v] = Release(name="smol", version=v, golden=[], created_by="t", created_at=1.0)
                    s.add(releases[v])
                await s.flush()
                for name, v in (("stable", "1.0.0"), ("canary", "2.0.0"), ("beta", "3.0.0")):
                    s.add(Channel(name=name, release_id=releases[v].id, updated_at=1.0))
                for name, selector in (("lyon", {"site": "lyon"}), ("ring0", {"ring": "0"}), ("late", {"late": "1"})):
                    s.add(Group(name=name, selector=selector, created_at=1.0))
                for layer, priority, config in (
                        ("baseline", 0, {"channel": "stable"}), ("group:ring0", 5, {"channel": "canary"}),
                        ("group:late", 1, {"performance": {"keep_alive": "5m"}}),  # names no channel
                        ("group:lyon", 0, {}), ("device:dev_4", 0, {"channel": "beta"}),
                        ("device:dev_1", 0, {"performance": {"keep_alive": "1m"}})):
                    s.add(Blueprint(layer=layer, priority=priority, config=config, updated_at=1.0, updated_by="t"))
                for device_id, t in tags.items():
                    s.add(Device(id=device_id, name=device_id, public_key=bytes(32), enrolled_at=1.0, last_seen=1.0,
                                 hardware_class=A if device_id != "dev_3" else B, tags=t))
            async with db.read() as s:
                channels = await Channels.load(s)
                for device_id, t in tags.items():
                    device = await s.get(Device, device_id)
                    merged = await membership.effective_config(s, device)
                    assert channels.channel(device_id, t) == merged.channel, device_id
                assert [channels.release(i, t) for i, t in tags.items()] == [
                    "smol:1.0.0", "smol:2.0.0", "smol:2.0.0", "smol:3.0.0", "smol:1.0.0"]
                lyon = await members(s, {"site": "lyon"})
                assert [m.id for m in lyon] == ["dev_1", "dev_2", "dev_3", "dev_4"]
                # A: dev_1 on 1.0.0, dev_2 on 2.0.0, dev_4 on 3.0.0 -> a tie, broken by name; B: dev_3 alone
                assert previous_by_class(lyon, channels) == {A: "smol:1.0.0", B: "smol:2.0.0"}
        finally:
            await db.close()

    run(scenario())


WINDOW_BODIES = [
    b'{"windows": [{"start": 1, "end": 2, "release": "smol:2", "ttft_hist": [0, 3, 5], "itl_hist": [1]}]}',
    b'{"windows": [{"start": 1, "end": 2, "release": null, "ttft_hist": []}]}',
    b'{"windows": [{"start": 1, "end": 2, "release": "' + b"x" * 161 + b'"}]}',
    b'{"windows": [{"start": 1, "end": 2, "ttft_hist": [-1]}]}',
    b'{"windows": [{"start": 1, "end": 2, "ttft_hist": [2147483648]}]}',
    b'{"windows": [{"start": 1, "end": 2, "itl_hist": ' + json.dumps([1] * 65).encode() + b"}]}",
    b'{"windows": [{"start": 1, "end": 2, "itl_hist": ' + json.dumps([1] * 64).encode() + b"}]}",
    b'{"windows": [{"start": 1, "end": 2, "ttft_hist": [1.0, 2]}]}',
    b'{"windows": [{"start": 1, "end": 2, "ttft_hist": null}]}',
    b'{"windows": [{"start": 1, "end": 2, "release": 5}]}',
]


@pytest.mark.parametrize("raw", WINDOW_BODIES, ids=range(len(WINDOW_BODIES)))
def test_the_fast_decoder_agrees_on_releases_and_histograms(raw):
    try:
        expected: Any = ReportRequest.model_validate_json(raw).model_dump()
    except ValueError:
        expected = None
    try:
        decoded = parse_report(raw)
    except InvalidInput:
        assert expected is None
        return
    got = decoded.model_dump() if isinstance(decoded, ReportRequest) else msgspec.to_builtins(decoded)
    assert got == expected
