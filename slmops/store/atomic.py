"""Crash-safe file writes: temp file in the target folder, fsync, rename, fsync the folder.

A process killed at any instant leaves either the old file or the new one, never a torn one; the temp files it
may leave carry the writer's pid so a later run can tell abandoned ones from live ones.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFile:
    """A temp file beside its future name: ``commit(target)`` fsyncs and renames it, ``discard()`` removes it.

    Used where the final name is only known after writing (content-addressed blobs)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=folder)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self, target: Path) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self._tmp, target)
        fsync_dir(target.parent)

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


@contextlib.contextmanager
def atomic_writer(target: Path) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``target`` atomically, on error it vanishes."""
    staged = StagedFile(target.parent)
    try:
        yield staged.file
        staged.commit(target)
    except BaseException:
        staged.discard()
        raise


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_writer(target) as f:
        f.write(data)


def remove_abandoned_temps(folder: Path) -> int:
    """Delete temp files whose writer process is gone; returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for p in folder.rglob(f"{TMP_PREFIX}*"):
        try:
            pid = int(p.name[len(TMP_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
