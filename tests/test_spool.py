"""The pull's spool: chunks hashed and written on their own threads, in order, the disk's writeback started as they
go, and a failing step surfaces. Then the pull around it: each blob fsynced before its rename, the blob folder
before the manifest, progress per layer, and a layer failing on the helper thread stops the other download."""

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
from registry import Recorder, ollama_manifest, sha, tiny_gguf

from slmops.store import pulling, spool as spool_mod
from slmops.store.registry_auth import RegistryConfig
from slmops.store.spool import WRITEBACK_EVERY, Spool, start_writeback
from slmops.store.store import Store
from slmops.types.digest import Digest
from slmops.types.errors import IntegrityError, InvalidModelFile, SourceError
from slmops.types.name import Reference


def test_spool_writes_and_hashes_every_chunk_in_order(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(spool_mod, "start_writeback", lambda fd: (started.append(fd), start_writeback(fd)))
    chunks = [os.urandom(n) for n in (1, 65536, 3 << 20, 7, 1 << 20)] * 5  # past WRITEBACK_EVERY: writeback starts
    assert sum(map(len, chunks)) > 2 * WRITEBACK_EVERY
    path = tmp_path / "blob"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, b"head")
    h = hashlib.sha256(b"head")
    with Spool(fd, h) as spool:
        for c in chunks:
            spool.put(c)
    os.fsync(fd)
    os.close(fd)
    data = b"head" + b"".join(chunks)
    assert path.read_bytes() == data
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert len(started) >= 2 and set(started) == {fd}
    assert all(w.ident is not None and not w.is_alive() for w in spool._workers)  # started, and joined


def test_a_blob_of_one_read_is_written_and_hashed_without_threads(tmp_path):
    path = tmp_path / "blob"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    h = hashlib.sha256()
    with Spool(fd, h) as spool:
        spool.put(b"config")
    os.close(fd)
    assert path.read_bytes() == b"config" and h.hexdigest() == hashlib.sha256(b"config").hexdigest()
    assert all(w.ident is None for w in spool._workers)  # never started


def test_starting_writeback_is_best_effort_where_a_file_cannot_have_it(tmp_path):
    r, w = os.pipe()  # sync_file_range fails on a pipe (ESPIPE): nothing is raised, the fsync after decides
    try:
        start_writeback(w)
    finally:
        os.close(r)
        os.close(w)


