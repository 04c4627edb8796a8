"""A tamper-evident audit log: append-only JSON lines, each chained to the one before by hash.

Every record carries ``seq`` (one more than the previous), ``prev`` (the previous record's ``hash``) and ``hash``
= sha256 of its own canonical JSON without ``hash``/``hmac``; with an audit key it also carries ``hmac`` over
the same bytes. Editing a record breaks its hash; inserting or deleting one breaks ``seq`` and ``prev`` of the
next. Deleting records at the end leaves a valid chain, which is what ``audit.log.head`` is for: it names the last
record's ``seq`` and ``hash`` (with a key, under an HMAC too), and must match the chain's end exactly, so records
cut from the end, a deleted or older head, and a log deleted while its head stays all fail :func:`verify`.
A hash chain alone stops edits by anyone who does not recompute it; the HMAC (``SLMOPS_AUDIT_KEY``) stops those
who would, as long as the key is kept off the host's disk.

Lines are ASCII-escaped JSON split on ``\\n`` only: a request path with U+0085 or U+2028 in it, which
``str.splitlines`` treats as line breaks, stays inside its record. The hash is over the canonical UTF-8 form (not
the escaped line), as before, so logs written by earlier versions with raw non-ASCII still verify.

Each record is fsynced, then the head replaced atomically. A crash between the two leaves the head one behind;
the next append notices that the newest record is exactly one past the head and chains to it, and continues from
that record. Any other disagreement is left for :func:`verify` to report: the next record chains on the head, so
tampering is not papered over.

Rotation by size renames ``audit.log`` to ``audit.log.1`` (older files shift up) and the chain runs on into the
new file. Server and CLI append to the same log: an exclusive ``flock`` orders them.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from slmops.store.atomic import atomic_writer, fsync_dir

GENESIS = "0" * 64
_TAIL_STEP = 64 << 10


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers. ``surrogatepass``: a lone surrogate (a route or body that is not valid
    UTF-8) must be recordable, since an append that raises loses the record of the request."""
    body = {k: v for k, v in record.items() if k not in ("hash", "hmac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8",
                                                                                               "surrogatepass")


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _head_mac(key: bytes, seq: int, digest: str) -> str:
    return _mac(key, f"{seq}:{digest}".encode())


def _parse(line: bytes) -> dict[str, Any]:
    """A record from one line; ValueError (or KeyError/TypeError) for anything that is not one."""
    record = json.loads(line.decode("utf-8"))
    int(record["seq"]), record["prev"], record["hash"]  # noqa: B018 - the fields every record has
    return record


def _holds(record: dict[str, Any], key: bytes | None) -> bool:
    """The record's hash (and HMAC, with a key) match its contents."""
    data = canonical(record)
    if hashlib.sha256(data).hexdigest() != record.get("hash"):
        return False
    return key is None or hmac.compare_digest(str(record.get("hmac", "")), _mac(key, data))


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
        return self.append_many([fields])[0]

    def append_many(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write several records with one sync of the log and one of the head: a busy server hands over what
        arrived while the previous write synced (group commit), so records cost disk syncs per batch, not each."""
        with self._locked():
            seq, prev = self._resume()
            written, lines = [], []
            for fields in items:
                record = {"seq": seq + 1, "time": _now(), **fields, "prev": prev}
                data = canonical(record)
                record["hash"] = hashlib.sha256(data).hexdigest()
                if self.key:
                    record["hmac"] = _mac(self.key, data)
                written.append(record)
                lines.append((json.dumps(record, separators=(",", ":")) + "\n").encode("ascii"))
                seq, prev = record["seq"], record["hash"]
            size = self.path.stat().st_size if self.path.exists() else 0
            batch: list[bytes] = []
            for line in lines:
                if size and size + len(line) > self.max_bytes:
                    if batch:
                        self._write_lines(batch)
                        batch = []
                    self._rotate()
                    size = 0
                batch.append(line)
                size += len(line)
            if batch:
                self._write_lines(batch)
            if written:
                self._write_head(seq, prev)
            return written

    def _write_lines(self, lines: list[bytes]) -> None:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(b"".join(lines))
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)  # the records are on disk before the head names them
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)

    def read_head(self) -> tuple[int, str, str] | None:
        """``(seq, hash, hmac)`` from the head file ("" for no HMAC); None when there is none. ValueError when
        it cannot be read as a head."""
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            head = json.loads(raw.decode("utf-8"))
            return int(head["seq"]), str(head["hash"]), str(head.get("hmac", ""))
        except (KeyError, TypeError, AttributeError, ValueError):
            raise ValueError("not a head") from None

    def _resume(self) -> tuple[int, str]:
        """``(seq, hash)`` the next record chains on: the head, or the newest record when it is exactly one past
        the head and chains to it (the writer died between the record and the head). A head that is missing,
        unreadable or not under the key counts as none, so the next record shows the break instead of hiding it."""
        try:
            head = self.read_head()
        except ValueError:
            head = None
        if head is not None and self.key and not hmac.compare_digest(head[2], _head_mac(self.key, *head[:2])):
            head = None
        seq, prev = head[:2] if head is not None else (0, GENESIS)
        last = self._last_record()
        if last is not None and int(last["seq"]) == seq + 1 and last["prev"] == prev and _holds(last, self.key):
            return seq + 1, str(last["hash"])
        return seq, prev

    def _last_record(self) -> dict[str, Any] | None:
        for path in reversed(self.files()):
            line = _last_line(path)
            if line is None:
                continue
            try:
                return _parse(line)
            except (ValueError, KeyError, TypeError):
                return None
        return None

    def _write_head(self, seq: int, digest: str) -> None:
        head: dict[str, Any] = {"seq": seq, "hash": digest}
        if self.key:
            head["hmac"] = _head_mac(self.key, seq, digest)
        with atomic_writer(self.head_path) as f:
            f.write(json.dumps(head).encode())

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


def _last_line(path: Path) -> bytes | None:
    """The file's last non-empty line, read from the end (records with audited content can be large)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            step = min(_TAIL_STEP, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            body = tail.rstrip(b"\n")
            cut = body.rfind(b"\n")
            if cut >= 0:
                return body[cut + 1:]
        return tail.rstrip(b"\n") or None


class BatchingWriter:
    """Appends from one thread, in batches: a record's syncs take milliseconds on a slow disk, and a server that
    wrote each one on its event loop would stall every request behind them. ``submit`` returns a future that is
    done once the record is on disk (the server holds a reply's last byte until then)."""

    def __init__(self, log: AuditLog):
        self.log = log
        self._queue: queue.SimpleQueue[tuple[dict[str, Any], Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def submit(self, fields: dict[str, Any]) -> Future:
        done: Future = Future()
        self._queue.put((fields, done))
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
        return done

    def _run(self) -> None:
        while True:
            pending = [self._queue.get()]
            while True:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                outcomes = [(done, record, None) for (_, done), record in
                            zip(pending, self.log.append_many([fields for fields, _ in pending]))]
            except Exception as err:  # noqa: BLE001 - each waiter learns of it; the thread writes on
                outcomes = [(done, None, err) for _, done in pending]
            for done, record, err in outcomes:
                if not done.set_running_or_notify_cancel():  # a waiter cancelled (its client gone) wants no answer
                    continue
                if err is not None:
                    done.set_exception(err)
                else:
                    done.set_result(record)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    files: int
    problem: str = ""  # "FILE:LINE: what is wrong"
    missing: bool = False  # no log at all: neither records nor head


def verify(log: AuditLog) -> Verdict:
    """Walk the chain across files, then hold the head against its end; the first thing that does not hold is
    named by file and line."""
    files = log.files()
    chain = _walk(log, files)
    if isinstance(chain, Verdict):
        return chain
    seq, last_hash, count = chain
    problem = _check_head(log, seq, last_hash)
    if problem is None and count == 0:
        return Verdict(False, 0, len(files), f"no audit log at {log.path}: nothing has been recorded yet, or it "
                                             "was deleted", missing=True)
    return Verdict(problem is None, count, len(files), problem or "")


def _walk(log: AuditLog, files: list[Path]) -> tuple[int, str, int] | Verdict:
    """``(last seq, last hash, records)`` of an unbroken chain, or the Verdict that names where it breaks."""
    prev, seq, count = GENESIS, 0, 0
    for path in files:
        lines = path.read_bytes().split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for lineno, line in enumerate(lines, 1):
            record, problem = _link(log.key, line, seq, prev)
            if problem:
                return Verdict(False, count, len(files), f"{path.name}:{lineno}: {problem}")
            prev, seq, count = record["hash"], int(record["seq"]), count + 1
    return seq, prev, count


def _link(key: bytes | None, line: bytes, seq: int, prev: str) -> tuple[dict[str, Any], str]:
    """The record on ``line`` and what is wrong with it as the one after ``seq``/``prev`` ("" when nothing)."""
    try:
        record = _parse(line)
        r_seq, r_prev = int(record["seq"]), record["prev"]
        data = canonical(record)
    except (ValueError, KeyError, TypeError):
        return {}, "not an audit record (edited or corrupted)"
    if hashlib.sha256(data).hexdigest() != record["hash"]:
        return record, "contents do not match its hash (edited)"
    if key and not hmac.compare_digest(str(record.get("hmac", "")), _mac(key, data)):
        return record, "HMAC does not match (forged or edited)"
    if seq == 0 and (r_seq != 1 or r_prev != GENESIS):
        return record, f"the log starts at record {r_seq} (earlier records deleted)"
    if seq and r_seq != seq + 1:
        what = "deleted" if r_seq > seq + 1 else "inserted or reordered"
        return record, f"record {r_seq} follows record {seq} (records {what} before it)"
    if r_prev != prev:
        return record, "does not chain to the record before it (a record was inserted, deleted or edited before it)"
    return record, ""


def _check_head(log: AuditLog, seq: int, last_hash: str) -> str | None:
    """What is wrong between the head and a chain ending at ``seq``/``last_hash`` (seq 0: no records), or None."""
    name = log.head_path.name
    try:
        head = log.read_head()
    except ValueError:
        return f"{name}: not a head record (edited or corrupted)"
    if head is None:
        return None if seq == 0 else (f"{name} is missing but the log holds records up to {seq} (records deleted "
                                      "at the end, or the head removed)")
    head_seq, head_hash, head_hmac = head
    if log.key and not hmac.compare_digest(head_hmac, _head_mac(log.key, head_seq, head_hash)):
        return f"{name}: HMAC does not match (forged)"
    if seq == 0:
        return f"{log.path.name}: holds no records but record {head_seq} was written (the log was deleted)"
    if head_seq > seq:
        return f"{log.path.name}: ends at record {seq} but record {head_seq} was written (records deleted at the end)"
    if head_seq < seq:
        return (f"{name}: names record {head_seq} but the log runs on to record {seq} (an older head put back, or "
                "the writer stopped between record and head, which the next append repairs)")
    if head_hash != last_hash:
        return f"{log.path.name}: last record differs from the one written"
    return None


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
