"""`slmops fleet rollout …` end to end: a real `slmops fleet serve` process (SQLite, SLMOPS_FLEET_TICK set) driven
by the real CLI: start with waves and gates, list, status as a table and as JSON, pause, resume, promote one
class, abort, and the one-line errors an operator meets. Devices and releases are written as rows (enrolment and
releases have their own tests)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from test_fleet_cli import ControlPlaneProcess, fleet, one_line_error

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLMOPS_FLEET_TICK", "250ms")
    home = tmp_path / "home"
    home.mkdir()
    p = ControlPlaneProcess(home)
    yield p
    p.stop()


def _rows(db: Path) -> None:
    """Three devices of two classes in site lyon; smol:1.0.0 on channel stable, smol:2.0.0 with a cpu and a cuda
    variant."""
    with sqlite3.connect(db) as conn:
        for i, cls in enumerate(("cpu-x86_64", "cpu-x86_64", "cuda-x86_64")):
            conn.execute("INSERT INTO devices (id, name, public_key, hardware, hardware_class, agent_version, tags, "
                         "enrolled_at, last_seen, health, desired_version, desired_hash, applied_version) VALUES "
                         "(?, ?, ?, '{}', ?, '1.0', ?, 1.0, ?, 'ok', 0, '', 0)",
                         (f"dev_00000000000{i}", f"d{i}", bytes([i]) * 32, cls,
                          json.dumps({"site": "lyon", "class": cls}), time.time()))
        for rid, version, hardware in ((1, "1.0.0", ("*",)), (2, "2.0.0", ("cpu", "cuda-x86_64"))):
            conn.execute("INSERT INTO releases (id, name, version, golden, notes, created_by, created_at) VALUES "
                         "(?, 'smol', ?, '[]', '', 'key:ops', ?)", (rid, version, time.time()))
            for hw in hardware:
                conn.execute("INSERT INTO variants (release_id, hardware, reference, manifest_digest) VALUES "
                             "(?, ?, ?, ?)", (rid, hw, f"reg.example/smol@{DIGEST}", DIGEST))
        conn.execute("INSERT INTO channels (name, release_id, updated_at) VALUES ('stable', 1, ?)", (time.time(),))


def test_rolling_out_from_the_cli(plane: ControlPlaneProcess, tmp_path: Path) -> None:
    admin = fleet(plane, "keys", "create", "root", "--role", "admin").stdout.strip()
    _rows(Path(plane.env["SLMOPS_HOME"]) / "fleet.db")
    (tmp_path / "base.yaml").write_text("channel: stable\n")
    fleet(plane, "blueprints", "put", "baseline", str(tmp_path / "base.yaml"), key=admin)
    fleet(plane, "groups", "put", "lyon", "--select", "site=lyon", key=admin)

    bad = one_line_error(fleet(plane, "rollout", "start", "smol:2.0.0", "--to", "lyon", "--waves", "a,b", key=admin,
                               code=1))
    assert bad == "Error: --waves 'a,b': write cumulative percents such as 1,10,50,100"

    out = fleet(plane, "rollout", "start", "smol:2.0.0", "--to", "lyon", "--waves", "50,100", "--bake", "10m",
                "--gate", "error_rate < 0.5", "--gate", "ttft_p95 <= 1.2 x previous", key=admin).stdout
    rid = out.split()[1]
    assert out.startswith(f"rollout {rid} started: smol:2.0.0 to group lyon") and rid.startswith("ro_")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("cpu-", "cuda-"))}
    # CLASS STATUS WAVE SHARE PREVIOUS TOTAL TARGETED APPLIED RUNNING FAILING REVERTED
    assert rows["cpu-x86_64"][:7] == ["cpu-x86_64", "active", "1/2", "50%", "smol:1.0.0", "2", "1"]
    assert rows["cuda-x86_64"][:7] == ["cuda-x86_64", "active", "1/2", "50%", "smol:1.0.0", "1", "1"]

    clash = one_line_error(fleet(plane, "rollout", "start", "smol:2.0.0", "--to", "lyon", key=admin, code=1))
    assert clash.startswith(f"Error: rollout {rid} is still under way in group lyon")

    listed = json.loads(fleet(plane, "rollout", "list", "--json", key=admin).stdout)
    assert [(r["id"], r["status"]) for r in listed] == [(rid, "running")]
    shown = json.loads(fleet(plane, "rollout", "status", "--json", key=admin).stdout)  # the one under way
    assert shown["id"] == rid and shown["plan"]["bake_s"] == 600
    assert {g["gate"]: g["outcome"] for g in shown["classes"][0]["gates"]} == {
        "error_rate < 0.5": "waiting", "ttft_p95 <= 1.2 x previous": "waiting"}  # no device reported yet
    table = fleet(plane, "rollout", "status", rid, key=admin).stdout
    assert "GATE" in table and "error_rate < 0.5" in table and "waiting" in table

    assert f"rollout {rid}: paused" in fleet(plane, "rollout", "pause", rid, key=admin).stdout
    assert f"rollout {rid}: running" in fleet(plane, "rollout", "resume", rid, key=admin).stdout
    promoted = fleet(plane, "rollout", "promote", rid, "--class", "cpu-x86_64", key=admin).stdout
    cpu = next(line.split() for line in promoted.splitlines() if line.startswith("cpu-x86_64"))
    assert cpu[:7] == ["cpu-x86_64", "active", "2/2", "100%", "smol:1.0.0", "2", "2"]

    aborted = fleet(plane, "rollout", "abort", rid, key=admin).stdout
    assert f"rollout {rid}: aborted" in aborted
    watched = fleet(plane, "rollout", "status", rid, "--watch", key=admin).stdout  # a finished one: shown, done
    assert rid in watched and "aborted" in watched

    ledger = json.loads(fleet(plane, "ledger", "--json", "--limit", "1000", key=admin).stdout)
    assert [e["action"] for e in ledger if e["subject"] == f"rollout:{rid}"] == [
        "rollout.started", "rollout.paused", "rollout.resumed", "rollout.promoted", "rollout.aborted",
        "rollout.reverted", "rollout.reverted"]
    assert sorted(e["subject"] for e in ledger if e["action"] == "device.reverted") == [
        "device:dev_000000000000", "device:dev_000000000001", "device:dev_000000000002"]
    missing = one_line_error(fleet(plane, "rollout", "status", "ro_000000000000", key=admin, code=1))
    assert missing == "Error: no rollout 'ro_000000000000'; `slmops fleet rollout list` shows them"
