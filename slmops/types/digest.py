"""Content digests: the only form accepted anywhere is ``sha256:<64 lowercase hex>``.

A digest names a file in the blob store, so anything looser (other algorithms, upper case, path separators,
``..``) would be a path-traversal hole (the CVE-2024-37032 class); :meth:`Digest.parse` is the single gate.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import BinaryIO

from slmops.types.errors import InvalidDigest

_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")


@dataclass(frozen=True, order=True)
class Digest:
    hex: str

    @classmethod
    def parse(cls, text: str) -> "Digest":
        """Accept ``sha256:<hex>`` (wire form) or ``sha256-<hex>`` (file-name form)."""
        m = _DIGEST.fullmatch(text) if isinstance(text, str) else None
        if not m:
            shown = text if isinstance(text, str) and len(text) <= 80 else "<invalid>"
            raise InvalidDigest(f'invalid digest "{shown}": expected sha256:<64 lowercase hex digits>')
        return cls(m.group(1))

    @classmethod
    def of_bytes(cls, data: bytes) -> "Digest":
        return cls(hashlib.sha256(data).hexdigest())

    @classmethod
    def of_file(cls, f: BinaryIO) -> "Digest":
        return cls(hashlib.file_digest(f, "sha256").hexdigest())

    @property
    def filename(self) -> str:
        return f"sha256-{self.hex}"

    def __str__(self) -> str:
        return f"sha256:{self.hex}"
