"""The pull's spool: chunks hashed and written on their own threads, in order, and a failing write surfaces."""

import hashlib
import os

import pytest

from slmops.store.spool import SYNC_EVERY, Spool


def test_spool_writes_and_hashes_every_chunk_in_order(tmp_path):
    chunks = [os.urandom(n) for n in (1, 65536, 3 << 20, 7, 1 << 20)] * 5  # past SYNC_EVERY: periodic syncs run
    assert sum(map(len, chunks)) > SYNC_EVERY
    path = tmp_path / "blob"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, b"head")
    h = hashlib.sha256(b"head")
    with Spool(fd, h) as spool:
        for c in chunks:
            spool.put(c)
    os.close(fd)
    data = b"head" + b"".join(chunks)
    assert path.read_bytes() == data
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_failing_write_is_raised_and_nothing_after_it_is_written(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # every write fails with EBADF
    with pytest.raises(OSError), Spool(fd, hashlib.sha256()) as spool:
        for _ in range(100):
            spool.put(b"x" * 1024)
    os.close(fd)
    assert path.read_bytes() == b""


def test_an_error_of_the_receiving_side_stops_the_threads_and_is_not_swallowed(tmp_path):
    fd = os.open(tmp_path / "blob", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(ConnectionResetError), Spool(fd, hashlib.sha256()) as spool:
        spool.put(b"abc")
        raise ConnectionResetError
    assert all(not w.is_alive() for w in spool._workers)
    os.close(fd)
