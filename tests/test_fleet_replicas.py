"""Two real `slmops fleet serve` processes on one PostgreSQL database, as behind a load balancer: what one replica
is told is what the other serves. A device enrolled through one polls the other, with a session token the first
issued; a blueprint change and a revocation made through one reach the other's cached ETags and keys through the
change feed (deadlines are generous; nothing here times how fast)."""

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
from procs import ServerProcess
from slmops.client import DeviceClient, FleetClient
from slmops.fleet.deviceauth import DeviceKey
from slmops.types.errors import Unauthenticated

DEADLINE_S = 30.0


class Replica(ServerProcess):
    """One `slmops fleet serve` process on a free loopback port; ``wait_ready()`` once all have started."""

    def __init__(self, home: Path, db_url: str, name: str):
        port = free_port()
        env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_FLEET_DB": db_url}
        super().__init__([BIN, "fleet", "serve", "--host", "127.0.0.1", "--port", str(port)], home / f"{name}.log",
                         f"http://127.0.0.1:{port}", env=env)


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
            session = await via_a.new_session()  # made by a, under the secret both replicas share
        async with httpx.AsyncClient() as raw:
            skewed = await raw.get(a.url + "/fleet/v1/device/desired", headers={
                "authorization": device_key.authorization(enrolled.device_id, "GET", "/fleet/v1/device/desired",
                                                          b"", int(time.time()) - 3600)})
        assert skewed.status_code == 401 and len(skewed.headers.get_list("date")) == 1  # the server's, once
        async with DeviceClient(b.url, device_key, enrolled.device_id) as via_b:
            via_b.use_session(session)  # a's token, on b
            first, etag = await via_b.desired()
            assert first is not None and first.version == 1 and first.config == {}
            assert (await via_b.desired(etag)) == (None, etag)  # cached on b now
            assert via_b.signed == 0 and via_b.session is session  # b took a's session token as it was

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
