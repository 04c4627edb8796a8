"""Crafted GGUF headers (Ollama's CVE-2025-0315 class): every count and length a file claims is checked against the
bytes present before it is used, and the work one file can ask for is capped. Three tiers: crafted files with
time and memory bounds, a hypothesis fuzz tier against the inspector, and uploads to a real server process."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import ollama
import psutil
import pytest
from gguf import GGUFReader, GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Server, link_home
from slmops.store import gguf_scan
from slmops.store.gguf import GGUFInfo, inspect_gguf
from slmops.types.errors import InvalidModelFile

STRING, ARRAY, UINT32, FLOAT32, BOOL = (GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32,
                                        GGUFValueType.FLOAT32, GGUFValueType.BOOL)
MiB = 1 << 20


def gstr(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def head(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def string_array(key: str, count: int) -> bytes:
    """A key whose value is an array claiming ``count`` strings; the caller appends the items (or not)."""
    return kv(key, ARRAY, struct.pack("<IQ", STRING, count))


def tensor(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def small_model() -> bytes:
    """A valid GGUF with a bit of every value type, a vocabulary past the short-array length and two tensors."""
    tokens = b"".join(gstr(f"t{i}") for i in range(100))
    kvs = [kv("general.architecture", STRING, gstr("llama")),
           kv("general.file_type", UINT32, struct.pack("<I", 2)),
           kv("llama.context_length", UINT32, struct.pack("<I", 2048)),
           kv("llama.rope.freq_base", FLOAT32, struct.pack("<f", 1e-5)),
           kv("general.flag", BOOL, b"\x01"),
           kv("general.tags", ARRAY, struct.pack("<IQ", STRING, 2) + gstr("a") + gstr("b")),
           kv("general.ints", ARRAY, struct.pack("<IQ", GGUFValueType.INT16, 3) + struct.pack("<3h", -1, 0, 7)),
           kv("general.empty", ARRAY, struct.pack("<IQ", GGUFValueType.UINT8, 0)),
           kv("llama.scores", ARRAY, struct.pack("<IQ", FLOAT32, 100) + struct.pack("<100f", *range(100))),
           kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 100) + tokens),
           kv("tokenizer.chat_template", STRING, gstr("{{ messages }}"))]
    infos = tensor("a.weight", [4, 2], 0, 0) + tensor("b.weight", [32], 2, 32)  # F32 (32 bytes), Q4_0 (18 bytes)
    body = head(2, len(kvs)) + b"".join(kvs) + infos
    body += b"\0" * (-len(body) % 32)
    return body + b"\1" * 64


def reader_view(path: Path) -> tuple[dict, int, str | None]:
    """Metadata, parameter count and chat template as the GGUFReader-based inspector derived them before."""
    r = GGUFReader(path)

    def value(f):
        if f.types[0] == ARRAY:
            return f"[{len(f.data)} items]" if len(f.data) > 64 else [v.item() if hasattr(v, "item") else v
                                                                       for v in f.contents()]
        v = f.contents()
        return v.item() if hasattr(v, "item") else v
    meta = {k: value(f) for k, f in r.fields.items() if not k.startswith(("GGUF.", "tokenizer.ggml."))}
    template = r.get_field("tokenizer.chat_template")
    return meta, sum(int(np.prod([int(d) for d in t.shape])) for t in r.tensors), template and template.contents()


def cost(work, trace: bool = True) -> tuple[float, int]:
    """Seconds and peak traced bytes of ``work()``, from two runs: tracing slows Python code several times over."""
    start = time.perf_counter()
    work()
    elapsed = time.perf_counter() - start
    if not trace:
        return elapsed, 0
    tracemalloc.start()
    try:
        work()
        return elapsed, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def rejected_cheaply(path: Path, match: str | None = None, seconds: float = 2.0, trace: bool = True) -> str:
    """Inspect a crafted file under a time and a traced-memory bound; return the one-line error."""
    errors = []

    def work() -> None:
        with pytest.raises(InvalidModelFile, match=match) as err:
            inspect_gguf(path)
        errors.append(err.value)
    elapsed, peak = cost(work, trace)
    assert elapsed < seconds and peak < 32 * MiB, (elapsed, peak)
    message = str(errors[0])
    assert "\n" not in message and str(path.parent) not in message, message
    return message


# --- crafted files ---------------------------------------------------------------------------------------------------

def test_scan_matches_the_gguf_reader_on_the_real_model(model_file):
    start = time.perf_counter()
    info = inspect_gguf(model_file)
    assert time.perf_counter() - start < 2  # tens of milliseconds; GGUFReader took seconds
    meta, params, template = reader_view(model_file)
    assert info.metadata == meta and info.parameter_count == params and info.chat_template == template
    assert (info.architecture, info.file_type, info.context_length) == ("llama", "Q4_1", 8192)


def test_scan_matches_the_gguf_reader_on_every_value_type(tmp_path):
    p = tmp_path / "small.gguf"
    p.write_bytes(small_model())
    info = inspect_gguf(p)
    meta, params, template = reader_view(p)
    assert info.metadata == meta and info.parameter_count == params == 8 + 32 and info.chat_template == template
    assert info.metadata["general.ints"] == [-1, 0, 7] and info.metadata["llama.scores"] == "[100 items]"
    assert (info.architecture, info.file_type, info.context_length, info.chat_template) == \
        ("llama", "Q4_0", 2048, "{{ messages }}")


def test_an_array_claiming_2_to_the_40_strings_is_refused_at_once(tmp_path):
    """The issue's 158-byte file: the old reader looped once per claimed item until the server ran out of memory."""
    p = tmp_path / "claim.gguf"
    p.write_bytes(head(0, 1) + string_array("tokenizer.ggml.tokens", 2**40) + b"\0" * 100)
    assert len(p.read_bytes()) < 200
    assert "1099511627776" in rejected_cheaply(p, "crafted")


