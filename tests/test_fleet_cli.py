"""`slmops fleet …` end to end: a real `slmops fleet serve` process (SQLite under a temporary SLMOPS_HOME) driven by
the real CLI: the first admin key made on the host, then tokens, groups, blueprint layers from YAML files, a
device's effective config, the ledger and its verification, and the one-line errors an operator meets."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, free_port
from procs import ServerProcess

DEVICE = "dev_00000000cafe"


class ControlPlaneProcess(ServerProcess):
    """`slmops fleet serve` on a free loopback port named by SLMOPS_FLEET_HOST, up once constructed."""

    def __init__(self, home: Path):
        port = free_port()
        self.env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_FLEET_HOST": f"127.0.0.1:{port}",
                    "SLMOPS_FLEET_POLL": "45s", "SLMOPS_CONFIG": "", "SLMOPS_FLEET_DB": "", "SLMOPS_FLEET_KEY": ""}
        super().__init__([BIN, "fleet", "serve"], home / "fleet.log", f"http://127.0.0.1:{port}", env=self.env)
        self.wait_ready()


@pytest.fixture
def plane(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    p = ControlPlaneProcess(home)
    yield p
    p.stop()


def fleet(plane: ControlPlaneProcess, *args: str, key: str = "", code: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**plane.env, "SLMOPS_FLEET_KEY": key, "COLUMNS": "200"}
    done = subprocess.run([str(BIN), "fleet", *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == code, f"slmops fleet {' '.join(args)}: {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_operating_a_fleet_from_the_cli(plane: ControlPlaneProcess, tmp_path: Path) -> None:
    db = Path(plane.env["SLMOPS_HOME"]) / "fleet.db"
    assert "fleet keys create" in one_line_error(fleet(plane, "groups", "list", code=1))  # no key yet
    admin = fleet(plane, "keys", "create", "root", "--role", "admin").stdout.strip()
    viewer = fleet(plane, "keys", "create", "watcher", "--role", "viewer").stdout.strip()
    assert admin.startswith("slm_") and viewer.startswith("slm_") and admin != viewer

    made = fleet(plane, "tokens", "create", "--expires", "2h", "--tag", "site=lyon", key=admin)
    token = made.stdout.strip()
    assert token and token not in made.stderr and "tok_" in made.stderr
    listed = json.loads(fleet(plane, "tokens", "list", "--json", key=admin).stdout)
    assert [t["tags"] for t in listed] == [{"site": "lyon"}] and token not in json.dumps(listed)

    assert "(0 devices)" in fleet(plane, "groups", "put", "lyon", "--select", "site=lyon", key=admin).stdout
    with sqlite3.connect(db) as conn:  # a device as enrolment leaves it (enrolment has its own tests)
        conn.execute("INSERT INTO devices (id, name, public_key, hardware, hardware_class, agent_version, tags, "
                     "enrolled_at, last_seen, health, desired_version, desired_hash) VALUES "
                     "(?, 'cafe', ?, '{}', 'cpu-x86_64', '1.0', ?, 1.0, ?, 'ok', 0, '')",
                     (DEVICE, b"\x01" * 32, json.dumps({"site": "lyon"}), time.time()))

    (tmp_path / "base.yaml").write_text("channel: stable\nperformance:\n  parallel_requests: 2\n  keep_alive: 5m\n")
    (tmp_path / "lyon.json").write_text('{"performance": {"parallel_requests": 4}}')
    (tmp_path / "bad.yaml").write_text("performance:\n  parallel_requests: many\n")
    fleet(plane, "blueprints", "put", "baseline", str(tmp_path / "base.yaml"), key=admin)
    fleet(plane, "blueprints", "put", "group:lyon", str(tmp_path / "lyon.json"), "--priority", "5", key=admin)
    refused = one_line_error(fleet(plane, "blueprints", "put", "group:lyon", str(tmp_path / "bad.yaml"), key=admin,
                                   code=1))
    assert refused.startswith("Error: group:lyon: performance.parallel_requests") and "many" in refused
    # --key wins over SLMOPS_FLEET_KEY
    denied = one_line_error(fleet(plane, "--key", viewer, "groups", "put", "x", "--select", "a=b", key=admin, code=1))
    assert denied == "Error: role viewer cannot put group; needs operator"

    table = fleet(plane, "config", DEVICE, key=viewer).stdout
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:] if line.strip()}
    assert rows == {"channel": ["stable", "baseline"], "performance.keep_alive": ["5m", "baseline"],
                    "performance.parallel_requests": ["4", "group:lyon"]}
    listed = json.loads(fleet(plane, "devices", "--group", "lyon", "--json", key=viewer).stdout)
    assert [(d["id"], d["groups"]) for d in listed] == [(DEVICE, ["lyon"])]

    entries = json.loads(fleet(plane, "ledger", "--json", key=viewer).stdout)
    assert [(e["actor"].split(":")[0], e["action"]) for e in entries] == [
        ("host", "key.create"), ("host", "key.create"), ("key", "token.create"), ("key", "group.put"),
        ("key", "blueprint.put"), ("key", "blueprint.put")]
    assert "ledger intact: 6 entries" in fleet(plane, "ledger", "verify", key=viewer).stdout

    with sqlite3.connect(db) as conn:  # an edited entry: verify names it and fails
        conn.execute("UPDATE ledger SET actor = 'key:someone' WHERE seq = 4")
    broken = fleet(plane, "ledger", "verify", key=viewer, code=1)
    assert "ledger entry 4" in broken.stderr


def test_an_unreachable_control_plane_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "SLMOPS_HOME": str(tmp_path), "SLMOPS_FLEET_HOST": f"127.0.0.1:{free_port()}",
           "SLMOPS_FLEET_KEY": "slm_000000000000_" + "A" * 43, "SLMOPS_CONFIG": ""}
    done = subprocess.run([str(BIN), "fleet", "devices"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert one_line_error(done) == (f"Error: cannot reach the control plane at http://{env['SLMOPS_FLEET_HOST']}; "
                                    "start it with `slmops fleet serve` or set SLMOPS_FLEET_HOST")


def test_a_device_enrols_and_polls_from_the_cli(plane: ControlPlaneProcess, tmp_path: Path) -> None:
    """`slmops agent enrol` makes the device's key under its own SLMOPS_HOME (0600, never sent), enrols with a
    one-time token and keeps its identity; `agent desired` is a signed poll; a second enrol is refused."""
    admin = fleet(plane, "keys", "create", "root", "--role", "admin").stdout.strip()
    token = fleet(plane, "tokens", "create", "--tag", "site=lyon", key=admin).stdout.strip()
    device_home = tmp_path / "device"
    env = {**os.environ, "SLMOPS_HOME": str(device_home), "SLMOPS_FLEET_HOST": plane.env["SLMOPS_FLEET_HOST"]}

    def agent(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN), "agent", *args], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == code, f"slmops agent {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    assert "not enrolled" in one_line_error(agent("desired", code=1))
    out = agent("enrol", "--token", token, "--name", "pi-1", "--tag", "tier=edge").stdout
    ident = json.loads((device_home / "fleet" / "device.json").read_text())
    assert ident["device_id"] in out and ident["hardware_class"] in out
    assert ident["poll_interval_s"] == 45  # SLMOPS_FLEET_POLL, told at enrolment: `agent run` polls that often
    assert (device_home / "fleet" / "device.key").stat().st_mode & 0o777 == 0o600
    shown = json.loads(fleet(plane, "devices", "show", ident["device_id"], "--json", key=admin).stdout)
    assert shown["name"] == "pi-1" and shown["tags"] == {"site": "lyon", "tier": "edge"}

    fleet(plane, "groups", "put", "lyon", "--select", "site=lyon", key=admin)
    (tmp_path / "base.yaml").write_text("performance: {keep_alive: 5m}\n")
    fleet(plane, "blueprints", "put", "baseline", str(tmp_path / "base.yaml"), key=admin)
    state = json.loads(agent("desired", "--json").stdout)
    assert state["device_id"] == ident["device_id"] and state["release"] is None
    assert state["config"] == {"performance": {"keep_alive": "5m"}} and state["version"] >= 1

    assert "already enrolled" in one_line_error(agent("enrol", "--token", token, code=1))
    other = tmp_path / "other"
    reused = subprocess.run([str(BIN), "agent", "enrol", "--token", token], capture_output=True, text=True,
                            timeout=120, env={**env, "SLMOPS_HOME": str(other)})
    assert reused.returncode == 1 and "used or expired" in one_line_error(reused)