def test_a_failing_write_is_raised_and_nothing_after_it_is_written(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # every write fails with EBADF
    with pytest.raises(OSError), Spool(fd, hashlib.sha256()) as spool:
        for _ in range(100):
            spool.put(b"x" * 1024)
    os.close(fd)
    assert path.read_bytes() == b""


class _BrokenHash:
    def __init__(self) -> None:
        self.calls = 0

    def update(self, data: bytes) -> None:
        self.calls += 1
        raise MemoryError("hash step failed")


def test_a_failing_hash_is_raised_by_the_exit_at_the_latest(tmp_path):
    fd = os.open(tmp_path / "blob", os.O_WRONLY | os.O_CREAT)
    h = _BrokenHash()
    with pytest.raises(MemoryError, match="hash step failed"), Spool(fd, h) as spool:  # type: ignore[arg-type]
        for _ in range(3):  # two chunks or more: the threads run; the error surfaces in a later put or the exit
            spool.put(b"abc")
    assert h.calls == 1 and all(w.ident is not None and not w.is_alive() for w in spool._workers)
    os.close(fd)


def test_an_error_of_the_receiving_side_stops_the_threads_and_is_not_swallowed(tmp_path):
    fd = os.open(tmp_path / "blob", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(ConnectionResetError), Spool(fd, hashlib.sha256()) as spool:
        spool.put(b"abc")
        raise ConnectionResetError
    assert all(not w.is_alive() for w in spool._workers)
    os.close(fd)


def test_written_is_called_once_the_file_holds_every_chunk_and_not_after_an_error(tmp_path):
    path = tmp_path / "blob"
    seen: list[int] = []
    for chunks in ([b"one read"], [os.urandom(1 << 20) for _ in range(9)]):  # without threads, and with them
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with Spool(fd, hashlib.sha256(), lambda: seen.append(path.stat().st_size)) as spool:
            for c in chunks:
                spool.put(c)
        os.close(fd)
        assert seen.pop() == sum(map(len, chunks)) and not seen
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with pytest.raises(ConnectionResetError), Spool(fd, hashlib.sha256(), lambda: seen.append(-1)) as spool:
        spool.put(b"abc")
        spool.put(b"def")
        raise ConnectionResetError
    os.close(fd)
    assert seen == []


# -- the pull around the spool --------------------------------------------------------------------------------
TEMPLATE = "application/vnd.ollama.image.template"


def _model(tmp_path, model: bytes | None = None) -> tuple[bytes, dict[str, bytes]]:
    """A manifest of config, model and a template layer, and the blobs it names."""
    model = model if model is not None else tiny_gguf(tmp_path / "tiny.gguf")
    template = b"{{ .Prompt }}"
    manifest, blobs = ollama_manifest(model)
    doc = json.loads(manifest)
    doc["layers"].append({"mediaType": TEMPLATE, "digest": sha(template), "size": len(template)})
    return json.dumps(doc).encode(), {**blobs, sha(template): template}


def _registry(manifest: bytes, blobs: dict) -> Recorder:
    """Serves ``manifest`` as library/m:latest and ``blobs`` (bytes, or a route of their own)."""
    routes = {"/v2/library/m/manifests/latest":
              lambda req: (200, {"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}, manifest)}
    for digest, body in blobs.items():
        routes[f"/v2/library/m/blobs/{digest}"] = body if callable(body) else (lambda req, b=body: (200, {}, b))
    return Recorder(routes)


def _pull(store: Store, host: str, progress=lambda *a: None) -> None:
    store.pull(Reference.parse(f"{host}/library/m"), progress, registry=RegistryConfig(insecure=True))


def test_each_blob_is_fsynced_before_its_rename_and_the_folder_before_the_manifest(tmp_path, monkeypatch):
    manifest, blobs = _model(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_fsync_dir = os.fsync, os.replace, pulling.fsync_dir

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    def fsync_dir(path):
        events.append(("fsync_dir", str(path)))
        real_fsync_dir(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(pulling, "fsync_dir", fsync_dir)
    seen: list[tuple[str, int, int | None]] = []
    store = Store(tmp_path / "models", allow_internal_registries=True)
    with _registry(manifest, blobs) as reg:
        _pull(store, reg.host, lambda status, done, total: seen.append((status, done, total)))
    root = str(store.blobs.root)
    for digest, data in blobs.items():
        partial = f"{root}/partial/sha256-{digest[7:]}.partial"
        renamed = events.index(("replace", f"{partial} -> {root}/sha256-{digest[7:]}"))
        assert ("fsync", partial) in events[:renamed], digest  # durable before it has its name
        assert (f"pulling {digest[7:19]}", len(data), len(data)) in seen  # progress per layer, to its end
        assert store.blobs.path(Digest.parse(digest)).read_bytes() == data
    blob_renames = [i for i, (what, arg) in enumerate(events) if what == "replace" and arg.startswith(f"{root}/")]
    folder = events.index(("fsync_dir", root))
    manifest_written = next(i for i, (what, arg) in enumerate(events) if what == "replace" and "/manifests/" in arg)
    assert len(blob_renames) == len(blobs) and max(blob_renames) < folder < manifest_written
    assert not list((store.blobs.root / "partial").iterdir())


def test_a_layer_failing_beside_the_large_one_stops_it_and_is_the_error(tmp_path):
    """The config answers 404 once the model's body has begun, and the model's body takes most of a second more:
    the pull stops at the model's next chunk with the config's error, leaving at most part of the model (to
    resume). Had it not stopped, the whole model would be back in ``partial/``."""
    size = 4 << 20
    model = os.urandom(size)
    manifest, blobs = _model(tmp_path, model)
    config = json.loads(manifest)["config"]["digest"]
    begun = threading.Event()

    def slow_model(req):
        def body(out):
            for i in range(0, size, 64 << 10):
                out.write(model[i:i + (64 << 10)])
                out.flush()
                begun.set()
                time.sleep(0.01)
        return 200, {"Content-Length": str(size)}, body

    def late_404(req):
        begun.wait(10)
        return 404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'

    store = Store(tmp_path / "models", allow_internal_registries=True)
    with _registry(manifest, {**blobs, sha(model): slow_model, config: late_404}) as reg:
        with pytest.raises(SourceError, match=f"404 to GET blob {config[7:19]}"):
            _pull(store, reg.host)
    partial = store.blobs.root / "partial" / f"sha256-{sha(model)[7:]}.partial"
    assert not partial.exists() or partial.stat().st_size < size
    assert store.list() == [] and not list(store.blobs.root.glob("sha256-*"))


def test_a_blob_that_is_no_gguf_is_refused_and_the_store_is_unchanged(tmp_path):
    garbage = b"NOTAGGUF" * 4096
    manifest, blobs = _model(tmp_path, garbage)
    store = Store(tmp_path / "models", allow_internal_registries=True)
    with _registry(manifest, blobs) as reg, pytest.raises(InvalidModelFile, match="not a GGUF file"):
        _pull(store, reg.host)
    assert store.list() == [] and store.blobs.digests() == set()
    kept = {f.name for f in (store.blobs.root / "partial").iterdir()}  # whole, for the next pull to move in
    assert kept == {f"sha256-{d[7:]}.partial" for d, data in blobs.items() if data != garbage}


def test_the_gguf_is_scanned_once_while_its_hash_finishes_and_the_scan_is_kept(tmp_path, monkeypatch):
    from slmops.store import gguf_scan
    scans = []
    real = gguf_scan.scan_gguf
    monkeypatch.setattr(gguf_scan, "scan_gguf", lambda path: (scans.append(Path(path)), real(path))[1])
    model = tiny_gguf(tmp_path / "tiny.gguf") + os.urandom(3 << 20)  # several reads: the spool's threads run
    manifest, blobs = _model(tmp_path, model)
    store = Store(tmp_path / "models", allow_internal_registries=True)
    with _registry(manifest, blobs) as reg:
        _pull(store, reg.host)
    assert [p.suffix for p in scans] == [".partial"]  # before the rename, once
    info = store.inspect(store.list()[0].name)  # from the cache the pull wrote: no second scan
    assert len(scans) == 1 and info.parameter_count > 0 and info.architecture == "llama"


def test_a_blob_that_matches_no_digest_is_refused_for_that_before_any_gguf_check(tmp_path):
    manifest, blobs = _model(tmp_path)
    model_digest = next(d for d, data in blobs.items() if data.startswith(b"GGUF"))
    blobs[model_digest] = b"NOTAGGUF".ljust(len(blobs[model_digest]), b"x")  # the declared size; no GGUF
    store = Store(tmp_path / "models", allow_internal_registries=True)
    with _registry(manifest, blobs) as reg, pytest.raises(IntegrityError, match="does not match its digest"):
        _pull(store, reg.host)
    assert store.list() == []
