"""Control-plane load: a real `slmops fleet serve` process (uvloop + httptools), N devices enrolled through the
real API, then desired-state polls on the 304 path and reports, from an aiohttp load generator on the same host.

    python bench/fleet_bench.py --db sqlite --devices 2000 --seconds 10 --json out.json
    python bench/fleet_bench.py --db both                    # PostgreSQL via tests/fleet_db.PostgresServer

Every request is signed with its device's own Ed25519 key, and the server verifies every one. The signatures are
made before each phase (see ``Device``): the load generator shares the machine with the server, and its signing
would otherwise be measured as the server's slowness. A poll's Authorization is the same for every poll of that
device within one second (it signs the same bytes). What was accepted (202) is counted in the database at the end,
after the server stopped and flushed: accepted rows must all be stored. CPU columns give the server's (and the
load generator's) CPU time per request, which says more than a rate on a machine other work shares.
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
    seq: int = 0
    polls: dict[int, str] = field(default_factory=dict)  # second -> Authorization of a poll
    reports: dict[int, list[tuple[bytes, str]]] = field(default_factory=dict)  # second -> (body, Authorization)

    def poll_auth(self, now: int) -> str:
        auth = self.polls.get(now)
        if auth is None:
            auth = self.polls[now] = self.key.authorization(self.id, "GET", POLL, b"", now)
        return auth

    def report(self, now: int, windows: int) -> tuple[bytes, str]:
        ready = self.reports.get(now)
        if ready:
            return ready.pop()
        body = report_body(self, windows)
        return body, self.key.authorization(self.id, "POST", REPORT, body, now)


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
                concurrency: int, server_pid: int) -> Phase:
    phase = Phase()
    end = time.perf_counter() + seconds

    async def worker(mine: list[Device]) -> None:
        i = 0
        while time.perf_counter() < end:
            d = mine[i % len(mine)]
            i += 1
            t0 = time.perf_counter()
            headers = {"Authorization": d.poll_auth(int(time.time())), "If-None-Match": d.etag}
            async with session.get(url + POLL, headers=headers) as r:
                await r.read()
                phase.status[r.status] += 1
            phase.latencies.append(time.perf_counter() - t0)

    await measured(phase, server_pid, asyncio.gather(*(worker(devices[k::concurrency]) for k in range(concurrency))))
    return phase


def report_body(d: Device, windows: int) -> bytes:
    d.seq += 1
    start = 1.7e9 + 60.0 * d.seq * windows
    return json.dumps({"running": {"release": "bench:1.0.0", "manifest_digest": "sha256:" + "ab" * 32},
                       "health": "ok", "desired_version": 1,
                       "windows": [{"start": start + 60 * w, "end": start + 60 * (w + 1), "requests": 12,
                                    "errors": 0, "ttft_p50_ms": 40.0, "ttft_p95_ms": 95.5, "tokens_per_s": 31.0}
                                   for w in range(windows)]}).encode()


async def reports(session: aiohttp.ClientSession, url: str, devices: list[Device], seconds: float,
                  concurrency: int, windows: int, server_pid: int) -> Phase:
    phase = Phase()
    end = time.perf_counter() + seconds

    async def worker(mine: list[Device]) -> None:
        i = 0
        while time.perf_counter() < end:
            d = mine[i % len(mine)]
            i += 1
            body, auth = d.report(int(time.time()), windows)
            headers = {"Authorization": auth, "Content-Type": "application/json"}
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


async def bench_one(kind: str, db_url: str, args: argparse.Namespace) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix=f"fleet-bench-{kind}-"))
    profile = Path(args.profile) / f"server-{kind}.prof" if args.profile else None
    server = Server(db_url, home, profile)
    result: dict[str, Any] = {"db": kind, "devices": args.devices, "concurrency": args.concurrency,
                              "windows_per_report": args.windows}
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
            result["presign_polls_s"] = presign(devices, args.seconds, None)
            p = await polls(session, server.url, devices, args.seconds, args.concurrency, server.proc.pid)
            result.update(polls_per_s=p.rate(304), poll_status=dict(p.status), poll_p50_ms=p.p(0.5),
                          poll_p99_ms=p.p(0.99), poll_cpu_us=p.cpu_us(304))
            result["presign_reports_s"] = presign(devices, args.seconds, args.windows)
            r = await reports(session, server.url, devices, args.seconds, args.concurrency, args.windows,
                              server.proc.pid)
            accepted = r.status[202]
            result.update(report_requests_per_s=r.rate(202), report_rows_per_s=r.rate(202) * args.windows,
                          report_status=dict(r.status), report_p50_ms=r.p(0.5), report_p99_ms=r.p(0.99),
                          report_cpu_us=r.cpu_us(202),
                          accepted_rows=accepted * args.windows)
    finally:
        server.stop()
        if server.proc.returncode == 0:
            shutil.rmtree(home, ignore_errors=True)
    stored, enrolled = await count_rows(db_url)
    result.update(stored_rows=stored, enrolled=enrolled, all_stored=stored == result.get("accepted_rows"))
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per database; CPU columns: microseconds of CPU per request, server / load generator."""
    cols: list[tuple[str, Any]] = [
        ("db", lambda r: r["db"]), ("devices", lambda r: str(r["devices"])),
        ("enrol/s", lambda r: f"{r['enrol_per_s']:.0f}"),
        ("polls/s (304)", lambda r: f"{r['polls_per_s']:.0f}"),
        ("poll p50/p99 ms", lambda r: f"{r['poll_p50_ms']:.1f}/{r['poll_p99_ms']:.1f}"),
        ("poll CPU us srv/gen", lambda r: "{:.0f}/{:.0f}".format(*r["poll_cpu_us"])),
        ("report req/s", lambda r: f"{r['report_requests_per_s']:.0f}"),
        ("report rows/s", lambda r: f"{r['report_rows_per_s']:.0f}"),
        ("report p50/p99 ms", lambda r: f"{r['report_p50_ms']:.1f}/{r['report_p99_ms']:.1f}"),
        ("report CPU us srv/gen", lambda r: "{:.0f}/{:.0f}".format(*r["report_cpu_us"])),
        ("stored/accepted rows", lambda r: f"{r['stored_rows']}/{r['accepted_rows']}")]
    rows = [[show(r) for _, show in cols] for r in results]
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (title, _) in enumerate(cols)]
    print("  ".join(title.ljust(w) for (title, _), w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


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
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured phase")
    parser.add_argument("--concurrency", type=int, default=32, help="connections of the load generator")
    parser.add_argument("--windows", type=int, default=1, help="aggregate windows (report rows) per report")
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
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
