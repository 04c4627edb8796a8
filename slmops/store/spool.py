"""Appending a download to a file while hashing it, on two threads beside the one that receives.

On a 2-core machine a loopback pull is bound by CPU: receiving, sha256 and the copy into the page cache each take
a third of the time when done one after the other. hashlib and ``os.write`` release the GIL on large buffers, so
one thread per step lets them overlap with the receive loop (a 98 MB pull went from ~280 to ~165 ms).

The fsync before the rename must not wait for the whole file to reach the disk, so the writer starts the disk's
writeback every 8 MiB as it goes: ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues the dirty pages and returns
at once (where it exists: Linux), so the writer never blocks on the disk and the final fsync waits for the tail
only. A blocking ``fdatasync`` every 16 MiB did the same for the final fsync but stalled the writer each time.
Durability still comes from the caller's fsync before the rename; the early writeback only moves the work
forward.

Chunks keep their order on each thread, so the file always holds a prefix of the blob (a kill leaves something to
resume from) and the hash is of exactly the bytes written. The threads start with the second chunk: a blob that
arrives in one read (a config, a template) is hashed and written on the calling thread, without two threads
started and joined for it.

The hash is the slowest step (~1.9 GB/s), so when the last chunk arrives the writer is done and the hash is some
milliseconds behind. ``written``, called on the calling thread at that point, lets the caller use the file then
(a pull validates the GGUF header: pure Python, which would otherwise wait for the hash and then hold the GIL
against nothing).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import hashlib

WRITEBACK_EVERY = 8 << 20
DEPTH = 32  # chunks in flight per thread: with 1 MiB reads, at most ~64 MiB held
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait
_END = b""


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, or None where there is none (not Linux): then the final fsync does it all."""
    try:
        fn = ctypes.CDLL(None).sync_file_range  # the process's own symbols, libc's among them
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages to disk, without waiting for them. Best effort: a
    file system that refuses it leaves the work to the fsync that follows."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # offset 0, length 0: the whole file


class _Worker(threading.Thread):
    def __init__(self, step: Callable[[bytes], None], name: str):
        super().__init__(name=name, daemon=True)
        self.step = step
        self.queue: queue.Queue[bytes] = queue.Queue(DEPTH)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (chunk := self.queue.get()) is not _END:
            if self.error is None:
                try:
                    self.step(chunk)
                except BaseException as err:  # handed to the receiving thread, which raises it
                    self.error = err


class Spool:
    """``with Spool(fd, h) as spool: spool.put(chunk)…``; on a clean exit every chunk is hashed into ``h`` and
    written to ``fd``, its writeback started; the caller fsyncs before it renames the file (one fsync, where the
    file is made durable whether or not this spool wrote all of it). An error of either thread is raised by the
    next ``put`` or by the exit. ``written`` is called on a clean exit once every chunk is written, perhaps before
    all are hashed."""

    def __init__(self, fd: int, h: hashlib._Hash, written: Callable[[], None] | None = None):
        self._fd, self._h, self._written = fd, h, written
        self._unflushed = 0
        self._first: bytes | None = None  # held until a second chunk starts the threads, or the exit
        self._started = False
        self._workers = (_Worker(h.update, "slmops-hash"), _Worker(self._write, "slmops-write"))

    def _write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]
        self._unflushed += len(chunk)
        if self._unflushed >= WRITEBACK_EVERY:
            start_writeback(self._fd)
            self._unflushed = 0

    def __enter__(self) -> "Spool":
        return self

    def put(self, chunk: bytes) -> None:
        if not chunk:
            return
        if not self._started:
            if self._first is None:
                self._first = chunk
                return
            self._started = True
            for w in self._workers:
                w.start()
                w.queue.put(self._first)
            self._first = None
        self._raise()
        for w in self._workers:
            w.queue.put(chunk)

    def _raise(self) -> None:
        for w in self._workers:
            if w.error is not None:
                raise w.error

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._started:  # at most one chunk, held; dropped if an error ends the spool (a shorter prefix)
            if exc_type is None and self._first is not None:
                self._h.update(self._first)
                self._write(self._first)
            if exc_type is None and self._written is not None:
                self._written()
            return
        hasher, writer = self._workers
        for w in self._workers:
            w.queue.put(_END)
        writer.join()
        try:
            if exc_type is None and writer.error is None and self._written is not None:
                self._written()
        finally:
            hasher.join()
        if exc_type is None:
            self._raise()
