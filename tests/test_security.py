"""Keys, roles, rate limits and the audit chain, without a server; and `slmops keys` / `slmops audit` as commands."""

import json
import os
import stat
import subprocess

import pytest

from conftest import BIN
from slmops.engine.client import EngineConfig
from slmops.engine.process import ProcessEngine
from slmops.security import roles
from slmops.security.audit import AuditLog, verify
from slmops.security.keys import KeyStore
from slmops.security.limits import RateLimiter
from slmops.server.app import create_app
from slmops.server.runtime import ModelRuntime
from slmops.store.store import Store
from slmops.types.errors import InvalidInput, NotFound


def test_every_route_of_the_app_is_in_the_role_table(tmp_path):
    store = Store(tmp_path / "models")
    app = create_app(store, ModelRuntime(store, ProcessEngine(EngineConfig()), keep_alive=300))
    seen = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    seen |= {(m, r.path) for r in app.routes if hasattr(r, "path") for m in getattr(r, "methods", None) or ()}
    seen.add(("HEAD", "/"))  # served, kept out of the schema
    for method, path in seen:
        path = path.replace("{model}", "{model:path}")  # the schema drops the path converter
        assert roles.permission(method, path) is not None, f"{method} {path} is not in the role table"
    assert len(seen) >= 25
    stale = {path for _, path in roles.ROUTES} - {p.replace("{model}", "{model:path}") for _, p in seen}
    assert not stale  # no rows for routes that are gone


@pytest.mark.parametrize("role,permission,ok", [
    ("user", roles.INFERENCE, True), ("user", roles.READ, True), ("user", roles.MANAGE, False),
    ("user", roles.METRICS, False), ("operator", roles.MANAGE, True), ("operator", roles.INFERENCE, True),
    ("operator", roles.METRICS, False), ("metrics", roles.METRICS, True), ("metrics", roles.INFERENCE, False),
    ("metrics", roles.READ, False), ("admin", roles.MANAGE, True), ("admin", roles.METRICS, True),
    ("admin", None, True), ("operator", None, False), ("nobody", roles.PUBLIC, True),
])
def test_role_matrix(role, permission, ok):
    assert roles.allowed(role, permission) is ok


def test_keys_are_shown_once_and_stored_only_as_salted_hashes(tmp_path):
    ks = KeyStore(tmp_path / "keys.json")
    a = ks.create("alice", "user")
    b = ks.create("bob", "user")
    text = (tmp_path / "keys.json").read_text()
    for secret in (a, b):
        assert secret.startswith("slm_") and secret.split("_", 2)[2] not in text
    records = json.loads(text)["keys"]
    assert records[0]["salt"] != records[1]["salt"] and len(records[0]["hash"]) == 64
    assert stat.S_IMODE(os.stat(tmp_path / "keys.json").st_mode) == 0o600
    assert ks.authenticate(a).name == "alice" and ks.authenticate(b).name == "bob"
    assert ks.authenticate(a[:-1] + ("A" if a[-1] != "A" else "B")) is None  # one character off
    assert ks.authenticate("slm_000000000000_" + "x" * 43) is None and ks.authenticate("nonsense") is None
    other_process = KeyStore(tmp_path / "keys.json")  # a running server sees CLI changes without a restart
    assert other_process.authenticate(a).name == "alice"
    ks.revoke("alice")
    assert other_process.authenticate(a) is None and other_process.authenticate(b).name == "bob"


def test_key_input_errors(tmp_path):
    ks = KeyStore(tmp_path / "keys.json")
    with pytest.raises(InvalidInput, match="unknown role 'root'"):
        ks.create("x", "root")
    with pytest.raises(InvalidInput, match="must be 1-64"):
        ks.create("../etc", "user")
    ks.create("x", "user")
    with pytest.raises(InvalidInput, match="exists"):
        ks.create("x", "admin")
    with pytest.raises(NotFound, match="no key named"):
        ks.revoke("y")


def test_rate_limits_are_token_buckets_with_a_retry_time():
    now = [1000.0]
    rl = RateLimiter(requests_per_minute=2, clock=lambda: now[0])
    assert rl.admit("k") == 0 and rl.admit("k") == 0
    assert rl.admit("k") == pytest.approx(30.0)  # one request's worth refills in 60/2 s
    assert rl.admit("other") == 0  # per key
    now[0] += 30
    assert rl.admit("k") == 0
    tokens = RateLimiter(tokens_per_minute=600, clock=lambda: now[0])
    assert tokens.admit("k") == 0
    tokens.spend_tokens("k", 900)  # one request may overdraw
    assert tokens.admit("k") == pytest.approx(30.1, abs=0.2)  # until the bucket is positive again
    now[0] += 31
    assert tokens.admit("k") == 0
    assert RateLimiter().admit("k") == 0  # no limits configured


