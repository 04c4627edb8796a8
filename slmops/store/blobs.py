"""Content-addressed blob store: ``blobs/sha256-<hex>``, written only after the content hashes right.

Blobs are shared between models; a blob is complete the moment it has its final name, because it gets that name
by an atomic rename after its digest was checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, Callable

from slmops.store.atomic import StagedFile, atomic_writer
from slmops.types.digest import Digest
from slmops.types.errors import IntegrityError

CHUNK = 1 << 20
Progress = Callable[[int], None]


class BlobStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, digest: Digest) -> Path:
        return self.root / digest.filename

    def has(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def put_bytes(self, data: bytes) -> tuple[Digest, int]:
        digest = Digest.of_bytes(data)
        if not self.has(digest):
            with atomic_writer(self.path(digest)) as f:
                f.write(data)
        return digest, len(data)

    def put_stream(
        self, src: BinaryIO, expected: Digest | None = None, progress: Progress | None = None, what: str = "blob"
    ) -> tuple[Digest, int]:
        """Copy ``src`` in, hashing as it goes; a digest other than ``expected`` stores nothing."""
        if expected is not None and self.has(expected):
            size = self.path(expected).stat().st_size
            if progress:
                progress(size)
            return expected, size
        h = hashlib.sha256()
        size = 0
        staged = StagedFile(self.root)
        try:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                staged.file.write(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
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
        """Check a stored blob still hashes to its name. The result is remembered by file identity (inode, size,
        mtime), so a model loads fast until its file changes; then it is hashed again."""
        path = self.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IntegrityError(f"{what} {str(digest)[:19]} is missing from the store; pull or create the model "
                                 "again") from None
        identity = f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
        marker = cache / digest.hex
        try:
            if marker.read_text() == identity:
                return
        except (FileNotFoundError, OSError):
            pass
        with open(path, "rb") as f:
            actual = Digest.of_file(f)
        if actual != digest:
            raise IntegrityError(f"{what} {str(digest)[:19]} is corrupt: its content no longer matches its digest; "
                                 "remove the model and pull or create it again")
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_writer(marker) as out:
            out.write(identity.encode())

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
