"""Control-plane load: a real `slmops fleet serve` process (uvloop + httptools), N devices enrolled through the
real API, then desired-state polls on the 304 path and reports, from an aiohttp load generator on the same host.

    python bench/fleet_bench.py --db sqlite --devices 2000 --seconds 10 --json out.json
    python bench/fleet_bench.py --db both --auth both --windows 1,4   # PostgreSQL via tests/fleet_db.PostgresServer

Each phase runs with one way of authenticating (``--auth``): ``session``, as the agent does, where every device
first takes a session token with one signed request and then sends the token (the server checks one HMAC), and
``signed``, where every request is signed with the device's own Ed25519 key and the server verifies each
signature. Signatures are made before each phase (see ``Device``): the load generator shares the machine with the
server, and its signing would otherwise be measured as the server's slowness. A signed poll's Authorization is the
same for every poll of that device within one second (it signs the same bytes). Report phases run once per
``--windows`` value (aggregate windows, so report rows, per request); every window is new, so none is deduplicated.
What was accepted (202) is counted in the database at the end, after the server stopped and flushed: accepted rows
must all be stored. CPU columns give the server's (and the load generator's) CPU time per request, which says more
than a rate on a machine other work shares.

Measured on a 2-core machine (2000 devices, 32 connections, 8 s phases, ``--db both --auth both --windows 1,4``).
Rates move by 20-30% from run to run on a machine other work shares (SQLite session reports, one window: 4,573 to
6,055/s over three runs); the CPU columns move less. "before sessions" is the same machine running the code before
session tokens, msgspec report decoding and driver-level report inserts (signatures only):

    db          auth     polls/s (304)  p50/p99 ms  CPU us srv/gen
    sqlite      session  10742          2.7/7.8     90/87
    sqlite      signed   4122           7.4/17.5    243/159
    postgresql  session  12820          2.2/7.4     73/74
    postgresql  signed   4286           6.8/16.1    231/152

    db          auth     windows  reports/s  rows/s  p50/p99 ms  CPU us srv/gen
    sqlite      session  1        5842       5842    4.6/14.1    167/126
    sqlite      session  4        4360       17439   6.2/24.8    230/144
    sqlite      signed   1        4013       4013    6.8/18.7    268/163
    sqlite      signed   4        3524       14095   7.7/29.2    319/165
    postgresql  session  1        6458       6458    4.1/15.9    117/107
    postgresql  session  4        4694       18775   5.2/24.4    150/124
    postgresql  signed   1        3247       3247    9.0/25.2    290/197
    postgresql  signed   4        2695       10780   10.0/35.0   317/190

    before sessions: polls/s 3,682-4,081 (SQLite), 2,207-4,622 (PostgreSQL), 244-284 us server CPU each; reports
    (1 window) 2,687/s SQLite, 1,511/s PostgreSQL, 389-419 us; reports (4 windows) 2,137/s = 8,547 rows/s SQLite,
    1,925/s = 7,698 rows/s PostgreSQL, 478-515 us.

Every accepted row was stored in every run. Per request the server now spends ~75-90 us on a poll and ~120-170 us
on a one-window report, most of it in uvicorn and asyncio (the app's own share is ~20 us for a poll, ~35 us for a
report plus ~10-20 us per row in the batcher); the load generator needs about as much again, so on 2 shared cores
the rates above are near what the machine gives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from slmops.fleet.deviceauth import DeviceKey

BIN = Path(sys.executable).parent / "slmops"
PROFILE = {"cpu": {"architecture": "x86_64"}, "gpus": []}
POLL = "/fleet/v1/device/desired"
REPORT = "/fleet/v1/device/reports"
SESSION = "/fleet/v1/device/session"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit(wanted: int = 20_000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Server:
    """`slmops fleet serve` on a free port, SLMOPS_HOME in a temporary folder; ``profile``: run it under cProfile."""

    def __init__(self, db_url: str, home: Path, profile: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_FLEET_DB": db_url}
        args = ["fleet", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd = [str(BIN), *args] if profile is None else [
            sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "slmops.cli.main", *args]
        self.log = (home / "server.log").open("w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def cli(self, *args: str) -> str:
        done = subprocess.run([str(BIN), *args], env=self.env, check=False, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"slmops {' '.join(args)}: {done.stderr}")
        return done.stdout.strip()

    async def ready(self, session: aiohttp.ClientSession) -> None:
        for _ in range(600):
            try:
                async with session.get(self.url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                if self.proc.poll() is not None:
                    break
            await asyncio.sleep(0.1)
        raise RuntimeError(f"server did not start: {(self.home / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.send_signal(2)  # SIGINT: uvicorn's graceful shutdown (the batcher writes what is queued)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@dataclass
class Device:
    """A simulated device. Signatures are made before a phase for each of its seconds (``presign``), as a fleet's
    devices would each make their own: the load generator shares two cores with the server, and signing on the
    fly would measure its own CPU rather than the server's. A report without a pre-made signature is signed then."""

    key: DeviceKey
    id: str = ""
    etag: str = ""
    session: str = ""  # Authorization with its session token
    windows: int = 0  # windows reported so far: the next one starts after them
    polls: dict[int, str] = field(default_factory=dict)  # second -> Authorization of a poll
    reports: dict[int, list[tuple[bytes, str]]] = field(default_factory=dict)  # second -> (body, Authorization)

    def poll_auth(self, now: int, auth: str = "signed") -> str:
        if auth == "session":
            return self.session
        signed = self.polls.get(now)
        if signed is None:
            signed = self.polls[now] = self.key.authorization(self.id, "GET", POLL, b"", now)
        return signed

    def report(self, now: int, windows: int, auth: str) -> tuple[bytes, str]:
        if auth == "session":
            return report_body(self, windows), self.session
        ready = self.reports.get(now)
        if ready:
            return ready.pop()
        body = report_body(self, windows)
        return body, self.key.authorization(self.id, "POST", REPORT, body, now)