def _log(tmp_path, **kw) -> AuditLog:
    log = AuditLog(tmp_path / "audit" / "audit.log", **kw)
    for i in range(6):
        log.append(key="alice", route="/api/chat", status=200, n=i)
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def _write(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("\n".join(lines) + "\n")


def test_audit_chain_verifies_and_names_the_first_edited_line(tmp_path):
    log = _log(tmp_path)
    assert verify(log).ok and verify(log).records == 6
    lines = _lines(log)
    edited = json.loads(lines[2])
    edited["status"] = 403
    _write(log, lines[:2] + [json.dumps(edited)] + lines[3:])
    v = verify(log)
    assert not v.ok and v.problem.startswith("audit.log:3:") and "edited" in v.problem


def test_audit_detects_inserted_deleted_and_truncated_records(tmp_path):
    log = _log(tmp_path)
    lines = _lines(log)
    _write(log, lines[:3] + [lines[1]] + lines[3:])  # a replayed record
    assert verify(log).problem.startswith("audit.log:4:")
    _write(log, lines[:2] + lines[3:])  # record 3 removed
    v = verify(log)
    assert v.problem.startswith("audit.log:3:") and "deleted" in v.problem
    _write(log, lines[:-1])  # the last record removed: the chain alone cannot tell, the head can
    v = verify(log)
    assert not v.ok and "deleted at the end" in v.problem
    _write(log, lines)
    assert verify(log).ok


def test_audit_rotation_keeps_the_chain_across_files(tmp_path):
    log = AuditLog(tmp_path / "audit.log", max_bytes=400)
    for i in range(12):
        log.append(key="k", route="/api/generate", status=200, n=i)
    files = log.files()
    assert len(files) >= 3 and files[-1].name == "audit.log" and files[0].name.startswith("audit.log.")
    v = verify(log)
    assert v.ok and v.records == 12
    rotated = files[1]
    text = rotated.read_text().splitlines()
    rotated.write_text("\n".join(text[1:]) + "\n")  # a record deleted inside a rotated file
    assert not verify(log).ok and verify(log).problem.startswith(f"{rotated.name}:1:")
    rotated.write_text("\n".join(text) + "\n")
    files[0].unlink()  # the oldest file deleted
    assert "earlier records deleted" in verify(log).problem


def test_audit_hmac_catches_a_recomputed_chain(tmp_path):
    import hashlib
    log = _log(tmp_path, key=b"0123456789abcdef-secret")
    assert verify(log).ok
    lines = _lines(log)
    forged = json.loads(lines[-1])
    forged["status"] = 200 if forged["status"] != 200 else 500
    body = {k: v for k, v in forged.items() if k not in ("hash", "hmac")}
    forged["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    _write(log, lines[:-1] + [json.dumps(forged)])  # hash recomputed, as someone without the key would
    v = verify(log)
    assert not v.ok and "HMAC" in v.problem and v.problem.startswith("audit.log:6:")


def run_cli(home, *args, **env):
    e = {**os.environ, "SLMOPS_HOME": str(home), **env}
    return subprocess.run([str(BIN), *args], env=e, capture_output=True, text=True, timeout=60)


def test_keys_and_audit_commands(tmp_path):
    made = run_cli(tmp_path, "keys", "create", "--name", "ci", "--role", "operator")
    assert made.returncode == 0 and made.stdout.strip().startswith("slm_")
    assert run_cli(tmp_path, "keys", "create", "--name", "bad", "--role", "root").stderr.startswith(
        "Error: unknown role 'root'")
    listed = run_cli(tmp_path, "keys", "list").stdout
    assert "ci" in listed and "operator" in listed and made.stdout.strip() not in listed
    assert run_cli(tmp_path, "keys", "revoke", "ci").returncode == 0
    assert "ci" not in run_cli(tmp_path, "keys", "list").stdout.splitlines()[-1]
    ok = run_cli(tmp_path, "audit", "verify")
    assert ok.returncode == 0 and "3 records" in ok.stdout  # create, failed create, revoke: all audited
    log = tmp_path / "audit" / "audit.log"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["route"] for r in records] == ["keys create", "keys create", "keys revoke"]
    assert records[1]["status"] == 1 and "unknown role" in records[1]["error"]
    log.write_text(log.read_text().replace('"ci"', '"cj"', 1))
    bad = run_cli(tmp_path, "audit", "verify")
    assert bad.returncode == 1 and "audit.log:1:" in bad.stdout and "TAMPERED" in bad.stdout
