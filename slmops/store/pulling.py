"""Pulling a model from a registry into the store: manifest, missing blobs, signature, manifest again.

Order, so that a kill at any instant is harmless (as every store writer): each missing blob is streamed into
``blobs/partial/sha256-<hex>.partial``, hashed as it is written, and renamed to its name only once its size and
digest match; the model layer is then validated as a GGUF (a folder model's ``genai_config.json`` is checked
instead: :mod:`slmops.store.folders`); the manifest is written last, byte for byte as the
registry served it (its digest is the one the registry shows). A pull that fails leaves the store as it was: the
blobs it added that no manifest uses are dropped again, and only a partial file that may still be completed stays.

The largest blob downloads on the calling thread while the others, one after another, and then the signature
(below) download on a helper thread beside it: each small blob costs a round trip and an fsync (5–15 ms apiece),
which the large transfer hides (Ollama downloads layers concurrently too). Progress reports come from both
threads, one at a time. The blob folder is fsynced once, after the model is validated and before the manifest
that names the blobs is written, rather than after each rename.

Resuming: a partial file left by a killed pull (or a cut connection) is hashed once, then only the rest is asked
for with ``Range: bytes=N-``; a registry that answers with the whole blob (200, not 206) gets the file started
over. A sealed store (``SLMOPS_STORE_KEY``) keeps no plaintext on disk, so its blobs are sealed as they arrive and
an interrupted one starts over.

OCI artifacts holding a bare GGUF (as ``oras push`` makes them) are not in the store's format: their GGUF becomes
the model layer of a manifest made here, with a config made from the GGUF (unless the artifact has an Ollama
config), so their stored digest is not the registry's; the config records the registry's (``source_manifest``).

Signatures travel as OCI artifacts tagged ``sha256-<manifest hex>.sig`` whose one layer is the bundle; one is
stored beside the model when present. With a trust policy, the pulled model must verify before it replaces what
was stored under its name; otherwise the old manifest and signature are put back and the error says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator

import httpx

from slmops.store import folders, manifests as mt
from slmops.store.atomic import atomic_writer, fsync_dir, remove_abandoned_temps
from slmops.store.blobs import CHUNK
from slmops.store.gguf import inspect_gguf, scan_info
from slmops.store.manifests import Layer, Manifest
from slmops.store.network import check_registry_host
from slmops.store.registry import Descriptor, RegistryClient, RemoteManifest, descriptor, fetch_signature
from slmops.store.registry_auth import RegistryConfig
from slmops.store.spool import Spool
from slmops.store.transport import iter_body
from slmops.types.digest import Digest
from slmops.types.errors import IntegrityError, InvalidModelFile, SlmopsError, SourceError
from slmops.types.name import Reference

if TYPE_CHECKING:
    from slmops.store.gguf import GGUFInfo
    from slmops.store.store import Store

ProgressFn = Callable[[str, int, int | None], None]
GGUF_HINTS = ("application/vnd.oci.image.layer.v1.tar", "application/octet-stream")
MAX_SIGNATURE_BYTES = 4 << 20
TICK_BYTES = 1 << 20


@dataclass
class Plan:
    """What a manifest asks of the store: the blobs to have, which is the GGUF, and whether the manifest is kept
    as served (an Ollama model) or one is made for it (an artifact holding a bare GGUF)."""

    downloads: list[Descriptor]
    model: Descriptor
    config: Descriptor | None  # an Ollama config the artifact brings; None: made from the GGUF
    keep_bytes: bool
    files: dict[str, Descriptor] | None = None  # a model stored as a folder (ONNX): its files by name


SLMOPS_LAYERS = (mt.FILE, mt.KNOWLEDGE_FILE, mt.KNOWLEDGE_INDEX)  # slmops's own layers beside Ollama's


def plan_of(remote: RemoteManifest, what: str) -> Plan:
    doc = remote.doc
    config = descriptor(doc["config"], what)
    layers = [descriptor(d, what) for d in doc["layers"]]
    if all(l.media_type.startswith("application/vnd.ollama.image.") or l.media_type in SLMOPS_LAYERS for l in layers):
        named = [(folders.title(l), l) for l in layers if l.media_type == mt.FILE]
        if named:
            folders.check_names([n for n, _ in named], what)
            files = dict(named)
            return Plan([config, *layers], files[folders.CONFIG], config, keep_bytes=True, files=files)
        model = next((l for l in layers if l.media_type == mt.MODEL), None)
        if model is None:
            raise SourceError(f"{what} has no model layer ({mt.MODEL}); it is not a model slmops can run")
        return Plan([config, *layers], model, config, keep_bytes=True)
    ggufs = [l for l in layers if "gguf" in l.media_type.lower()
             or l.annotations.get("org.opencontainers.image.title", "").lower().endswith(".gguf")]
    if not ggufs and len(layers) == 1 and layers[0].media_type in GGUF_HINTS:
        ggufs = layers
    if len(ggufs) != 1:
        found = "no GGUF layer" if not ggufs else f"{len(ggufs)} GGUF layers"
        raise SourceError(f"{what} has {found}; slmops pulls Ollama models or artifacts holding one GGUF file")
    own_config = config if config.media_type == mt.CONFIG_MEDIA_TYPE else None
    return Plan([d for d in (own_config, ggufs[0]) if d is not None], ggufs[0], own_config, keep_bytes=False)


class RegistryPull:
    """One pull of ``ref`` into ``store`` (a :class:`slmops.store.store.Store`)."""

    def __init__(self, store: "Store", ref: Reference, config: RegistryConfig, progress: ProgressFn):
        self.store = store
        self.ref = ref
        self.config = config
        self.progress = _serialized(progress)
        self.added: set[Digest] = set()
        self.invalid: set[Digest] = set()
        self._stop = threading.Event()  # set when one of the two downloading threads failed: the other stops too
        self._gguf: Digest | None = None  # the GGUF layer: scanned while its hash is finishing (_scan_early)
        self._early: GGUFInfo | InvalidModelFile | None = None  # what that scan found

    def run(self) -> Manifest:
        check_registry_host(self.ref.name.host, self.store.allow_internal_registries)  # before any status line
        with RegistryClient(self.ref.name.host, self.config, self.store.allow_internal_registries,
                            self.ref.scheme) as client:
            self.progress("pulling manifest", 0, None)
            try:
                with self.store.writing():
                    manifest = self._pull(client)
            except BaseException:
                self._set_aside()
                raise
        self.progress("success", 0, None)
        return manifest

    def _pull(self, client: RegistryClient) -> Manifest:
        what = f"manifest of {self.ref.display}"
        remote = client.manifest(self.ref.repository, self.ref.manifest_ref)
        plan = plan_of(remote, what)
        remove_abandoned_temps(self.store.root)
        self._gguf = gguf = plan.model.digest if plan.files is None else None
        signature = self._fetch_all(client, plan.downloads, remote.digest)
        self.progress("verifying sha256 digest", 0, None)
        try:
            if gguf is None:
                folders.parse_config(self.store.blobs.read_bytes(plan.model.digest), list(plan.files), what)
                info = None
            else:
                if isinstance(self._early, InvalidModelFile):
                    raise self._early
                info = inspect_gguf(self.store.blobs.path(gguf), self.store.gguf_cache, self.store.blobs.key,
                                    self._early)
        except InvalidModelFile:
            self.invalid.add(plan.model.digest)  # the registry's true bytes, and no model: nothing to keep
            raise
        data = remote.data if plan.keep_bytes else self._own_manifest(plan, info, remote)  # type: ignore[arg-type]
        fsync_dir(self.store.blobs.root)  # the blobs' renames, durable before a manifest names them
        self.progress("writing manifest", 0, None)
        return self._commit(data, signature)

    # -- blobs -------------------------------------------------------------------------------------------------
    def _fetch_all(self, client: RegistryClient, layers: list[Descriptor], manifest: Digest) -> bytes | None:
        """Store ``layers`` and return the signature of ``manifest``: the largest layer on this thread, the others
        and then the signature on a helper thread beside it (see the module's docstring). The largest stays on the
        calling thread so that Ctrl-C stops it at once; an error on either thread stops the other at its next
        chunk, and the first error is raised once both have stopped."""
        largest = max(layers, key=lambda l: l.size, default=None)
        signature: list[bytes | None] = []
        errors: list[BaseException] = []

        def beside() -> None:
            try:
                for layer in layers:
                    if layer is not largest:
                        self._fetch(client, layer)
                signature.append(self._signature(client, manifest))
            except BaseException as err:
                errors.append(err)
                self._stop.set()

        helper = threading.Thread(target=beside, name="slmops-pull-beside", daemon=True)
        helper.start()
        try:
            if largest is not None:
                self._fetch(client, largest)
        except _Stopped:
            pass  # the helper's error is the one to raise
        except BaseException:
            self._stop.set()
            raise
        finally:
            helper.join()
        if errors:
            raise errors[0]
        return signature[0]

    def _fetch(self, client: RegistryClient, layer: Descriptor) -> None:
        status = f"pulling {layer.digest.hex[:12]}"
        if self._stop.is_set():
            raise _Stopped
        if self.store.blobs.has(layer.digest):
            self.progress(status, layer.size, layer.size)
            return
        tick = _Ticker(lambda done: self.progress(status, done, layer.size))
        if self.store.blobs.key is None:
            done = self._download_resumable(client, layer, tick)
        else:
            done = self._download_sealed(client, layer, tick)
        if done:
            self.added.add(layer.digest)
        tick.flush()

    def _download_resumable(self, client: RegistryClient, layer: Descriptor, tick: "_Ticker") -> bool:
        """Returns whether this call stored the blob (another pull of the same blob may have, meanwhile)."""
        target = self.store.blobs.path(layer.digest)
        with _locked_partial(self._partial(layer.digest)) as (f, path):
            if self.store.blobs.has(layer.digest):
                return False
            h, have = _hash_existing(f, layer.size)
            tick.set(have)
            if have < layer.size:
                try:
                    written = (lambda: self._scan_early(path)) if layer.digest == self._gguf else None
                    h = self._stream_into(client, layer, f, h, have, tick, written)
                except IntegrityError:  # the registry's bytes are wrong: none of them are worth keeping
                    path.unlink(missing_ok=True)
                    raise
            if Digest(h.hexdigest()) != layer.digest:
                path.unlink(missing_ok=True)
                raise IntegrityError(f"blob {layer.digest.hex[:12]} from {client.host} does not match its digest "
                                     "(the registry's copy is damaged or was replaced); refused, nothing was stored")
            os.fsync(f.fileno())  # waits for the tail only: the spool started the writeback as it wrote
            os.replace(path, target)  # the folder is fsynced once for all blobs, before the manifest (_pull)
        return True

    def _partial(self, digest: Digest) -> Path:
        return self.store.blobs.root / "partial" / f"{digest.filename}.partial"

    def _scan_early(self, path: Path) -> None:
        """Validate the GGUF in ``path`` (all written, the hash still catching up: see :mod:`slmops.store.spool`).
        What it finds counts only once the digest matches: a scan error is raised then, by :meth:`_pull`."""
        try:
            self._early = scan_info(path)
        except InvalidModelFile as err:
            self._early = err

    def _stream_into(self, client: RegistryClient, layer: Descriptor, f: IO[bytes], h: "hashlib._Hash",
                     have: int, tick: "_Ticker", written: Callable[[], None] | None = None) -> "hashlib._Hash":
        """Append the rest of the blob to ``f`` (from ``have``), hashing it; returns the hash of it all.
        ``written`` is called once the whole blob is in the file, perhaps before its hash is done."""

        def complete() -> None:
            if written is not None and have == layer.size:
                written()

        with client.blob(self.ref.repository, layer.digest, have) as r:
            if have and r.status_code != 206:  # the registry ignored the range: start over from its first byte
                f.truncate(0)
                h, have = hashlib.sha256(), 0
                tick.set(0)
            _check_length(r, layer, have, client.host)
            f.flush()
            try:
                with Spool(f.fileno(), h, complete) as spool:
                    for chunk in iter_body(r):
                        if have + len(chunk) > layer.size:
                            raise _too_long(layer, client.host)
                        if self._stop.is_set():
                            raise _Stopped
                        spool.put(chunk)
                        have += len(chunk)
                        tick.add(len(chunk))
            except httpx.TransportError as err:
                raise SourceError(f"the connection to {client.host} broke after {have} of {layer.size} bytes of "
                                  f"blob {layer.digest.hex[:12]} ({type(err).__name__}); run the pull again to "
                                  "resume") from None
        if have < layer.size:
            raise SourceError(f"registry {client.host} ended blob {layer.digest.hex[:12]} after {have} of "
                              f"{layer.size} bytes; run the pull again to resume")
        return h

    def _download_sealed(self, client: RegistryClient, layer: Descriptor, tick: "_Ticker") -> bool:
        with client.blob(self.ref.repository, layer.digest) as r:
            _check_length(r, layer, 0, client.host)
            reader = _BodyReader(r, layer, client.host, self._stop)
            self.store.blobs.put_stream(reader, layer.digest, tick.add, what=f"blob {layer.digest.hex[:12]}")
        return True

    def _set_aside(self) -> None:
        """After a failed pull, the blobs it added that no manifest uses leave the store. In a plain store they go
        back to ``partial/`` whole, so the next pull moves them in after one hash instead of fetching them again;
        sealed ones are removed. Under the store's exclusive lock: a pull of the same blobs running meanwhile
        has finished (and references them) or not started."""
        store = self.store
        with store._lock(exclusive=True):
            for digest in self.added - store._referenced():
                if store.blobs.key is None and store.blobs.has(digest) and digest not in self.invalid:
                    self._partial(digest).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(store.blobs.path(digest), self._partial(digest))
                else:
                    store.blobs.remove(digest)

    # -- manifest and signature --------------------------------------------------------------------------------
    def _own_manifest(self, plan: Plan, info: "GGUFInfo", remote: RemoteManifest) -> bytes:
        """The store's manifest for an artifact holding a bare GGUF."""
        store = self.store
        before = store.blobs.digests()
        layers = [Layer(mediaType=mt.MODEL, digest=str(plan.model.digest), size=plan.model.size)]
        if info.chat_template:
            layers.append(store.put_text_layer(mt.TEMPLATE, info.chat_template))
        if plan.config is not None:
            config = Layer(mediaType=mt.CONFIG_MEDIA_TYPE, digest=str(plan.config.digest), size=plan.config.size)
        else:
            config = store.config_layer(info, layers, {"source": "registry", "source_manifest": str(remote.digest)})
        self.added.update(l.blob for l in (config, *layers) if l.blob not in before)
        return Manifest(config=config, layers=layers).to_bytes()

    def _signature(self, client: RegistryClient, digest: Digest) -> bytes | None:
        """The signature bundle tagged ``sha256-<hex>.sig``, if the registry has one. Without a trust policy a
        broken one is left out rather than failing the pull; with one, the error is the answer."""
        try:
            return fetch_signature(client, self.ref.repository, digest, MAX_SIGNATURE_BYTES)
        except SlmopsError:
            if self.store.trust is not None:
                raise
            return None

    def _commit(self, data: bytes, signature: bytes | None) -> Manifest:
        """Write the signature, then the manifest; with a trust policy, put back what was there if the new
        model does not verify."""
        name, store = self.ref.name, self.store
        path, sig_path = store.manifests.path(name), store.signature_path(name)
        old = _read(path)
        old_sig = _read(sig_path)
        _write_or_remove(sig_path, signature)
        try:
            manifest = store.manifests.put_bytes(name, data)
            if store.trust is not None:
                store.trust(store, name)
        except BaseException:
            _write_or_remove(sig_path, old_sig)
            if old is None:
                with contextlib.suppress(SlmopsError):
                    store.manifests.delete(name)
            else:
                _write_or_remove(path, old)
            raise
        return manifest


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_or_remove(path: Path, data: bytes | None) -> None:
    if data is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        f.write(data)


@contextlib.contextmanager
def _locked_partial(path: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """The partial file, opened for appending and locked: one writer per blob. A second pull of the same blob
    waits here, then finds it stored. If the file was renamed or removed while we waited, open it again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+b")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield f, path
    finally:
        with contextlib.suppress(OSError):
            st = os.fstat(f.fileno())
            if st.st_size == 0 and os.stat(path).st_ino == st.st_ino:  # nothing to resume from
                path.unlink()
        f.close()


def _hash_existing(f: IO[bytes], size: int) -> tuple["hashlib._Hash", int]:
    """Hash the bytes a killed pull left, once; more than the blob can hold means they are not its bytes."""
    h = hashlib.sha256()
    f.seek(0, os.SEEK_END)
    if f.tell() > size:
        f.truncate(0)
    f.seek(0)
    have = 0
    while piece := f.read(CHUNK):
        h.update(piece)
        have += len(piece)
    return h, have


def _too_long(layer: Descriptor, host: str) -> IntegrityError:
    return IntegrityError(f"registry {host} sent more than the {layer.size} bytes the manifest declares for blob "
                          f"{layer.digest.hex[:12]}; refused, nothing was stored")


def _check_length(r: httpx.Response, layer: Descriptor, offset: int, host: str) -> None:
    declared = r.headers.get("content-length", "")
    if declared.isdigit() and offset + int(declared) > layer.size:
        raise _too_long(layer, host)


class _BodyReader:
    """A response body as a file for :meth:`BlobStore.put_stream`, held to the declared size; ``stop`` set (the
    other downloading thread failed) ends it at the next read."""

    def __init__(self, r: httpx.Response, layer: Descriptor, host: str, stop: threading.Event):
        self._it = iter_body(r, CHUNK)
        self._layer, self._host, self._stop = layer, host, stop
        self._seen = 0

    def read(self, n: int = -1) -> bytes:
        if self._stop.is_set():
            raise _Stopped
        try:
            chunk = next(self._it, b"")
        except httpx.TransportError as err:
            raise SourceError(f"the connection to {self._host} broke during blob {self._layer.digest.hex[:12]} "
                              f"({type(err).__name__}); run the pull again") from None
        self._seen += len(chunk)
        if self._seen > self._layer.size:
            raise _too_long(self._layer, self._host)
        if not chunk and self._seen < self._layer.size:
            raise SourceError(f"registry {self._host} ended blob {self._layer.digest.hex[:12]} after {self._seen} "
                              f"of {self._layer.size} bytes; run the pull again")
        return chunk


class _Stopped(Exception):
    """Raised on one downloading thread when the other failed; the other's error is the one the pull raises."""


def _serialized(progress: ProgressFn) -> ProgressFn:
    """``progress`` called by one thread at a time: the layers download on two."""
    lock = threading.Lock()

    def report(status: str, completed: int, total: int | None) -> None:
        with lock:
            progress(status, completed, total)

    return report


class _Ticker:
    """Progress per layer, at most every MiB or tenth of a second: a status per network read would flood the
    NDJSON stream."""

    def __init__(self, report: Callable[[int], None]):
        self._report = report
        self.done = 0
        self._shown = -1
        self._at = 0.0

    def set(self, done: int) -> None:
        self.done = done
        self.flush()

    def add(self, n: int) -> None:
        self.done += n
        if self.done - self._shown >= TICK_BYTES or time.monotonic() - self._at > 0.1:
            self.flush()

    def flush(self) -> None:
        if self.done != self._shown:
            self._report(self.done)
            self._shown, self._at = self.done, time.monotonic()


def pull_from_registry(store: "Store", ref: Reference, progress: ProgressFn, config: RegistryConfig) -> Manifest:
    return RegistryPull(store, ref, config, progress).run()


__all__ = ["Plan", "RegistryPull", "plan_of", "pull_from_registry"]
