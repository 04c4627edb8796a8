"""GGUF validation and metadata, done before llama.cpp ever sees a file.

llama.cpp trusts the header of what it loads; a truncated or crafted file (absurd counts, offsets past the end)
has crashed it before (CVE-2025-0315/0317 class). Here such a file becomes :class:`InvalidModelFile`. The header
is read by :mod:`slmops.store.gguf_scan`, whose work is bounded by the bytes present and fixed caps, not by the
counts a file claims.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.store.atomic import write_bytes
from slmops.store.sealed import plain_file, seal_bytes, unseal_bytes
from slmops.types.errors import IntegrityError, InvalidModelFile


@dataclass
class GGUFInfo:
    architecture: str
    file_type: str
    parameter_count: int
    context_length: int | None
    chat_template: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def pooling(self) -> int | None:
        """The pooling the model declares (embedding models do); ``None`` for generative models."""
        value = self.metadata.get(f"{self.architecture}.pooling_type")
        return int(value) if value is not None else None

    @property
    def embedding_only(self) -> bool:
        return self.pooling is not None

    @property
    def parameter_size(self) -> str:
        """Ollama's human form: 135M, 1.7B."""
        n = self.parameter_count
        for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= div:
                return f"{n / div:.1f}".rstrip("0").rstrip(".") + unit
        return str(n)


def _identity(path: Path, st: os.stat_result) -> str:
    """ctime too: ``touch -r`` can put an edited file's mtime back, but nothing but the kernel sets ctime."""
    return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def inspect_gguf(path: Path, cache_dir: Path | None = None, key: bytes | None = None,
                 scanned: GGUFInfo | None = None) -> GGUFInfo:
    """Validate ``path`` fully (header, metadata, every tensor inside the file) and return its metadata.

    A scan walks the tokenizer arrays (tens of milliseconds for a small model, more for big vocabularies), so with
    ``cache_dir`` the result is kept under the file's identity (device, inode, size, mtime, ctime): a changed file
    is validated again, an unchanged one loads fast.
    A sealed file (``key`` opens it) is keyed by the sealed file's identity, so a hit decrypts nothing.
    ``scanned``: what :func:`scan_info` found in these same bytes before they were moved to ``path`` (a pull scans
    while the hash catches up); it is recorded, not scanned again.
    """
    try:
        st = path.stat()
    except OSError:
        raise InvalidModelFile("model file is missing or unreadable") from None
    ident = _identity(path, st)
    entry = cache_dir / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json") if cache_dir else None
    if entry is not None:
        try:
            raw = entry.read_bytes()
            cached = json.loads(unseal_bytes(key, raw) if key is not None else raw)
            if cached.get("identity") == ident:
                return GGUFInfo(**cached["info"])
        except (OSError, ValueError, TypeError, KeyError, IntegrityError):
            pass
    if scanned is not None:
        info = scanned
    else:
        with plain_file(path, key, "model") as plain:
            info = scan_info(plain)
    if entry is not None:
        with contextlib.suppress(OSError, TypeError, ValueError):
            data = json.dumps({"identity": ident, "info": asdict(info)}, default=str).encode()
            write_bytes(entry, seal_bytes(key, data) if key is not None else data)  # metadata is content too
    return info


def scan_info(path: Path) -> GGUFInfo:
    """A plain GGUF file's metadata, validated, with no cache."""
    # The scanner loads only where a header is read: the control plane has no gguf package.
    from slmops.store.gguf_scan import gguf_constants, scan_gguf

    LlamaFileType = gguf_constants().LlamaFileType

    header = scan_gguf(path)
    meta = header.metadata
    arch = meta.get("general.architecture") or "unknown"
    ftype = meta.get("general.file_type")
    try:
        ftype_name = LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
    except (TypeError, ValueError, OverflowError):  # a string, a list or inf where a number belongs; shown as it is
        ftype_name = str(ftype)
    return GGUFInfo(
        architecture=str(arch),
        file_type=ftype_name,
        parameter_count=header.parameter_count,
        context_length=meta.get(f"{arch}.context_length"),
        chat_template=meta.get("tokenizer.chat_template"),
        metadata={k: v for k, v in meta.items() if not k.startswith(("GGUF.", "tokenizer.ggml."))},
    )
