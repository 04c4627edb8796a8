"""The device's feedback log: rated conversations, one JSONL file per release under ``SLMOPS_HOME/feedback``.

    feedback/<release>.jsonl   one :class:`~slmops.api.feedback.FeedbackRecord` a line (the release quoted to a
                               file name: smol:1.2.0 -> smol%3A1.2.0.jsonl)
    feedback/<release>.sent    {"ino", "offset"}: the file's first ``offset`` bytes reached the control plane
    feedback/.lock             held by every change: the server, ``slmops feedback`` and the agent are separate
                               processes

An append is one ``write`` of a whole line (``O_APPEND``) and an ``fsync`` before it is acknowledged. A crash in the
middle of one can leave a torn last line, without its newline: readers skip it, and the next append cuts it off
before writing, so no half record is ever read, exported or sent. Each file is bounded (``max_bytes``); an append
past it is refused with what to do. On a fleet device the agent drops what the control plane has (:meth:`compact`),
so the text stays on the device no longer than it must.

The upload cursor names the file's inode: a file cleared or compacted meanwhile is a new inode, so a stale cursor
reads as "nothing sent" (records are sent again, and the control plane stores each id once), never as "sent".
Everything opting in or out is decided by the callers (:mod:`slmops.fleet.privacy`); this module only keeps records.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pydantic import ValidationError

from slmops.api.feedback import FeedbackLine, FeedbackMessage, FeedbackRecord
from slmops.store.atomic import atomic_writer, fsync_dir, write_bytes
from slmops.types.errors import Busy, Conflict, TooLarge

log = logging.getLogger("slmops.feedback")
MAX_BYTES = 64 << 20  # one release's file
MAX_RECORD = 256 << 10  # one record's line
SUFFIX, SENT = ".jsonl", ".sent"
_CHUNK = 64 << 10


@dataclass(frozen=True)
class Cursor:
    """Where an upload batch ends: the file's inode and the byte after the batch's last line."""

    ino: int
    offset: int


def file_stem(release: str) -> str:
    """A file name for ``release``: quoted (no ``/``, no leading dot), shortened with a hash when too long."""
    stem = quote(release, safe="")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    if len(stem) > 200:
        stem = f"{stem[:150]}~{hashlib.sha256(release.encode()).hexdigest()[:16]}"
    return stem


class FeedbackLog:
    def __init__(self, root: Path, max_bytes: int = MAX_BYTES, clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.clock = clock

    def path(self, release: str) -> Path:
        return self.root / (file_stem(release) + SUFFIX)

    def _sent_path(self, data: Path) -> Path:
        return data.with_suffix(SENT)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- writing ---------------------------------------------------------------------------------------------
    def new_record(self, release: str, model: str, messages: Sequence[FeedbackMessage], rating: int,
                   comment: str | None = None, tags: Sequence[str] = ()) -> FeedbackRecord:
        return FeedbackRecord(id=f"fb_{secrets.token_hex(12)}", at=self.clock(), release=release, model=model,
                              messages=list(messages), rating=rating, comment=comment, tags=list(tags))

    def append(self, record: FeedbackRecord) -> None:
        """Add ``record`` durably (on disk when this returns); Conflict when its release's file is full."""
        line = record.model_dump_json().encode() + b"\n"
        if len(line) > MAX_RECORD:
            raise TooLarge(f"a feedback record is at most {MAX_RECORD // 1024} KiB of JSON; rate a shorter "
                           "conversation (its last turns)")
        target = self.path(record.release)
        with self._locked():
            created = not target.exists()
            try:
                fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    size = _drop_torn_tail(fd)
                    if size + len(line) > self.max_bytes:
                        raise Conflict(self._full(record.release))
                    _write_all(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if created:
                    fsync_dir(self.root)
            except OSError as err:
                raise Busy(f"cannot write the feedback log {target} ({err.strerror or err}); free disk space or "
                           "fix its permissions") from None

    def _full(self, release: str) -> str:
        return (f"the feedback log of {release} is full ({self.max_bytes >> 20} MiB): export it with `slmops "
                f"feedback export --release {release} > feedback.jsonl`, then `slmops feedback clear --release "
                f"{release}`")

    def clear(self, release: str) -> int:
        """Delete ``release``'s records (sent or not); returns how many there were."""
        target = self.path(release)
        with self._locked():
            try:
                with open(target, "rb") as f:
                    count = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(_CHUNK), b""))
            except FileNotFoundError:
                return 0
            # the cursor goes first: a crash between the two leaves records with no cursor (sent again), never a
            # cursor that a new file on a reused inode could take for its own
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._sent_path(target))
            os.unlink(target)
            fsync_dir(self.root)
            return count

    # -- reading ---------------------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))

    def records(self, release: str | None = None, since: float | None = None) -> Iterator[FeedbackRecord]:
        """Every whole record, file by file (releases in file-name order), oldest first within a file."""
        for path in [self.path(release)] if release is not None else self.files():
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue
            with f:
                for line in f:
                    record = _parse(line, path)
                    if record is not None and (since is None or record.at >= since):
                        yield record

    # -- uploading (fleet devices) ---------------------------------------------------------------------------
    def pending(self, path: Path, max_records: int, max_bytes: int) -> tuple[list[FeedbackRecord], Cursor | None]:
        """Records of the file at ``path`` not yet sent, oldest first, up to the limits (at least one), and the
        cursor to :meth:`mark_sent` once the control plane has them; ``([], None)`` when nothing is pending."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return [], None
        with f:
            ino = os.fstat(f.fileno()).st_ino
            offset = self._sent_offset(path, ino)
            f.seek(offset)
            out: list[FeedbackRecord] = []
            end, size = offset, 0
            for line in f:
                if not line.endswith(b"\n") or (out and (len(out) >= max_records or size + len(line) > max_bytes)):
                    break
                end, size = end + len(line), size + len(line)
                record = _parse(line, path)
                if record is not None:
                    out.append(record)
        return out, (Cursor(ino, end) if end > offset else None)

    def mark_sent(self, path: Path, cursor: Cursor) -> None:
        """Note that the file's bytes before ``cursor`` reached the control plane; ignored when the file was
        replaced since (cleared or compacted) or a later cursor was noted already."""
        with self._locked():
            try:
                ino = os.stat(path).st_ino
            except FileNotFoundError:
                return
            if ino == cursor.ino and cursor.offset > self._sent_offset(path, ino):
                write_bytes(self._sent_path(path), json.dumps({"ino": ino, "offset": cursor.offset}).encode())

    def compact(self, path: Path) -> None:
        """Drop the records the control plane has: the unsent rest (often nothing) becomes the new file."""
        with self._locked():
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                return
            with f:
                st = os.fstat(f.fileno())
                sent = self._sent_offset(path, st.st_ino)
                if sent == 0:
                    return
                if sent >= st.st_size:
                    os.unlink(self._sent_path(path))  # the cursor first, as in clear()
                    os.unlink(path)
                    fsync_dir(self.root)
                    return
                f.seek(sent)
                with atomic_writer(path) as out:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)  # a temp file is 0600, as the log is
            write_bytes(self._sent_path(path), json.dumps({"ino": os.stat(path).st_ino, "offset": 0}).encode())

    def _sent_offset(self, path: Path, ino: int) -> int:
        try:
            data = json.loads(self._sent_path(path).read_bytes())
            if data.get("ino") == ino and isinstance(data.get("offset"), int):
                return max(0, data["offset"])
        except (OSError, ValueError, AttributeError):
            pass
        return 0


def export_line(record: FeedbackRecord, **where: str | None) -> bytes:
    """A JSONL line of an export (``where``: ``device_id``, ``hardware_class`` on the control plane)."""
    line = FeedbackLine(messages=record.messages, rating=record.rating, release=record.release, at=record.at,
                        id=record.id, model=record.model, comment=record.comment, tags=record.tags or None, **where)
    return line.model_dump_json(exclude_none=True).encode() + b"\n"


def _parse(line: bytes, path: Path) -> FeedbackRecord | None:
    if not line.endswith(b"\n"):
        return None  # a torn last line: the write that made it never finished
    try:
        return FeedbackRecord.model_validate_json(line)
    except ValidationError:
        log.warning("skipping a line of %s that is not a feedback record", path)
        return None


def _drop_torn_tail(fd: int) -> int:
    """Cut a last line left without its newline (a crash mid-append); returns the file's size after."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    else:
        keep = 0
    os.ftruncate(fd, keep)
    return keep


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]