_REPORT_HEAD = (b'{"running":{"release":"bench:1.0.0","manifest_digest":"sha256:' + b"ab" * 32 +
                b'"},"health":"ok","desired_version":1,"windows":[')
_WINDOW = ('{{"start":{start:.1f},"end":{end:.1f},"requests":12,"errors":0,"ttft_p50_ms":40.0,"ttft_p95_ms":95.5,'
           '"tokens_per_s":31.0}}')


def report_body(d: Device, windows: int) -> bytes:
    """A report of ``windows`` one-minute windows the device has not reported yet."""
    first, d.windows = d.windows, d.windows + windows
    starts = (1.7e9 + 60.0 * (first + w) for w in range(windows))
    return _REPORT_HEAD + ",".join(_WINDOW.format(start=t, end=t + 60) for t in starts).encode() + b"]}"


def presign(devices: list[Device], seconds: float, windows: int | None) -> float:
    """Signatures for the coming ``seconds`` (+2): polls, or one report per device and second; the time it took."""
    t0 = time.perf_counter()
    start = int(time.time())
    for d in devices:
        d.polls.clear()
        d.reports.clear()
        for now in range(start, start + int(seconds) + 3):
            if windows is None:
                d.poll_auth(now)
            else:
                body = report_body(d, windows)
                d.reports[now] = [(body, d.key.authorization(d.id, "POST", REPORT, body, now))]
    return time.perf_counter() - t0


@dataclass
class Phase:
    seconds: float = 0.0
    server_cpu_s: float = 0.0  # CPU time the server process used in the phase
    client_cpu_s: float = 0.0  # ... and this load generator
    status: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def rate(self, status: int) -> float:
        return self.status[status] / self.seconds if self.seconds else 0.0

    def cpu_us(self, status: int) -> tuple[float, float]:
        """Server and client CPU microseconds per request with ``status``."""
        n = self.status[status] or 1
        return 1e6 * self.server_cpu_s / n, 1e6 * self.client_cpu_s / n

    def p(self, q: float) -> float:
        xs = sorted(self.latencies)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def cpu_seconds(pid: int | None = None) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def measured(phase: Phase, server_pid: int, work: Any) -> None:
    s0, c0, t0 = cpu_seconds(server_pid), cpu_seconds(), time.perf_counter()
    await work
    phase.seconds = time.perf_counter() - t0
    phase.server_cpu_s, phase.client_cpu_s = cpu_seconds(server_pid) - s0, cpu_seconds() - c0