def test_ten_million_real_strings_are_refused_without_walking_them(tmp_path):
    """All 10 million (empty) strings are present, so only the cap on items can stop it: 90 s and 3.5 GB before."""
    p = tmp_path / "vocab.gguf"
    with p.open("wb") as f:
        f.write(head(0, 1) + string_array("tokenizer.ggml.tokens", 10_000_000))
        f.write(bytes(8 * 10_000_000))
    rejected_cheaply(p, "more than the .* in arrays")


def test_string_arrays_are_capped_in_total_not_only_each(tmp_path):
    each = gguf_scan._MAX_STRING_ITEMS // 2 + 1
    p = tmp_path / "two.gguf"
    with p.open("wb") as f:
        f.write(head(0, 2))
        for key in ("a", "b"):
            f.write(string_array(key, each) + bytes(8 * each))
    assert 'value of "b"' in rejected_cheaply(p, "crafted", seconds=5, trace=False)  # tracing takes seconds here


def test_the_most_work_a_file_can_ask_for_is_bounded(tmp_path):
    """A string array at the cap is a valid file; walking it is the slowest scan there is (about half a second).
    Its memory does not grow with the count, so it is traced on a smaller one (tracing the walk takes seconds)."""
    n = gguf_scan._MAX_STRING_ITEMS
    for count, path in ((n, tmp_path / "cap.gguf"), (n // 16, tmp_path / "small.gguf")):
        path.write_bytes(head(0, 1) + string_array("tokenizer.ggml.tokens", count) + bytes(8 * count))
    elapsed, _ = cost(lambda: inspect_gguf(tmp_path / "cap.gguf"), trace=False)
    peak = cost(lambda: inspect_gguf(tmp_path / "small.gguf"))[1]
    assert elapsed < 5 and peak < 1 * MiB, (elapsed, peak)


@pytest.mark.parametrize("kind", ["string longer than the file", "key of 2^63 bytes", "nested array",
                                  "numeric array past the end", "strings past the end", "dims overflow",
                                  "zero dim", "five dims", "unknown ggml type", "offset past the end",
                                  "duplicate key", "duplicate tensor", "alignment not a power of two",
                                  "alignment not uint32", "unknown value type", "key not utf-8",
                                  "tensor name too long", "too many keys", "partial block", "truncated tensor info"])
def test_crafted_headers_are_refused_quickly(tmp_path, kind):
    pad = b"\0" * 256
    files = {
        "string longer than the file": head(0, 1) + kv("a", STRING, struct.pack("<Q", 10**12)) + pad,
        "key of 2^63 bytes": head(0, 1) + struct.pack("<Q", 2**63) + pad,
        "nested array": head(0, 1) + kv("a", ARRAY, struct.pack("<IQ", ARRAY, 2**40)) + pad,
        "numeric array past the end": head(0, 1) + kv("a", ARRAY, struct.pack("<IQ", UINT32, 2**61)) + pad,
        "strings past the end": head(0, 1) + string_array("a", 100) + gstr("x") + struct.pack("<Q", 2**62) + pad,
        "dims overflow": head(1, 0) + tensor("t", [2**32, 2**32]) + pad,
        "zero dim": head(1, 0) + tensor("t", [4, 0]) + pad,
        "five dims": head(1, 0) + tensor("t", [1, 1, 1, 1, 1]) + pad,
        "unknown ggml type": head(1, 0) + tensor("t", [4], 4) + pad,  # Q4_2, long removed from ggml
        "offset past the end": head(1, 0) + tensor("t", [4], 0, 2**40) + pad,
        "duplicate key": head(0, 2) + kv("a", BOOL, b"\1") * 2 + pad,
        "duplicate tensor": head(2, 0) + tensor("t", [4]) + tensor("t", [4], 0, 32) + pad,
        "alignment not a power of two": head(0, 1) + kv("general.alignment", UINT32, struct.pack("<I", 24)) + pad,
        "alignment not uint32": head(0, 1) + kv("general.alignment", GGUFValueType.UINT64, struct.pack("<Q", 32)) + pad,
        "unknown value type": head(0, 1) + kv("a", 13, b"") + pad,
        "key not utf-8": head(0, 1) + gstr(b"\xff\xfe") + struct.pack("<I", BOOL) + b"\1" + pad,
        "tensor name too long": head(1, 0) + tensor("x" * 64, [4]) + pad,
        "too many keys": head(0, gguf_scan._MAX_KEYS + 1) + bytes(14 * gguf_scan._MAX_KEYS + 14),
        "partial block": head(1, 0) + tensor("t", [33], 2) + pad,  # Q4_0 rows come in blocks of 32
        "truncated tensor info": head(1, 0) + tensor("t", [4])[:-3],
    }
    p = tmp_path / "crafted.gguf"
    p.write_bytes(files[kind])
    rejected_cheaply(p)


def test_a_huge_string_value_is_shown_as_its_size_not_kept(tmp_path):
    n = gguf_scan._MAX_KEPT_BYTES + 1
    p = tmp_path / "big.gguf"
    p.write_bytes(head(0, 1) + kv("general.description", STRING, struct.pack("<Q", n) + b"x" * n))
    assert inspect_gguf(p).metadata["general.description"] == f"[{n} bytes]"
    assert cost(lambda: inspect_gguf(p))[1] < 8 * MiB


def test_the_cache_notices_an_edit_whose_mtime_was_put_back(tmp_path):
    """``touch -r`` restores mtime, not ctime: a same-size edit must be validated again, not served from cache."""
    p, cache = tmp_path / "m.gguf", tmp_path / "cache"
    p.write_bytes(small_model())
    assert inspect_gguf(p, cache).architecture == "llama"
    before = p.stat()
    time.sleep(0.05)  # past the kernel's timestamp granularity, so the edit gets a new ctime
    with p.open("r+b") as f:
        f.write(b"NOPE")
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        inspect_gguf(p, cache)


# --- fuzz tier -------------------------------------------------------------------------------------------------------

U64 = st.one_of(st.integers(0, 300), st.sampled_from([2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
                                                       2**64 - 1]), st.integers(0, 2**64 - 1))
U32 = st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1))
KEYS = st.one_of(st.sampled_from(["general.architecture", "general.file_type", "llama.context_length",
                                  "tokenizer.chat_template", "llama.pooling_type", "tokenizer.ggml.tokens",
                                  "general.alignment"]), st.text(max_size=12))


