"""A bounded, streaming reader of GGUF headers (v2/v3, little-endian), for files nobody has vouched for.

``gguf.GGUFReader`` builds a numpy view, a list entry and an index for every array element a header *claims*,
before checking that the bytes exist: one key claiming 2^40 strings made the server allocate until it died
(CVE-2025-0315 class), and a real 10-million-entry array took 90 s and 3.5 GB. Here every count and length is
checked against the bytes left before it is used, numeric arrays are skipped in one step, string arrays are walked
without building anything, and the work a file can ask for is capped (the ``_MAX_*`` constants below), so a
crafted file costs at most ~2 million constant-time steps (about half a second of one core) and tens of MiB, and a
real model tens of milliseconds (SmolLM2's 98k tokens and merges: ~15 ms; ``GGUFReader`` took 2-4 s).

That bound is why this runs in the calling thread rather than in a sandboxed subprocess: the server already scans
on a worker thread (``/api/create``) or in a runner process, a subprocess would cost more than the scan of a real
model, and a sealed store's plaintext is a memfd of this process that a child would have to be handed.

The file is read through ``mmap`` (only the header's pages are touched), as ``GGUFReader`` and llama.cpp do.
The format: magic, version u32, tensor count u64, key count u64; keys (u64 length + UTF-8) each with a value type
u32 and a value (arrays: item type u32, count u64, items; strings: u64 length + bytes); then per tensor a name,
n_dims u32, n_dims u64 dims, ggml type u32 and a u64 offset into the data section, which starts at the next
multiple of ``general.alignment``.
"""

from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from slmops.types.errors import InvalidModelFile


