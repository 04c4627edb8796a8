"""Two real `slmops fleet serve` processes on one PostgreSQL database, as behind a load balancer: what one replica
is told is what the other serves. A device enrolled through one polls the other; a blueprint change and a
revocation made through one reach the other's cached ETags and keys through the change feed (deadlines are
generous; nothing here times how fast)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_db import postgres  # noqa: F401

from conftest import BIN, free_port
from slmops.client.device import DeviceClient
from slmops.client.fleet import FleetClient
from slmops.fleet.deviceauth import DeviceKey
from slmops.types.errors import Unauthenticated

DEADLINE_S = 30.0


class Replica:
    """One `slmops fleet serve` process on a free loopback port."""

    def __init__(self, home: Path, db_url: str, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / f"{name}.log"
        self._log = self.log_path.open("w")
        env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_FLEET_DB": db_url}
        self.proc = subprocess.Popen([str(BIN), "fleet", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    break
            time.sleep(0.1)
        raise RuntimeError(f"replica did not start: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def replicas(postgres, tmp_path):  # type: ignore[no-untyped-def]
    name = f"fleet_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(name)
    home = tmp_path / "home"
    home.mkdir()
    made = subprocess.run([str(BIN), "fleet", "keys", "create", "root", "--role", "admin", "--db", url],
                          check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLMOPS_HOME": str(home)})
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    started = [Replica(home, url, "a"), Replica(home, url, "b")]  # both start (and migrate) at once
    try:
        for r in started:
            r.wait_ready()
        yield started[0], started[1], key
    finally:
        for r in started:
            r.stop()
        postgres.drop_database(name)


async def eventually(check: Callable[[], Any], what: str) -> Any:
    end = time.monotonic() + DEADLINE_S
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(what)
        await asyncio.sleep(0.1)


def test_a_change_through_one_replica_is_served_by_the_other(replicas):
    a, b, key = replicas
    with FleetClient(a.url, key) as ops_a:
        secret = ops_a.create_token("1h", {"site": "lyon"}).token

    async def scenario() -> None:
        device_key = DeviceKey.generate()
        async with DeviceClient(a.url, device_key) as via_a:
            enrolled = await via_a.enrol(secret, name="edge-1", hardware={"cpu": {"architecture": "aarch64"}})
        async with DeviceClient(b.url, device_key, enrolled.device_id) as via_b:
            first, etag = await via_b.desired()
            assert first is not None and first.version == 1 and first.config == {}
            assert (await via_b.desired(etag)) == (None, etag)  # cached on b now

            with FleetClient(a.url, key) as ops_a:  # a blueprint change through a ...
                ops_a.put_blueprint("baseline", {"performance": {"keep_alive": "7m"}})

            async def new_state() -> Any:
                state, _ = await via_b.desired(etag)
                return state

            state = await eventually(new_state, "replica b kept serving the old desired state")  # ... served by b
            assert state.version == 2 and state.config == {"performance": {"keep_alive": "7m"}}

            with FleetClient(a.url, key) as ops_a:  # a revocation through a ...
                ops_a.revoke_device(enrolled.device_id)

            async def refused() -> bool:
                try:
                    await via_b.desired()
                except Unauthenticated as err:
                    return "revoked" in str(err)
                return False

            await eventually(refused, "replica b kept accepting a revoked device")  # ... bites on b

    asyncio.run(scenario())
