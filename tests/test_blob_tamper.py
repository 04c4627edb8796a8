"""A blob changed in place with its mtime put back (``dd conv=notrunc`` then ``touch -r``) must not load: the
verified-hash cache keys on the inode's change time too, which no user can set, and a remembered signature never
vouches for blobs whose verified-marker is stale."""

import os
import time

import pytest

from test_signing import keypair
from slmops.security import signing
from slmops.security.signing import TrustPolicy
from slmops.store import manifests as mt
from slmops.store.blobs import BlobStore
from slmops.store.manifests import Layer
from slmops.store.store import Store
from slmops.types.errors import IntegrityError, UntrustedModel
from slmops.types.name import ModelName

KEY = bytes.fromhex("5e" * 32)
NAME = ModelName.parse("tampered:1b")


def flip_byte_keeping_times(path, offset: int) -> None:
    """What `dd conv=notrunc` and `touch -r` do: same inode, size, atime and mtime; other content."""
    st = os.stat(path)
    time.sleep(0.02)  # a later change time, even where the file system's clock is coarse
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([old[0] ^ 0x01]), offset)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "sealed"])
def test_a_blob_changed_in_place_with_its_mtime_restored_is_caught(tmp_path, key):
    blobs = BlobStore(tmp_path / "blobs", key)
    digest, _ = blobs.put_bytes(os.urandom(3 * 4096))
    cache = tmp_path / "verified"
    blobs.verify(digest, cache)
    assert (cache / digest.hex).is_file()
    blobs.verify(digest, cache)  # remembered
    flip_byte_keeping_times(blobs.path(digest), 100)
    with pytest.raises(IntegrityError, match="corrupt|cannot be decrypted"):
        blobs.verify(digest, cache)


def _signed_model(tmp_path):
    priv, pub = keypair(tmp_path, "release")
    store = Store(tmp_path / "models", trust=TrustPolicy([pub]))
    with store.writing():
        digest, size = store.blobs.put_bytes(b"GGUF" + os.urandom(64 * 1024))
        model = Layer(mediaType=mt.MODEL, digest=str(digest), size=size)
        config = store.put_json_layer(mt.CONFIG_MEDIA_TYPE, {"model_format": "gguf"})
        store.write_manifest(NAME, [model], config)
    signing.sign(store, NAME, priv)
    return store, pub, digest


def test_a_signed_model_with_a_blob_changed_in_place_does_not_load(tmp_path):
    store, pub, digest = _signed_model(tmp_path)
    store.verify(NAME)  # the signature checked and remembered, the blobs' hashes too
    store.verify(NAME)
    flip_byte_keeping_times(store.blob_path(digest), 5000)
    with pytest.raises(IntegrityError, match="corrupt") as err:
        store.verify(NAME)
    assert not isinstance(err.value, UntrustedModel)


def test_a_remembered_signature_does_not_vouch_for_changed_blobs(tmp_path):
    store, pub, digest = _signed_model(tmp_path)
    assert signing.verify(store, NAME, [pub]) == pub  # remembered from here on
    flip_byte_keeping_times(store.blob_path(digest), 5000)
    with pytest.raises(IntegrityError, match="corrupt"):
        signing.verify(store, NAME, [pub])


def test_checking_a_signature_leaves_the_blobs_verified_markers_valid(tmp_path):
    """The signed view links to the blobs without touching their inodes, so checking a signature does not make
    the next load hash every blob again."""
    store, pub, digest = _signed_model(tmp_path)
    store.verify_blobs(NAME)
    before = os.stat(store.blob_path(digest)).st_ctime_ns
    signing.verify(store, NAME, [pub])
    assert os.stat(store.blob_path(digest)).st_ctime_ns == before