@functools.cache
def gguf_constants() -> ModuleType:
    """The ``gguf`` package's ``constants`` module (its enums and tables, standard library only), loaded without
    the package: ``import gguf`` also imports its reader, writer and numpy, ~150 ms here, which a fresh
    ``slmops pull`` or ``slmops create`` paid after the download for a 9 ms scan. Where gguf is imported already,
    its own module."""
    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    package = importlib.util.find_spec("gguf")  # found, not imported
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError("gguf is not installed; reinstall slmops")
    spec = importlib.util.spec_from_file_location(
        "slmops_gguf_constants", Path(next(iter(package.submodule_search_locations))) / "constants.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_gguf = gguf_constants()
GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUFValueType = \
    _gguf.GGML_QUANT_SIZES, _gguf.GGUF_DEFAULT_ALIGNMENT, _gguf.GGUFValueType

_MAGIC = b"GGUF"
_HEAD = struct.Struct("<4sIQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MIN_KV_BYTES = 8 + 1 + 4  # key length, one-char key, value type
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset
_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
_SIZES = {vtype: struct.calcsize("<" + code) for vtype, code in _SCALARS.items()}
_QUANT_SIZES = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}  # ggml type -> (block size, block bytes)

# Caps on what one file may make us do. Real models stay far below each; a file past one is refused (a long string
# value excepted, see _MAX_KEPT_BYTES).
_MAX_KEYS = 1 << 16  # real models carry under a hundred keys; each kept key costs a dict entry
_MAX_TENSORS = 1 << 16  # the largest models have a few thousand tensors (experts are merged into one tensor each)
_MAX_KEY_BYTES = 1 << 16  # keys are dotted identifiers of tens of bytes
_MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME (64) with its NUL: llama.cpp refuses longer tensor names
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_STRING_ITEMS = 1 << 21  # string-array items walked per file: vocab (<=262k) plus merges (<=~500k), with margin;
#                              each is a Python step (~0.2 us), so this bounds the scan to about half a second
_MAX_KEPT_BYTES = 16 << 20  # keys plus the string values kept; chat templates are ~100 KiB. A string that would
#                             pass this is shown as "[N bytes]" (as a long array is "[N items]"), not refused
_SHORT_ARRAY = 64  # arrays up to this length are kept as values; longer ones become "[N items]"


@dataclass
class GGUFHeader:
    """What a scan keeps: every key's value (short form, see ``_SHORT_ARRAY``), and totals over the tensors."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_count: int = 0
    parameter_count: int = 0
    data_offset: int = 0


def scan_gguf(path: Path) -> GGUFHeader:
    """Validate the header of the GGUF at ``path`` and every tensor's place in the file; see the module docstring."""
    try:
        f = open(path, "rb")
    except OSError:
        raise InvalidModelFile("model file is missing or unreadable") from None
    with f:
        if os.fstat(f.fileno()).st_size < _HEAD.size:
            return scan_gguf_buffer(f.read())
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # ValueError: the file shrank to nothing meanwhile
            raise InvalidModelFile("model file is missing or unreadable") from None
        with mm:
            return scan_gguf_buffer(mm)


def scan_gguf_buffer(buf: bytes | mmap.mmap) -> GGUFHeader:
    """:func:`scan_gguf` on bytes already in hand; raises :class:`InvalidModelFile` for any malformation."""
    size = len(buf)
    if size < _HEAD.size or buf[:4] != _MAGIC:
        raise InvalidModelFile("not a GGUF file (bad magic); give a .gguf model file")
    _, version, n_tensors, n_kv = _HEAD.unpack_from(buf, 0)
    if version not in (2, 3):
        raise InvalidModelFile(f"unsupported GGUF version {version}; re-export the model as GGUF v3")
    if n_kv * _MIN_KV_BYTES > size or n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise InvalidModelFile(
            f"GGUF header claims {n_tensors} tensors and {n_kv} metadata keys, more than a {size}-byte file can hold")
    if n_kv > _MAX_KEYS or n_tensors > _MAX_TENSORS:
        raise InvalidModelFile(f"GGUF header claims {n_tensors} tensors and {n_kv} metadata keys, more than the "
                               f"{_MAX_TENSORS} and {_MAX_KEYS} slmops reads; the file is crafted or not a model")
    scan = _Scan(buf, size)
    try:
        return scan.run(version, n_kv, n_tensors)
    except (struct.error, OverflowError):  # a read past the end inside the string walk, which checks once at its end
        raise scan.fail("runs past the end of the file; the file is truncated or crafted") from None


def _shown(text: str, limit: int = 80) -> str:
    """Text from the file, made safe for a one-line message: control characters replaced, length capped."""
    cut = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cut + ("..." if len(text) > limit else "")


class _Scan:
    """One pass over the header. ``pos`` only moves forward; each read first checks the bytes it needs are there.
    ``where`` names what is being read, raw from the file; :meth:`fail` makes it safe when a message needs it."""

    def __init__(self, buf: bytes | mmap.mmap, size: int):
        self.buf, self.size, self.pos = buf, size, _HEAD.size
        self.where = "header"
        self.vtype = 0  # the type of the last value read
        self.kept = 0  # bytes of keys and string values kept so far
        self.string_items = 0  # string-array items walked so far

    def fail(self, problem: str) -> InvalidModelFile:
        return InvalidModelFile(f"GGUF {_shown(self.where)} {problem}")

    def run(self, version: int, n_kv: int, n_tensors: int) -> GGUFHeader:
        header = GGUFHeader(version=version, tensor_count=n_tensors)
        for i in range(n_kv):
            self.where = f"metadata key {i}"
            key = self.key()
            self.where = f'metadata key "{key}"'
            if key in header.metadata:
                raise self.fail("appears twice; the file is corrupt")
            self.where = f'value of "{key}"'
            header.metadata[key] = self.value()
            if key == "general.alignment" and self.vtype != GGUFValueType.UINT32:
                raise self.fail("is not a uint32; the file is corrupt")  # llama.cpp would abort on it
        alignment = header.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise InvalidModelFile(f"GGUF general.alignment {alignment} is not a power of two; the file is corrupt")
        self.tensors(header, n_tensors, alignment)
        return header

    def need(self, n: int) -> int:
        """Claim the next ``n`` bytes and return where they start."""
        if n > self.size - self.pos:
            raise self.fail("runs past the end of the file; the file is truncated or crafted")
        start = self.pos
        self.pos += n
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.need(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.need(8))[0]

    def text(self, n: int) -> str:
        start = self.need(n)
        try:
            return self.buf[start:start + n].decode()
        except UnicodeDecodeError:
            raise self.fail("is not UTF-8; the file is corrupt") from None

    def key(self) -> str:
        n = self.u64()
        if n > _MAX_KEY_BYTES:
            raise self.fail(f"is {n} bytes long; the file is crafted or corrupt")
        if not self.keep(n):
            raise self.fail(f"would take metadata past {_MAX_KEPT_BYTES >> 20} MiB; the file is crafted")
        return self.text(n)

    def keep(self, n: int) -> bool:
        """Count ``n`` more bytes kept in memory, unless that would pass the budget."""
        if self.kept + n > _MAX_KEPT_BYTES:
            return False
        self.kept += n
        return True

    def value(self) -> Any:
        self.vtype = vtype = self.u32()
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(vtype)
        itype, count = self.u32(), self.u64()
        if itype == GGUFValueType.STRING:
            return self.strings(count)
        code = _SCALARS.get(itype)
        if code is None:  # nested arrays included: llama.cpp refuses them too
            raise self.fail(f"is an array of unsupported type {itype}; the file is corrupt")
        start = self.need(count * _SIZES[itype])  # skipped in one step, whatever its length
        if count > _SHORT_ARRAY:
            return f"[{count} items]"
        return list(struct.unpack_from(f"<{count}{code}", self.buf, start))

    def scalar(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        code = _SCALARS.get(vtype)
        if code is None:
            raise self.fail(f"has unknown type {vtype}; the file is corrupt")
        return struct.unpack_from("<" + code, self.buf, self.need(_SIZES[vtype]))[0]

    def string(self) -> str:
        n = self.u64()
        if not self.keep(n):
            self.need(n)
            return f"[{n} bytes]"
        return self.text(n)

    def strings(self, count: int) -> Any:
        self.string_items += count
        if self.string_items > _MAX_STRING_ITEMS:
            raise self.fail(f"claims {count} strings, more than the {_MAX_STRING_ITEMS} in arrays slmops reads "
                            "(real vocabularies hold under a million); the file is crafted")
        if count * 8 > self.size - self.pos:  # each item has at least its 8-byte length
            raise self.fail(f"claims {count} strings, more than the rest of the file holds; the file is crafted")
        if count <= _SHORT_ARRAY:
            return [self.string() for _ in range(count)]
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        for _ in range(count):  # the hot loop of a real vocabulary: offsets only, no objects
            pos += 8 + unpack(buf, pos)[0]
        self.need(pos - self.pos)
        return f"[{count} items]"

    def tensors(self, header: GGUFHeader, n_tensors: int, alignment: int) -> None:
        """Read the tensor infos, then check every tensor's bytes lie inside the file (the farthest end decides)."""
        names: set[str] = set()
        farthest, farthest_name = 0, ""
        for i in range(n_tensors):
            self.where = f"tensor {i} name"
            n = self.u64()
            if n > _MAX_NAME_BYTES:
                raise self.fail(f"is {n} bytes long, more than llama.cpp allows; the file is corrupt")
            name = self.text(n)
            self.where = f'tensor "{name}"'
            if name in names:
                raise self.fail("appears twice; the file is corrupt")
            names.add(name)
            n_dims = self.u32()
            if not 0 < n_dims <= _MAX_DIMS:
                raise self.fail(f"has {n_dims} dimensions; the file is corrupt")
            dims = list(struct.unpack_from(f"<{n_dims}Q", self.buf, self.need(8 * n_dims)))
            ggml_type, offset = self.u32(), self.u64()
            count = self.elements(dims)
            header.parameter_count += count
            end = offset + self.nbytes(dims, count, ggml_type)
            if end > farthest:
                farthest, farthest_name = end, name
        header.data_offset = -(-self.pos // alignment) * alignment
        if n_tensors and header.data_offset + farthest > self.size:
            self.where = f'tensor "{farthest_name}"'
            raise self.fail("lies outside the file; the file is truncated or crafted")

    def elements(self, dims: list[int]) -> int:
        count = 1
        for d in dims:
            count *= d
        if any(d <= 0 for d in dims) or count >= 1 << 63:  # ggml counts elements in an int64
            raise self.fail(f"has invalid dimensions {dims}")
        return count

    def nbytes(self, dims: list[int], count: int, ggml_type: int) -> int:
        sizes = _QUANT_SIZES.get(ggml_type)
        if sizes is None:
            raise self.fail(f"has unknown ggml type {ggml_type}; update slmops or re-export the model")
        block, block_bytes = sizes
        if dims[0] % block:
            raise self.fail(f"has rows of {dims[0]} values, not whole {block}-value blocks; the file is corrupt")
        return count // block * block_bytes