async def enrol_all(session: aiohttp.ClientSession, url: str, admin: str, n: int, concurrency: int) -> list[Device]:
    devices = [Device(DeviceKey.generate()) for _ in range(n)]
    auth = {"Authorization": f"Bearer {admin}"}
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            d = devices[queue.pop()]
            async with session.post(url + "/fleet/v1/tokens", json={"expires_in": "1h"}, headers=auth) as r:
                assert r.status in (200, 201), await r.text()
                token = (await r.json())["token"]
            body = {"token": token, "public_key": d.key.public_b64, "proof": d.key.prove(token),
                    "name": f"bench-{d.key.public_b64[:8]}", "hardware": PROFILE}
            async with session.post(url + "/fleet/v1/enrol", json=body) as r:
                assert r.status == 200, await r.text()
                d.id = (await r.json())["device_id"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return devices


async def open_sessions(session: aiohttp.ClientSession, url: str, devices: list[Device], concurrency: int) -> float:
    """A session token per device (one signed request each, signed here: it is part of what is timed); per second."""
    queue = list(devices)

    async def worker() -> None:
        while queue:
            d = queue.pop()
            auth = d.key.authorization(d.id, "POST", SESSION, b"", int(time.time()))
            async with session.post(url + SESSION, headers={"Authorization": auth}) as r:
                assert r.status == 200, await r.text()
                d.session = "Slmops-Session " + (await r.json())["token"]

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(devices) / (time.perf_counter() - t0)


async def first_polls(session: aiohttp.ClientSession, url: str, devices: list[Device], concurrency: int) -> None:
    queue = list(devices)

    async def worker() -> None:
        while queue:
            d = queue.pop()
            async with session.get(url + POLL, headers={"Authorization": d.poll_auth(int(time.time()))}) as r:
                assert r.status == 200, await r.text()
                await r.read()
                d.etag = r.headers["ETag"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def polls(session: aiohttp.ClientSession, url: str, devices: list[Device], seconds: float,
                concurrency: int, server_pid: int, auth: str) -> Phase:
    phase = Phase()
    end = time.perf_counter() + seconds

    async def worker(mine: list[Device]) -> None:
        i = 0
        while time.perf_counter() < end:
            d = mine[i % len(mine)]
            i += 1
            t0 = time.perf_counter()
            headers = {"Authorization": d.poll_auth(int(time.time()), auth), "If-None-Match": d.etag}
            async with session.get(url + POLL, headers=headers) as r:
                await r.read()
                phase.status[r.status] += 1
            phase.latencies.append(time.perf_counter() - t0)

    await measured(phase, server_pid, asyncio.gather(*(worker(devices[k::concurrency]) for k in range(concurrency))))
    return phase


async def reports(session: aiohttp.ClientSession, url: str, devices: list[Device], seconds: float,
                  concurrency: int, windows: int, server_pid: int, auth: str) -> Phase:
    phase = Phase()
    end = time.perf_counter() + seconds

    async def worker(mine: list[Device]) -> None:
        i = 0
        while time.perf_counter() < end:
            d = mine[i % len(mine)]
            i += 1
            body, authorization = d.report(int(time.time()), windows, auth)
            headers = {"Authorization": authorization, "Content-Type": "application/json"}
            t0 = time.perf_counter()
            async with session.post(url + REPORT, data=body, headers=headers) as r:
                await r.read()
                phase.status[r.status] += 1
                if r.status == 503:
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            phase.latencies.append(time.perf_counter() - t0)

    await measured(phase, server_pid, asyncio.gather(*(worker(devices[k::concurrency]) for k in range(concurrency))))
    return phase


async def count_rows(db_url: str) -> tuple[int, int]:
    from sqlalchemy import func, select

    from slmops.fleet.control.db import Database
    from slmops.fleet.control.models import Device as DeviceRow
    from slmops.fleet.control.models import Report

    db = Database(db_url)
    try:
        async with db.read() as s:
            return ((await s.scalar(select(func.count()).select_from(Report))) or 0,
                    (await s.scalar(select(func.count()).select_from(DeviceRow))) or 0)
    finally:
        await db.close()


async def phases(session: aiohttp.ClientSession, server: Server, devices: list[Device], auth: str,
                 args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The poll phase and a report phase per window count, all authenticated as ``auth``."""
    pid, n = server.proc.pid, args.concurrency
    if auth == "session":
        result["sessions_per_s"] = await open_sessions(session, server.url, devices, min(n, 32))
    else:
        result["presign_polls_s"] = presign(devices, args.seconds, None)
    p = await polls(session, server.url, devices, args.seconds, n, pid, auth)
    result["polls"].append({"auth": auth, "per_s": p.rate(304), "status": dict(p.status), "p50_ms": p.p(0.5),
                            "p99_ms": p.p(0.99), "cpu_us": p.cpu_us(304)})
    for windows in args.windows:
        if auth == "signed":
            presign(devices, args.seconds, windows)
        r = await reports(session, server.url, devices, args.seconds, n, windows, pid, auth)
        result["reports"].append({"auth": auth, "windows": windows, "requests_per_s": r.rate(202),
                                  "rows_per_s": r.rate(202) * windows, "status": dict(r.status),
                                  "p50_ms": r.p(0.5), "p99_ms": r.p(0.99), "cpu_us": r.cpu_us(202)})
        result["accepted_rows"] += r.status[202] * windows


async def bench_one(kind: str, db_url: str, args: argparse.Namespace) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix=f"fleet-bench-{kind}-"))
    profile = Path(args.profile) / f"server-{kind}.prof" if args.profile else None
    server = Server(db_url, home, profile)
    result: dict[str, Any] = {"db": kind, "devices": args.devices, "concurrency": args.concurrency,
                              "polls": [], "reports": [], "accepted_rows": 0}
    try:
        admin = server.cli("fleet", "keys", "create", f"bench-{secrets.token_hex(3)}", "--role", "operator",
                           "--db", db_url).splitlines()[-1]
        connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            await server.ready(session)
            t0 = time.perf_counter()
            devices = await enrol_all(session, server.url, admin, args.devices, min(args.concurrency, 32))
            result["enrol_per_s"] = args.devices / (time.perf_counter() - t0)
            await asyncio.sleep(0.5)  # let the change feed settle after the enrolments
            await first_polls(session, server.url, devices, args.concurrency)
            for auth in (("session", "signed") if args.auth == "both" else (args.auth,)):
                await phases(session, server, devices, auth, args, result)
    finally:
        server.stop()
        if server.proc.returncode == 0:
            shutil.rmtree(home, ignore_errors=True)
    stored, enrolled = await count_rows(db_url)
    result.update(stored_rows=stored, enrolled=enrolled, all_stored=stored == result["accepted_rows"])
    return result


def table(rows: list[list[str]], titles: list[str]) -> str:
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, title in enumerate(titles)]
    lines = ["  ".join(title.ljust(w) for title, w in zip(titles, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def tables(results: list[dict[str, Any]]) -> str:
    """Polls per database and authentication, reports per database, authentication and windows per request; CPU
    columns: microseconds of CPU per request, server / load generator."""
    polls = [[r["db"], p["auth"], f"{p['per_s']:.0f}", f"{p['p50_ms']:.1f}/{p['p99_ms']:.1f}",
              "{:.0f}/{:.0f}".format(*p["cpu_us"])] for r in results for p in r["polls"]]
    reports = [[r["db"], x["auth"], str(x["windows"]), f"{x['requests_per_s']:.0f}", f"{x['rows_per_s']:.0f}",
                f"{x['p50_ms']:.1f}/{x['p99_ms']:.1f}", "{:.0f}/{:.0f}".format(*x["cpu_us"])]
               for r in results for x in r["reports"]]
    totals = [[r["db"], str(r["devices"]), f"{r['enrol_per_s']:.0f}",
               f"{r['sessions_per_s']:.0f}" if "sessions_per_s" in r else "-",
               f"{r['stored_rows']}/{r['accepted_rows']}"] for r in results]
    return "\n\n".join([
        table(polls, ["db", "auth", "polls/s (304)", "p50/p99 ms", "CPU us srv/gen"]),
        table(reports, ["db", "auth", "windows", "reports/s", "rows/s", "p50/p99 ms", "CPU us srv/gen"]),
        table(totals, ["db", "devices", "enrol/s", "sessions/s", "stored/accepted rows"])])


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for kind in kinds:
        if kind == "sqlite":
            folder = Path(tempfile.mkdtemp(prefix="fleet-bench-db-"))
            try:
                results.append(await bench_one(kind, f"sqlite+aiosqlite:///{folder / 'fleet.db'}", args))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        else:
            from fleet_db import PostgresServer
            with PostgresServer() as pg:
                results.append(await bench_one(kind, pg.create_database("bench"), args))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="sqlite")
    parser.add_argument("--auth", choices=("session", "signed", "both"), default="session",
                        help="session tokens (as the agent), a signature per request, or one phase set each")
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured phase")
    parser.add_argument("--concurrency", type=int, default=32, help="connections of the load generator")
    parser.add_argument("--windows", default="1", type=lambda v: [int(x) for x in v.split(",")],
                        help="aggregate windows (report rows) per report; a list such as 1,4 runs a phase each")
    parser.add_argument("--profile", help="folder: run the server under cProfile and write its profile there")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    raise_fd_limit()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    results = asyncio.run(main_async(args))
    print(tables(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
