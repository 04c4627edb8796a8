"""The audit log against someone who can send requests or edit files: odd characters in a request cannot break
the chain, and records cut from the end, a missing or stale head, or a log deleted outright fail `audit verify`,
while a crash between writing a record and its head heals on the next append."""

import hashlib
import hmac
import json

import pytest

from conftest import HTTP, Server, run_cli
from slmops.security.audit import GENESIS, AuditLog, verify
from slmops.security.keys import KeyStore

SECRET = b"0123456789abcdef-secret"


def _log(folder, n: int = 4, **kw) -> AuditLog:
    log = AuditLog(folder / "audit" / "audit.log", **kw)
    for i in range(n):
        log.append(key="alice", route="/api/chat", status=200, n=i)
    return log


def _records(log: AuditLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_bytes().split(b"\n") if line]


# -- characters that are line breaks to str.splitlines -------------------------------------------------------------
@pytest.mark.parametrize("key", [None, SECRET])
def test_line_separators_in_a_request_cannot_break_the_chain(tmp_path, key):
    log = _log(tmp_path, 1, key=key)
    for ch in ("\x85", "\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r", "é", "\U0001f600"):
        log.append(key="-", route="/" + ch, status=401, content={"request": f"a{ch}b"})
    log.append(key="alice", route="/api/chat", status=200)
    v = verify(log)
    assert v.ok and v.records == 13, v.problem
    data = log.path.read_bytes()
    assert data.isascii() and data.count(b"\n") == 13  # one record a line, whatever the record holds
    assert _records(log)[2]["route"] == "/\u2028"


def test_lone_surrogates_are_recorded_and_verify(tmp_path):
    log = _log(tmp_path, 1, key=SECRET)
    record = log.append(key="-", route="/\ud800", status=401, content={"request": "x\udcff"})  # must not raise
    assert record["seq"] == 2
    assert verify(log).ok and verify(log).records == 2
    assert _records(log)[1]["route"] == "/\ud800"


def _old_style(folder, key: bytes | None, texts: list[str]) -> AuditLog:
    """A log as the previous version wrote it: raw UTF-8 in the lines, hashed over the same canonical JSON."""
    log = AuditLog(folder / "audit" / "audit.log", key)
    log.path.parent.mkdir(parents=True)
    prev, lines = GENESIS, []
    for seq, text in enumerate(texts, 1):
        record = {"seq": seq, "time": "2024-01-01T00:00:00.000000Z", "key": "-", "route": text, "prev": prev}
        data = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        record["hash"] = prev = hashlib.sha256(data).hexdigest()
        if key:
            record["hmac"] = hmac.new(key, data, hashlib.sha256).hexdigest()
        lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    log.path.write_bytes(("\n".join(lines) + "\n").encode())
    head = {"seq": len(texts), "hash": prev}
    if key:
        head["hmac"] = hmac.new(key, f"{len(texts)}:{prev}".encode(), hashlib.sha256).hexdigest()
    log.head_path.write_text(json.dumps(head))
    return log


@pytest.mark.parametrize("key", [None, SECRET])
def test_logs_written_by_the_previous_version_still_verify_and_continue(tmp_path, key):
    log = _old_style(tmp_path, key, ["/café", "/a\u2028b", "/\x85", "/plain"])
    assert b"\xe2\x80\xa8" in log.path.read_bytes()  # a raw U+2028 in the file
    v = verify(log)
    assert v.ok and v.records == 4, v.problem
    log.append(key="-", route="/next", status=200)
    v = verify(log)
    assert v.ok and v.records == 5, v.problem


def test_a_request_with_next_line_in_its_path_leaves_the_log_intact(tmp_path):
    home = tmp_path / "home"
    KeyStore(home / "keys.json").create("ci", "user")
    with Server(home) as s:
        assert HTTP.get(s.url + "/%C2%85").status_code == 401
        assert HTTP.get(s.url + "/a%E2%80%A8b%ED%A0%80").status_code == 401
        assert HTTP.get(s.url + "/api/tags").status_code == 401
    routes = [r["route"] for r in _records(AuditLog(home / "audit" / "audit.log"))]
    assert routes[0] == "/\x85" and len(routes) == 3
    r = run_cli("audit", "verify", home=home)
    assert r.returncode == 0 and "intact: 3 records" in r.stdout, r.stdout + r.stderr


# -- records deleted at the end, and the head ------------------------------------------------------------------
def _cut(log: AuditLog, keep: int) -> None:
    lines = log.path.read_bytes().split(b"\n")[:-1]
    log.path.write_bytes(b"".join(line + b"\n" for line in lines[:keep]))


def test_a_missing_head_where_records_exist_fails(tmp_path):
    log = _log(tmp_path)
    log.head_path.unlink()
    v = verify(log)
    assert not v.ok and "audit.log.head" in v.problem and "missing" in v.problem


def test_cutting_the_last_records_and_deleting_the_head_fails(tmp_path):
    log = _log(tmp_path)
    _cut(log, 2)
    log.head_path.unlink()
    assert not verify(log).ok


def test_an_older_head_restored_fails(tmp_path):
    log = _log(tmp_path, 2)
    old = log.head_path.read_bytes()
    log.append(key="alice", route="/api/chat", status=200)
    log.append(key="alice", route="/api/chat", status=200)
    log.head_path.write_bytes(old)
    v = verify(log)
    assert not v.ok and "record 2" in v.problem and "record 4" in v.problem


def test_a_head_ahead_of_the_chain_fails(tmp_path):
    log = _log(tmp_path)
    _cut(log, 3)
    v = verify(log)
    assert not v.ok and "deleted at the end" in v.problem


