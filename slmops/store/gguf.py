"""GGUF validation and metadata, done with the ``gguf`` package before llama.cpp ever sees a file.

llama.cpp trusts the header of what it loads; a truncated or crafted file (absurd counts, offsets past the end)
has crashed it before (CVE-2025-0315/0317 class). Here such a file becomes :class:`InvalidModelFile`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, LlamaFileType

from slmops.store.atomic import write_bytes
from slmops.store.sealed import plain_file, seal_bytes, unseal_bytes
from slmops.types.errors import IntegrityError, InvalidModelFile

GGUF_MAGIC = b"GGUF"
_MIN_KV_BYTES = 8 + 1 + 4  # key length, one-char key, value type
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset
_MAX_DIMS = 4


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


def _header(path: Path, size: int) -> None:
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise InvalidModelFile("not a GGUF file (bad magic); give a .gguf model file")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise InvalidModelFile(f"unsupported GGUF version {version}; re-export the model as GGUF v3")
    if n_kv * _MIN_KV_BYTES > size or n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise InvalidModelFile(
            f"GGUF header claims {n_tensors} tensors and {n_kv} metadata keys, more than a {size}-byte file can hold"
        )


def _value(reader: GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        if len(f.data) > 64:
            return f"[{len(f.data)} items]"
        return [_plain(v) for v in f.contents()]
    return _plain(f.contents())


def _plain(v: Any) -> Any:
    """numpy scalars to Python values, so metadata serialises to JSON."""
    return v.item() if hasattr(v, "item") else v


def _identity(path: Path, st: os.stat_result) -> str:
    return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


def inspect_gguf(path: Path, cache_dir: Path | None = None, key: bytes | None = None) -> GGUFInfo:
    """Validate ``path`` fully (header, metadata, every tensor inside the file) and return its metadata.

    Parsing a GGUF's metadata takes seconds (the tokenizer arrays), so with ``cache_dir`` the result is kept under
    the file's identity (device, inode, size, mtime): a changed file is validated again, an unchanged one loads fast.
    A sealed file (``key`` opens it) is keyed by the sealed file's identity, so a hit decrypts nothing.
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
    with plain_file(path, key, "model") as plain:
        info = _inspect(plain, plain.stat().st_size)
    if entry is not None:
        with contextlib.suppress(OSError, TypeError, ValueError):
            data = json.dumps({"identity": ident, "info": asdict(info)}, default=str).encode()
            write_bytes(entry, seal_bytes(key, data) if key is not None else data)  # metadata is content too
    return info


def _inspect(path: Path, size: int) -> GGUFInfo:
    _header(path, size)
    try:
        reader = GGUFReader(path, "r")
    except Exception:  # the gguf package signals every malformation with a different builtin error
        raise InvalidModelFile("corrupt or truncated GGUF file; check the file or export it again") from None
    total = 0
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        if not 0 < len(dims) <= _MAX_DIMS or any(d <= 0 for d in dims):
            raise InvalidModelFile(f'GGUF tensor "{t.name}" has invalid dimensions {dims}')
        if t.data_offset < reader.data_offset or t.data_offset + t.n_bytes > size:
            raise InvalidModelFile(f'GGUF tensor "{t.name}" lies outside the file; the file is truncated or crafted')
        total += int(np.prod(dims, dtype=np.float64))
    arch = _value(reader, "general.architecture") or "unknown"
    ftype = _value(reader, "general.file_type")
    try:
        ftype_name = LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
    except ValueError:
        ftype_name = str(ftype)
    meta = {}
    for key in reader.fields:
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml."):
            continue
        meta[key] = _value(reader, key)
    return GGUFInfo(
        architecture=str(arch),
        file_type=ftype_name,
        parameter_count=total,
        context_length=_value(reader, f"{arch}.context_length"),
        chat_template=_value(reader, "tokenizer.chat_template"),
        metadata=meta,
    )
