"""Content-addressed blob store: ``blobs/sha256-<hex>``, written only after the content hashes right.

Blobs are shared between models; a blob is complete the moment it has its final name, because it gets that name
by an atomic rename after its digest was checked. With a store key, new blobs are sealed (:mod:`sealed`) and still
named by the digest of their plaintext; every reader goes through :meth:`BlobStore.chunks` or
:meth:`BlobStore.plain`, which open sealed and plain blobs alike.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from slmops.store import sealed
from slmops.store.atomic import StagedFile, atomic_writer
from slmops.types.digest import Digest
from slmops.types.errors import ConfigError, IntegrityError

CHUNK = 1 << 20
Progress = Callable[[int], None]


class BlobStore:
    def __init__(self, root: Path, key: bytes | None = None):
        """``key``: seal new blobs with AES-256-GCM (encryption at rest); ``None`` writes them plain."""
        self.root = root
        self.key = key

    def path(self, digest: Digest) -> Path:
        return self.root / digest.filename

    def has(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def is_sealed(self, digest: Digest) -> bool:
        with open(self.path(digest), "rb") as f:
            return sealed.is_sealed(f)

    def opens(self, digest: Digest) -> bool:
        """A plain blob, or a sealed one whose first chunk opens with the store key."""
        with open(self.path(digest), "rb") as f:
            return not sealed.is_sealed(f) or (self.key is not None and sealed.opens(self.key, f))

    def size(self, digest: Digest) -> int:
        """The plaintext size, which a manifest records."""
        stored = self.path(digest).stat().st_size
        return sealed.plain_size(stored) if self.is_sealed(digest) else stored

    def chunks(self, digest: Digest, what: str = "blob") -> Iterator[bytes]:
        return sealed.chunks(self.path(digest), self.key, what)

    def read_bytes(self, digest: Digest, what: str = "blob") -> bytes:
        return b"".join(self.chunks(digest, what))

    def plain(self, digest: Digest, what: str = "blob") -> contextlib.AbstractContextManager[Path]:
        """A path to the plaintext for readers that need a file; see :func:`sealed.plain_file`."""
        return sealed.plain_file(self.path(digest), self.key, what)

    def _sink(self, out: BinaryIO, seal: bool | None = None) -> sealed.Sealer | sealed.Passthrough:
        """Sealed with the store key when there is one (or when ``seal`` says so), else plain."""
        if seal is None:
            seal = self.key is not None
        if seal and self.key is None:
            raise ConfigError(f"sealing needs a store key; {sealed.KEY_HELP}")
        return sealed.Sealer(self.key, out) if seal else sealed.Passthrough(out)

    def put_bytes(self, data: bytes) -> tuple[Digest, int]:
        digest = Digest.of_bytes(data)
        if not self.has(digest):
            with atomic_writer(self.path(digest)) as f:
                sink = self._sink(f)
                sink.write(data)
                sink.finish()
        return digest, len(data)

    def put_stream(
        self, src: BinaryIO, expected: Digest | None = None, progress: Progress | None = None, what: str = "blob"
    ) -> tuple[Digest, int]:
        """Copy ``src`` in, hashing as it goes; a digest other than ``expected`` stores nothing."""
        if expected is not None and self.has(expected):
            size = self.size(expected)
            if progress:
                progress(size)
            return expected, size
        h = hashlib.sha256()
        size = 0
        staged = StagedFile(self.root)
        try:
            sink = self._sink(staged.file)
            while chunk := src.read(CHUNK):
                h.update(chunk)
                sink.write(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
            sink.finish()
            digest = Digest(h.hexdigest())
            if expected is not None and digest != expected:
                raise IntegrityError(
                    f"digest mismatch for {what}: expected {expected}, got {digest}; nothing was stored"
                )
            staged.commit(self.path(digest))
        except BaseException:
            staged.discard()
            raise
        return digest, size

    def verify(self, digest: Digest, cache: Path, what: str = "blob") -> None:
        """Check a stored blob still hashes to its name. The result is remembered by file identity, so a model
        loads fast until its file changes; then it is hashed again. The identity includes the change time: size
        and mtime survive an in-place edit (``dd conv=notrunc`` then ``touch -r``), but every write and every
        ``utime`` moves ``st_ctime``, which no user can set back."""
        path = self.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IntegrityError(f"{what} {str(digest)[:19]} is missing from the store; pull or create the model "
                                 "again") from None
        identity = f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        marker = cache / digest.hex
        try:
            if marker.read_text() == identity:
                return
        except (FileNotFoundError, OSError):
            pass
        h = hashlib.sha256()
        for piece in self.chunks(digest, f"{what} {str(digest)[:19]}"):
            h.update(piece)
        if Digest(h.hexdigest()) != digest:
            raise IntegrityError(f"{what} {str(digest)[:19]} is corrupt: its content no longer matches its digest; "
                                 "remove the model and pull or create it again")
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_writer(marker) as out:
            out.write(identity.encode())

    def reseal(self, digest: Digest, seal: bool) -> bool:
        """Rewrite one blob sealed with the store key (``seal``) or plain; False when it already was so.
        The plaintext is checked against the digest on the way, so a damaged blob is never sealed in."""
        if self.is_sealed(digest) == seal:
            return False
        h = hashlib.sha256()
        with atomic_writer(self.path(digest)) as f:
            sink = self._sink(f, seal)
            for piece in self.chunks(digest):
                h.update(piece)
                sink.write(piece)
            if Digest(h.hexdigest()) != digest:
                raise IntegrityError(f"blob {str(digest)[:19]} is corrupt and was left as it was; remove the models "
                                     "that use it and pull or create them again")
            sink.finish()
        return True

    def digests(self) -> set[Digest]:
        out = set()
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith("sha256-"):
                    try:
                        out.add(Digest.parse(p.name))
                    except Exception:
                        continue
        return out

    def remove(self, digest: Digest) -> None:
        self.path(digest).unlink(missing_ok=True)
