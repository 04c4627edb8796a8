"""Sealed blobs: AES-256-GCM in 1 MiB chunks, for encryption at rest (``SLMOPS_STORE_KEY``).

Layout: ``SLMSEAL1`` magic, an 8-byte random file nonce, then chunks of ciphertext+tag. Chunk ``i`` is sealed with
nonce = file nonce || i (32-bit big-endian) and associated data = magic || file nonce || i || last-flag, so chunks
cannot be reordered, dropped, swapped between files, or cut off at a chunk boundary without the tag failing.
Plaintext digests name the blobs, as in a plain store: a sealed store and a plain one hold the same manifests,
and a store may mix sealed and plain blobs (those written before the key was set).

Readers that need a file (llama.cpp, the GGUF parser, the signature hasher) get the plaintext in an anonymous
memory file (``memfd``, reached as ``/proc/self/fd/N``): it lives in RAM, vanishes with its last descriptor and is
never linked into a file system. llama.cpp maps it like any model file, so the plaintext is held once, not twice.
"""

from __future__ import annotations

import binascii
import contextlib
import io
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from slmops.store.atomic import TMP_PREFIX
from slmops.types.errors import ConfigError, IntegrityError

MAGIC = b"SLMSEAL1"
CHUNK = 1 << 20
TAG = 16
HEADER = len(MAGIC) + 8
KEY_BYTES = 32
KEY_HELP = "set SLMOPS_STORE_KEY (or SLMOPS_STORE_KEY_FILE) to the key the store was sealed with"
NO_KEY = f"is encrypted and no store key is set; {KEY_HELP}"


def parse_key(text: str, what: str = "SLMOPS_STORE_KEY") -> bytes:
    """A 256-bit key written as 64 hex digits (``openssl rand -hex 32``) or as base64."""
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 2 * KEY_BYTES else binascii.a2b_base64(text.encode())
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{what} must be a 256-bit key: 64 hex digits or base64 of 32 bytes; make one with "
                          "`openssl rand -hex 32`")
    return key


