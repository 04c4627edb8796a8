"""The sealed-blob format on its own: round trips, and every way of damaging a file fails loudly."""

import base64
import io
import os

import pytest

from slmops.store.blobs import BlobStore
from slmops.store.sealed import CHUNK, MAGIC, Sealer, is_sealed, parse_key, plain_size, unseal
from slmops.types.digest import Digest
from slmops.types.errors import ConfigError, IntegrityError

KEY = bytes(range(32))


def seal(data: bytes, key: bytes = KEY, pieces: int = 3) -> bytes:
    out = io.BytesIO()
    s = Sealer(key, out)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        s.write(data[i:i + step])
    s.finish()
    return out.getvalue()


def opened(blob: bytes, key: bytes = KEY) -> bytes:
    return b"".join(unseal(key, io.BytesIO(blob)))


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_round_trip_at_chunk_edges(size):
    data = os.urandom(size)
    blob = seal(data)
    assert is_sealed(io.BytesIO(blob)) and blob.startswith(MAGIC)
    assert len(blob) == 16 + size + 16 * max(1, -(-size // CHUNK))  # header, data, one tag per chunk
    assert opened(blob) == data


def test_damage_is_detected():
    data = os.urandom(2 * CHUNK + 100)
    blob = seal(data)
    flipped = bytearray(blob)
    flipped[CHUNK // 2] ^= 1
    cut_at_boundary = blob[: 16 + (CHUNK + 16) * 2]  # whole chunks dropped from the end
    swapped = blob[:16] + blob[16 + CHUNK + 16: 16 + 2 * (CHUNK + 16)] + blob[16: 16 + CHUNK + 16] + \
        blob[16 + 2 * (CHUNK + 16):]
    other_file = seal(data)  # same content, other file nonce: chunks do not transplant
    transplanted = other_file[:16 + CHUNK + 16] + blob[16 + CHUNK + 16:]
    for bad in (bytes(flipped), cut_at_boundary, swapped, transplanted):
        with pytest.raises(IntegrityError, match="cannot be decrypted"):
            opened(bad)
    with pytest.raises(IntegrityError, match="wrong SLMOPS_STORE_KEY"):
        opened(blob, key=bytes(32))
    with pytest.raises(IntegrityError, match="not sealed"):
        opened(b"GGUF" + bytes(100))


@pytest.mark.parametrize("size", [0, 5, CHUNK, 2 * CHUNK + 3])
def test_plain_size_is_read_from_the_sealed_size(size):
    assert plain_size(len(seal(os.urandom(size)))) == size


def test_keys_are_hex_or_base64_of_32_bytes():
    assert parse_key(KEY.hex()) == KEY and parse_key(base64.b64encode(KEY).decode() + "\n") == KEY
    for bad in ("", "abc", "00" * 31, base64.b64encode(bytes(16)).decode(), "zz" * 32):
        with pytest.raises(ConfigError, match="openssl rand -hex 32"):
            parse_key(bad)


def test_blob_store_seals_new_blobs_and_reads_both_kinds(tmp_path):
    plain_store, sealed_store = BlobStore(tmp_path / "b"), BlobStore(tmp_path / "b", KEY)
    old, _ = plain_store.put_bytes(b"written before the key was set")
    data = os.urandom(CHUNK + 9)
    new, size = sealed_store.put_stream(io.BytesIO(data))
    assert size == len(data) and new == Digest.of_bytes(data)  # named by the plaintext's digest
    assert sealed_store.is_sealed(new) and not sealed_store.is_sealed(old)
    assert sealed_store.size(new) == len(data) and sealed_store.read_bytes(new) == data
    assert sealed_store.read_bytes(old) == b"written before the key was set"
    assert data[:64] not in sealed_store.path(new).read_bytes()
    sealed_store.verify(new, tmp_path / "verified")
    with sealed_store.plain(new) as p:
        assert str(p).startswith("/proc/self/fd/") and p.read_bytes() == data
    assert not p.exists()  # the memory file is gone with the block
    with sealed_store.plain(old) as p:
        assert p == sealed_store.path(old)
    with pytest.raises(IntegrityError, match="no store key is set; set SLMOPS_STORE_KEY"):
        plain_store.read_bytes(new)


def test_a_changed_sealed_blob_fails_verification_and_reseal_round_trips(tmp_path):
    blobs = BlobStore(tmp_path / "b", KEY)
    digest, _ = blobs.put_bytes(b"x" * 5000)
    assert blobs.reseal(digest, seal=False) and not blobs.is_sealed(digest)
    assert not blobs.reseal(digest, seal=False)
    assert blobs.reseal(digest, seal=True) and blobs.is_sealed(digest)
    assert blobs.read_bytes(digest) == b"x" * 5000
    raw = bytearray(blobs.path(digest).read_bytes())
    raw[40] ^= 1
    blobs.path(digest).write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="cannot be decrypted"):
        blobs.verify(digest, tmp_path / "verified")
    with pytest.raises(IntegrityError, match="cannot be decrypted"):
        blobs.reseal(digest, seal=False)
    assert bytes(raw) == blobs.path(digest).read_bytes()  # a failed rewrite leaves the blob as it was