def mostly(draw, right, wrong: st.SearchStrategy):
    """``right`` nine times in ten, else a draw from ``wrong``: each field is usually sound, so the scan gets deep."""
    return right if draw(st.integers(0, 9)) else draw(wrong)


@st.composite
def values(draw, depth: int = 0) -> bytes:
    """A value type and its payload, right or wrong in any part."""
    vtype = mostly(draw, draw(st.sampled_from(list(GGUFValueType))), U32)
    code = gguf_scan._SCALARS.get(vtype)
    if code is not None:
        size = struct.calcsize("<" + code)
        return struct.pack("<I", vtype) + draw(st.binary(min_size=mostly(draw, size, st.integers(0, size)),
                                                         max_size=size))
    if vtype == STRING:
        text = draw(st.text(max_size=24)).encode("utf-8", "surrogatepass")
        return struct.pack("<IQ", vtype, mostly(draw, len(text), U64)) + text
    if vtype == ARRAY and depth == 0:
        itype = mostly(draw, draw(st.sampled_from([t for t in GGUFValueType if t != ARRAY])), U32)
        if itype == STRING:
            items = [gstr(b) for b in draw(st.lists(st.binary(max_size=6), max_size=70))]
        elif itype == ARRAY:
            items = [draw(values(depth + 1)) for _ in range(draw(st.integers(0, 2)))]
        else:
            size = struct.calcsize("<" + gguf_scan._SCALARS.get(itype, "B"))
            items = [draw(st.binary(min_size=0, max_size=70 * size))]
            items = [items[0][:len(items[0]) // size * size]]
        count = len(items) if itype in (STRING, ARRAY) or not items else len(items[0]) // size
        return struct.pack("<IIQ", vtype, itype, mostly(draw, count, U64)) + b"".join(items)
    return struct.pack("<I", vtype) + draw(st.binary(max_size=16))


@st.composite
def tensor_infos(draw) -> bytes:
    dims = mostly(draw, draw(st.lists(st.integers(1, 8), min_size=1, max_size=4)),
                  st.lists(st.one_of(st.integers(0, 64), U64), max_size=5))
    ggml_type = mostly(draw, draw(st.sampled_from([0, 1, 24, 26])), U32)  # F32, F16, I8, I32: no blocks
    name = mostly(draw, draw(st.text(min_size=1, max_size=8)), st.text(max_size=70)).encode("utf-8", "surrogatepass")
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", mostly(draw, len(dims), U32), *dims, ggml_type,
                                    mostly(draw, draw(st.sampled_from([0, 32, 64])), U64))


@st.composite
def gguf_files(draw) -> bytes:
    keys = mostly(draw, draw(st.lists(KEYS, max_size=6, unique=True)), st.lists(KEYS, max_size=6))
    kvs = [gstr(k.encode("utf-8", "surrogatepass")) + draw(values()) for k in keys]
    infos = draw(st.lists(tensor_infos(), max_size=3))
    version = mostly(draw, draw(st.sampled_from([2, 3])), U32)
    data = head(mostly(draw, len(infos), U64), mostly(draw, len(kvs), U64), version) + b"".join(kvs) + b"".join(infos)
    data += b"\0" * (-len(data) % 32) + draw(st.binary(min_size=mostly(draw, 256, st.just(0)), max_size=512))
    return mostly(draw, data, st.builds(lambda n: data[:n], st.integers(0, len(data))))


@st.composite
def mutated(draw, base: bytes) -> bytes:
    """``base`` with a few bytes or 8-byte counts overwritten (mostly past the fixed header), maybe cut short."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        at = mostly(draw, draw(st.integers(24, len(data) - 1)), st.integers(0, len(data) - 1))
        patch = struct.pack("<Q", draw(U64)) if draw(st.booleans()) else draw(st.binary(min_size=1, max_size=4))
        data[at:at + len(patch)] = patch
    return bytes(mostly(draw, data, st.builds(lambda n: data[:n], st.integers(0, len(data)))))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.gguf"


def survives(path: Path, data: bytes) -> None:
    """The whole contract: a GGUFInfo or InvalidModelFile with a one-line message, in bounded time and memory."""
    path.write_bytes(data)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        info = inspect_gguf(path)
        assert isinstance(info, GGUFInfo)
    except InvalidModelFile as err:
        assert "\n" not in str(err) and str(path.parent) not in str(err)
    finally:
        elapsed, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 1 and peak < 16 * MiB, (elapsed, peak)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


@FUZZ
@given(data=gguf_files())
def test_fuzz_generated_headers(scratch, data):
    survives(scratch, data)


@FUZZ
@given(data=mutated(small_model()))
def test_fuzz_mutations_of_a_valid_file(scratch, data):
    survives(scratch, data)


@pytest.fixture(scope="module")
def model_prefix(model_file) -> bytes:
    with model_file.open("rb") as f:
        return f.read(64 << 10)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutations_of_the_real_model_header(scratch, model_prefix, data):
    survives(scratch, data.draw(mutated(model_prefix)))


# --- a real server ---------------------------------------------------------------------------------------------------

def upload(srv: Server, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{srv.url}/api/blobs/{digest}", content=data, timeout=120).status_code in (200, 201)
    return digest


class HealthWatch(threading.Thread):
    """Polls /health while a request runs; records the slowest answer (a failure counts as forever)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.slowest, self.done = url, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            start = time.monotonic()
            try:
                ok = httpx.get(self.url + "/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.slowest = max(self.slowest, time.monotonic() - start if ok else float("inf"))
            time.sleep(0.05)

    def __enter__(self) -> HealthWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


@pytest.mark.slow
def test_crafted_uploads_are_cheap_400s_and_the_server_lives(shared_home, tmp_path):
    claim = head(0, 1) + string_array("tokenizer.ggml.tokens", 2**40) + b"\0" * 100
    vocab = head(0, 1) + string_array("tokenizer.ggml.tokens", 10_000_000) + bytes(8 * 10_000_000)
    with Server(link_home(shared_home, tmp_path / "home"), SLMOPS_CONTEXT_LENGTH="512") as srv:
        proc = psutil.Process(srv.proc.pid)
        for data in (claim, vocab):
            digest = upload(srv, data)
            rss = proc.memory_info().rss
            with HealthWatch(srv.url) as health:
                start = time.monotonic()
                r = httpx.post(srv.url + "/api/create", json={"model": "crafted", "files": {"m.gguf": digest},
                                                               "stream": False}, timeout=120)
                elapsed = time.monotonic() - start
                time.sleep(0.2)  # a health answer or two after the create as well
            assert r.status_code == 400, r.text
            message = r.json()["error"]
            assert "GGUF" in message and "\n" not in message and str(srv.home) not in message, message
            assert elapsed < 5 and health.slowest < 2, (elapsed, health.slowest)
            assert proc.memory_info().rss - rss < 100 * MiB
        reply = ollama.Client(host=srv.url).generate(model="smollm2:135m", prompt="Hi", options={"num_predict": 2})
        assert reply.done