def plain_size(sealed_size: int) -> int:
    """The plaintext length of a sealed file of ``sealed_size`` bytes (every chunk is full but the last)."""
    body = sealed_size - HEADER
    chunks = max(1, -(-body // (CHUNK + TAG)))
    return body - chunks * TAG


def is_sealed(f: BinaryIO) -> bool:
    pos = f.tell()
    head = f.read(len(MAGIC))
    f.seek(pos)
    return head == MAGIC


def _aad(nonce: bytes, index: int, last: bool) -> bytes:
    return MAGIC + nonce + struct.pack(">I?", index, last)


class Sealer:
    """Write side: feed plaintext, get sealed bytes; ``finish()`` seals the last (possibly empty) chunk."""

    def __init__(self, key: bytes, out: BinaryIO):
        self.aead = AESGCM(key)
        self.nonce = os.urandom(8)
        self.out = out
        self.index = 0
        self.pending = bytearray()
        out.write(MAGIC + self.nonce)

    def write(self, data: bytes) -> None:
        self.pending += data
        while len(self.pending) > CHUNK:  # keep one chunk back: only finish() knows which chunk is last
            self._seal(bytes(self.pending[:CHUNK]), last=False)
            del self.pending[:CHUNK]

    def finish(self) -> None:
        self._seal(bytes(self.pending), last=True)
        self.pending.clear()

    def _seal(self, chunk: bytes, last: bool) -> None:
        nonce = self.nonce + struct.pack(">I", self.index)
        self.out.write(self.aead.encrypt(nonce, chunk, _aad(self.nonce, self.index, last)))
        self.index += 1


def unseal(key: bytes, f: BinaryIO, what: str = "blob") -> Iterator[bytes]:
    """Plaintext chunks of a sealed file; any tampering, truncation or wrong key raises IntegrityError."""
    aead = AESGCM(key)
    if f.read(len(MAGIC)) != MAGIC:
        raise IntegrityError(f"{what} is not sealed")
    nonce = f.read(8)
    index = 0
    current = f.read(CHUNK + TAG)
    while True:
        following = f.read(CHUNK + TAG)
        last = not following
        try:
            yield aead.decrypt(nonce + struct.pack(">I", index), current, _aad(nonce, index, last))
        except InvalidTag:
            raise IntegrityError(f"{what} cannot be decrypted: wrong SLMOPS_STORE_KEY, or the file was changed or "
                                 "cut short") from None
        if last:
            return
        current, index = following, index + 1


def opens(key: bytes, f: BinaryIO) -> bool:
    """Whether a sealed file's first chunk authenticates under ``key``: a wrong key shows in one chunk, without
    reading the whole file (a change further in is found when the blob is read or verified)."""
    chunks = unseal(key, f)
    try:
        next(chunks)
    except (IntegrityError, ValueError):  # ValueError: a header cut short leaves no valid nonce
        return False
    finally:
        chunks.close()
    return True


def seal_bytes(key: bytes, data: bytes) -> bytes:
    out = io.BytesIO()
    sealer = Sealer(key, out)
    sealer.write(data)
    sealer.finish()
    return out.getvalue()


def unseal_bytes(key: bytes, data: bytes, what: str = "blob") -> bytes:
    return b"".join(unseal(key, io.BytesIO(data), what))


class Passthrough:
    """The write side of a plain blob, so writers need not ask whether they seal."""

    def __init__(self, out: BinaryIO):
        self.write = out.write

    def finish(self) -> None:
        pass


def chunks(path: Path, key: bytes | None, what: str = "blob") -> Iterator[bytes]:
    """Plaintext of a stored file in pieces of at most ``CHUNK`` bytes, sealed or not."""
    with open(path, "rb") as f:
        if not is_sealed(f):
            while piece := f.read(CHUNK):
                yield piece
            return
        if key is None:
            raise IntegrityError(f"{what} {NO_KEY}")
        yield from unseal(key, f, what)


@contextlib.contextmanager
def plain_file(path: Path, key: bytes | None, what: str = "blob") -> Iterator[Path]:
    """A path whose content is the plaintext of ``path``: ``path`` itself when it is plain, else a memfd that is
    closed when the block ends (a mapping made from it, as llama.cpp's, stays valid after)."""
    with open(path, "rb") as f:
        sealed = is_sealed(f)
    if not sealed:
        yield path
        return
    fd = os.memfd_create("slmops-plain", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as out:
            for piece in chunks(path, key, what):
                out.write(piece)
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def plain_folder(files: Mapping[str, Path], key: bytes | None, what: str = "model") -> Iterator[Path]:
    """A folder holding ``files`` (name -> blob) under their names, for runtimes that load a model from a folder
    (ONNX Runtime GenAI reads ``genai_config.json`` and finds each file beside it). The folder holds only symbolic
    links: to the blob itself when it is plain, to a memfd of its plaintext when it is sealed, so no plaintext
    reaches the disk. Gone when the block ends; what a runtime mapped from it stays valid."""
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slmops-folder-")))
        for name, blob in files.items():
            if "/" in name or name in ("", ".", ".."):
                raise IntegrityError(f"{what} names a file {name!r}, which is not a plain file name")
            target = stack.enter_context(plain_file(blob, key, f"{name} of {what}"))
            (folder / name).symlink_to(target)
        yield folder


@contextlib.contextmanager
def scratch(folder: Path, private: bool) -> Iterator[Path]:
    """A file for a tool to write a derived model into (llama.cpp's quantizer wants a path). ``private`` (a sealed
    store): a memfd, so the plaintext never reaches the disk; else a temp file in ``folder`` that a later run
    removes if this process dies first. Gone when the block ends."""
    if private:
        fd = os.memfd_create("slmops-scratch", os.MFD_CLOEXEC)
        try:
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".gguf", dir=folder)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