def test_a_head_that_names_another_last_record_fails(tmp_path):
    log = _log(tmp_path)
    head = json.loads(log.head_path.read_text())
    head["hash"] = "f" * 64
    log.head_path.write_text(json.dumps(head))
    assert not verify(log).ok


def test_a_head_without_records_fails(tmp_path):
    log = _log(tmp_path)
    for f in log.files():
        f.unlink()
    v = verify(log)
    assert not v.ok and "record 4" in v.problem


def test_no_log_at_all_is_not_intact(tmp_path):
    log = _log(tmp_path)
    for f in log.files():
        f.unlink()
    log.head_path.unlink()
    v = verify(log)
    assert not v.ok and v.records == 0 and "no audit log" in v.problem


def test_an_unreadable_head_fails_instead_of_raising(tmp_path):
    log = _log(tmp_path)
    log.head_path.write_text("{not json")
    v = verify(log)
    assert not v.ok and "audit.log.head" in v.problem


def test_the_head_is_written_with_the_sequence_number_and_no_temp_files_stay(tmp_path):
    log = _log(tmp_path, 3, key=SECRET)
    head = json.loads(log.head_path.read_text())
    last = _records(log)[-1]
    assert head["seq"] == 3 and head["hash"] == last["hash"]
    assert head["hmac"] == hmac.new(SECRET, f"3:{last['hash']}".encode(), hashlib.sha256).hexdigest()
    assert sorted(p.name for p in log.path.parent.iterdir()) == ["audit.log", "audit.log.head", "audit.log.lock"]


# -- a crash between the record and its head -----------------------------------------------------------------
def test_a_crash_before_the_head_was_written_heals_on_the_next_append(tmp_path):
    log = _log(tmp_path, 3, key=SECRET)
    before = log.head_path.read_bytes()
    log.append(key="alice", route="/api/chat", status=200)
    log.head_path.write_bytes(before)  # as if the process died after the record, before the head
    assert not verify(log).ok  # until the next append, the head is behind
    log.append(key="alice", route="/api/chat", status=200)
    v = verify(log)
    assert v.ok and v.records == 5, v.problem
    assert [r["seq"] for r in _records(log)] == [1, 2, 3, 4, 5]


def test_a_crash_after_the_very_first_record_heals(tmp_path):
    log = _log(tmp_path, 1)
    log.head_path.unlink()
    log.append(key="alice", route="/api/chat", status=200)
    v = verify(log)
    assert v.ok and v.records == 2, v.problem


def test_a_crash_right_after_rotation_heals(tmp_path):
    log = AuditLog(tmp_path / "audit.log", max_bytes=400)
    while len(log.files()) < 2:
        before = log.head_path.read_bytes() if log.head_path.exists() else None
        log.append(key="k", route="/api/generate", status=200)
    assert len(_records(log)) == 1  # the record that opened the new file
    log.head_path.write_bytes(before)
    log.append(key="k", route="/api/generate", status=200)
    assert verify(log).ok, verify(log).problem


def test_tampering_stays_visible_after_the_next_append(tmp_path):
    deleted = _log(tmp_path / "a")
    deleted.head_path.unlink()
    deleted.append(key="alice", route="/api/chat", status=200)
    assert not verify(deleted).ok
    stale = _log(tmp_path / "b", 2)
    old = stale.head_path.read_bytes()
    stale.append(key="alice", route="/api/chat", status=200)
    stale.append(key="alice", route="/api/chat", status=200)
    stale.head_path.write_bytes(old)  # two behind: not a crash
    stale.append(key="alice", route="/api/chat", status=200)
    assert not verify(stale).ok
    forged = _log(tmp_path / "c", 4, key=SECRET)
    _cut(forged, 2)
    head = {"seq": 2, "hash": _records(forged)[-1]["hash"], "hmac": "0" * 64}  # no key to sign it with
    forged.head_path.write_text(json.dumps(head))
    forged.append(key="alice", route="/api/chat", status=200)
    assert not verify(forged).ok


# -- the same through `slmops audit verify` ----------------------------------------------------------------------
def _tamper(log: AuditLog, how: str) -> None:
    if how == "head deleted":
        log.head_path.unlink()
    elif how == "last records cut, head deleted":
        _cut(log, 2)
        log.head_path.unlink()
    elif how == "older head restored":
        log.head_path.write_text(json.dumps({"seq": 2, "hash": _records(log)[1]["hash"]}))
    elif how == "last records cut":
        _cut(log, 2)
    elif how == "every file deleted but the head":
        for f in log.files():
            f.unlink()


@pytest.mark.parametrize("how", ["head deleted", "last records cut, head deleted", "older head restored",
                                 "last records cut", "every file deleted but the head"])
def test_audit_verify_command_reports_deleted_records(tmp_path, how):
    log = _log(tmp_path)
    _tamper(log, how)
    r = run_cli("audit", "verify", home=tmp_path)
    assert r.returncode == 1 and "TAMPERED" in r.stdout and "intact" not in r.stdout, r.stdout + r.stderr


def test_audit_verify_command_says_when_there_is_no_log(tmp_path):
    r = run_cli("audit", "verify", home=tmp_path)
    assert r.returncode == 1 and "intact" not in r.stdout + r.stderr
    assert "no audit log" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    log = _log(tmp_path)
    assert run_cli("audit", "verify", home=tmp_path).returncode == 0
    for f in [*log.files(), log.head_path]:
        f.unlink()
    r = run_cli("audit", "verify", home=tmp_path)
    assert r.returncode == 1 and "no audit log" in r.stderr and "intact" not in r.stdout
