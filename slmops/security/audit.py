"""A tamper-evident audit log: append-only JSON lines, each chained to the one before by hash.

Every record carries ``seq`` (one more than the previous), ``prev`` (the previous record's ``hash``) and ``hash``
= sha256 of its own canonical JSON without ``hash``/``hmac``; with an audit key it also carries ``hmac`` over
the same bytes. Editing a record breaks its hash; inserting or deleting one breaks ``seq`` and ``prev`` of the
next; deleting records at the end is caught by ``audit.head``, which names the last ``seq`` and ``hash``. A
hash chain alone stops edits by anyone who does not recompute it; the HMAC (``SLMOPS_AUDIT_KEY``) stops those
who would, as long as the key is kept off the host's disk.

Rotation by size renames ``audit.log`` to ``audit.log.1`` (older files shift up) and the chain runs on into the
new file. Server and CLI append to the same log: an exclusive ``flock`` orders them.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k not in ("hash", "hmac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class AuditLog:
    def __init__(self, path: Path, key: bytes | None = None, max_bytes: int = 64 << 20):
        self.path = path
        self.key = key
        self.max_bytes = max_bytes
        self.head_path = path.with_name(path.name + ".head")
        self._lock = threading.Lock()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, **fields: Any) -> dict[str, Any]:
        """Write one record (``time`` is added) and return it as written."""
        with self._locked():
            seq, prev = self._head()
            record = {"seq": seq + 1, "time": _now(), **fields, "prev": prev}
            data = _canonical(record)
            record["hash"] = hashlib.sha256(data).hexdigest()
            if self.key:
                record["hmac"] = hmac.new(self.key, data, hashlib.sha256).hexdigest()
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
            if self.path.exists() and self.path.stat().st_size + len(line.encode()) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            self._write_head(record["seq"], record["hash"])
            return record

    def _head(self) -> tuple[int, str]:
        try:
            head = json.loads(self.head_path.read_text())
            return int(head["seq"]), str(head["hash"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0, GENESIS

    def _write_head(self, seq: int, digest: str) -> None:
        head: dict[str, Any] = {"seq": seq, "hash": digest}
        if self.key:
            head["hmac"] = hmac.new(self.key, f"{seq}:{digest}".encode(), hashlib.sha256).hexdigest()
        tmp = self.head_path.with_name(self.head_path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(head))
        os.replace(tmp, self.head_path)

    def _rotate(self) -> None:
        n = 1
        while self.path.with_name(f"{self.path.name}.{n}").exists():
            n += 1
        for i in range(n, 1, -1):
            os.replace(self.path.with_name(f"{self.path.name}.{i - 1}"), self.path.with_name(f"{self.path.name}.{i}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def files(self) -> list[Path]:
        """Oldest first: audit.log.N ... audit.log.1, audit.log."""
        rotated = sorted(self.path.parent.glob(self.path.name + ".[0-9]*"), key=lambda p: -int(p.suffix[1:]))
        return rotated + ([self.path] if self.path.exists() else [])


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    files: int
    problem: str = ""  # "FILE:LINE: what is wrong"


def verify(log: AuditLog) -> Verdict:
    """Walk the chain across files; the first record that does not hold names the file and line."""
    prev, seq, count = None, None, 0
    files = log.files()
    for path in files:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.name}:{lineno}"
            try:
                record = json.loads(line)
                data = _canonical(record)
                r_seq, r_prev, r_hash = int(record["seq"]), record["prev"], record["hash"]
            except (ValueError, KeyError, TypeError):
                return Verdict(False, count, len(files), f"{where}: not an audit record (edited or corrupted)")
            if hashlib.sha256(data).hexdigest() != r_hash:
                return Verdict(False, count, len(files), f"{where}: contents do not match its hash (edited)")
            if log.key and not hmac.compare_digest(
                    record.get("hmac", ""), hmac.new(log.key, data, hashlib.sha256).hexdigest()):
                return Verdict(False, count, len(files), f"{where}: HMAC does not match (forged or edited)")
            if seq is None and (r_seq != 1 or r_prev != GENESIS):
                return Verdict(False, count, len(files),
                               f"{where}: the log starts at record {r_seq} (earlier records deleted)")
            if seq is not None and r_seq != seq + 1:
                what = "deleted" if r_seq > seq + 1 else "inserted or reordered"
                return Verdict(False, count, len(files),
                               f"{where}: record {r_seq} follows record {seq} (records {what} before it)")
            if prev is not None and r_prev != prev:
                return Verdict(False, count, len(files),
                               f"{where}: does not chain to the record before it (a record was inserted, "
                               "deleted or edited before it)")
            prev, seq, count = r_hash, r_seq, count + 1
    head_seq, head_hash = log._head()
    if log.head_path.exists():
        raw = json.loads(log.head_path.read_text())
        if log.key and not hmac.compare_digest(raw.get("hmac", ""), hmac.new(
                log.key, f"{head_seq}:{head_hash}".encode(), hashlib.sha256).hexdigest()):
            return Verdict(False, count, len(files), f"{log.head_path.name}: HMAC does not match (forged)")
        if seq is None or head_seq > seq:
            return Verdict(False, count, len(files), f"{log.path.name}: ends at record {seq or 0} but record "
                                                     f"{head_seq} was written (records deleted at the end)")
        if head_seq == seq and head_hash != prev:
            return Verdict(False, count, len(files), f"{log.path.name}: last record differs from the one written")
    return Verdict(True, count, len(files))


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
