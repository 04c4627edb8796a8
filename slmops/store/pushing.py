"""Pushing a model of the store to a registry: blobs the registry lacks, the signature, then the manifest.

The manifest goes up byte for byte as stored, so its digest on the registry is the one ``slmops list`` shows and
a pull of it stores the same bytes again. Blobs are read through :meth:`BlobStore.chunks`: a sealed store
(``SLMOPS_STORE_KEY``) pushes the plaintext its manifest's digests name, never the sealed file. Each blob is
hashed as it is read and its upload is only closed (the final ``PUT ...?digest=``) when the bytes match the
manifest, so a blob damaged on disk never reaches the registry under a digest it does not have.

Small blobs go up in one ``PUT`` (the distribution spec's monolithic upload, one round trip); large ones in
``PATCH`` chunks, so no more than one chunk is ever held in memory and a proxy's body limit is not hit. A blob the
registry already has (``HEAD`` answers 200) is not sent again: a second push of the same model moves only the
manifest.

A signature (``signatures/`` of the store) travels as an OCI artifact tagged ``sha256-<manifest hex>.sig`` whose
one layer is the bundle, which :mod:`slmops.store.pulling` fetches. It is put before the model's manifest: a
puller never sees the new model tagged without its signature (with a trust policy, it would be refused).

Order of failure: anything that fails before the manifest ``PUT`` leaves the tag as it was on the registry (blobs
that were uploaded stay there, unreferenced, as after an interrupted ``docker push``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from slmops.store.network import check_registry_host
from slmops.store.registry import DOCKER_MANIFEST, OCI_MANIFEST, Descriptor, RegistryClient, descriptor, \
    parse_manifest
from slmops.store.registry_auth import RegistryConfig
from slmops.types.digest import Digest
from slmops.types.errors import IntegrityError, InvalidInput, ModelNotFound, NotFound
from slmops.types.name import Reference

if TYPE_CHECKING:
    from slmops.store.store import Store

ProgressFn = Callable[[str, int, int | None], None]
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"


@dataclass(frozen=True)
class PushLimits:
    """Blobs up to ``monolithic_max`` bytes go in one PUT; larger ones in PATCH chunks of ``chunk_size``."""

    monolithic_max: int = 64 << 20
    chunk_size: int = 16 << 20


@dataclass
class PushResult:
    digest: Digest  # the manifest's, as the registry now serves it
    uploaded: list[Digest] = field(default_factory=list)  # blobs sent (the registry lacked them)
    signed: bool = False


def signature_manifest(bundle: bytes) -> bytes:
    """The OCI artifact that carries a signature bundle: an empty config and the bundle as its one layer."""
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": BUNDLE_MEDIA_TYPE,
           "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": str(Digest.of_bytes(EMPTY)), "size": len(EMPTY)},
           "layers": [{"mediaType": BUNDLE_MEDIA_TYPE, "digest": str(Digest.of_bytes(bundle)),
                       "size": len(bundle)}]}
    return json.dumps(doc, separators=(",", ":")).encode()


class RegistryPush:
    """One push of the model stored under ``ref``'s name to the registry ``ref`` names."""

    def __init__(self, store: "Store", ref: Reference, config: RegistryConfig, progress: ProgressFn,
                 limits: PushLimits = PushLimits()):
        if not ref.host_given:
            raise InvalidInput(f'"{ref.name.display}" names no registry; copy it to a name with one first: '
                               f"slmops cp {ref.name.display} host[:port]/namespace/{ref.name.model}:{ref.name.tag}")
        if ref.digest is not None:
            raise InvalidInput(f"{ref.display} pins a manifest digest; push by tag (host/namespace/model:tag)")
        if ref.scheme == "http" and not config.insecure:
            raise InvalidInput(f"{ref.display} is plain HTTP; push with --insecure (insecure: true on /api/push) "
                               "to allow it")
        if limits.chunk_size <= 0:
            raise InvalidInput("the push chunk size must be at least one byte")
        self.store, self.ref, self.config, self.progress, self.limits = store, ref, config, progress, limits

    def run(self) -> PushResult:
        store, name = self.store, self.ref.name
        try:  # before the first status line, so that /api/push answers these with an error status
            data = store.manifest_bytes(name)
        except ModelNotFound:
            raise NotFound(f'model "{name.display}" not found; nothing to push (slmops list shows the models '
                           "in the store)") from None
        doc = parse_manifest(data, f"manifest of {name.display}")
        blobs = _unique([descriptor(d, "manifest") for d in [doc["config"], *doc["layers"]]])
        sig_path = store.signature_path(name)
        bundle = sig_path.read_bytes() if sig_path.is_file() else None
        check_registry_host(name.host, store.allow_internal_registries)  # before any connection
        self.progress("retrieving manifest", 0, None)
        result = PushResult(Digest.of_bytes(data))
        # the shared store lock: a prune or rm running meanwhile cannot take the blobs from under the upload
        with store.writing(), RegistryClient(name.host, self.config, store.allow_internal_registries,
                                             self.ref.scheme) as client:
            for blob in blobs:
                if self._push_blob(client, blob):
                    result.uploaded.append(blob.digest)
            if bundle is not None:
                self.progress("pushing signature", 0, None)
                self._push_signature(client, result.digest, bundle)
                result.signed = True
            self.progress("pushing manifest", 0, None)
            client.put_manifest(self.ref.repository, name.tag, data, doc.get("mediaType") or DOCKER_MANIFEST)
        self.progress("success", 0, None)
        return result

    # -- blobs ---------------------------------------------------------------------------------------------------
    def _push_blob(self, client: RegistryClient, blob: Descriptor) -> bool:
        """Returns whether the blob was sent (False: the registry had it)."""
        status = f"pushing {blob.digest.hex[:12]}"
        repo = self.ref.repository
        if client.has_blob(repo, blob.digest):
            self.progress(status, blob.size, blob.size)
            return False
        if not self.store.blobs.has(blob.digest):
            raise IntegrityError(f"blob {blob.digest.hex[:12]} of {self.ref.name.display} is missing from the "
                                 "store; pull or create the model again")
        self.progress(status, 0, blob.size)
        location = client.start_upload(repo)
        pieces = self._pieces(blob, self.limits.chunk_size if blob.size > self.limits.monolithic_max else None)
        offset, last = 0, b""
        for piece in pieces:
            if last:
                location = client.upload_chunk(location, last, offset)
                offset += len(last)
                self.progress(status, offset, blob.size)
            last = piece
        client.finish_upload(location, blob.digest, last)  # _pieces has checked the digest by now
        self.progress(status, blob.size, blob.size)
        return True

    def _pieces(self, blob: Descriptor, size: int | None) -> Iterator[bytes]:
        """The blob's plaintext in pieces of ``size`` bytes (None: all of it in one), hashed on the way; raises
        before the last piece is handed out if the bytes are not the ones the manifest names."""
        h, seen, buf = hashlib.sha256(), 0, bytearray()
        what = f"blob {blob.digest.hex[:12]} of {self.ref.name.display}"
        pending: bytes | None = None
        for chunk in self.store.blobs.chunks(blob.digest, what):
            h.update(chunk)
            seen += len(chunk)
            buf += chunk
            while size is not None and len(buf) >= size:
                if pending is not None:
                    yield pending
                pending, buf = bytes(buf[:size]), buf[size:]
        if seen != blob.size or Digest(h.hexdigest()) != blob.digest:
            raise IntegrityError(f"{what} does not match its digest in the store (damaged on disk?); nothing was "
                                 "pushed for it; run slmops verify")
        if pending is not None:
            yield pending
        if buf or pending is None:
            yield bytes(buf)

    # -- signature -------------------------------------------------------------------------------------------------
    def _push_signature(self, client: RegistryClient, digest: Digest, bundle: bytes) -> None:
        repo = self.ref.repository
        for data in (EMPTY, bundle):
            blob = Digest.of_bytes(data)
            if not client.has_blob(repo, blob):
                client.finish_upload(client.start_upload(repo), blob, data)
        client.put_manifest(repo, f"sha256-{digest.hex}.sig", signature_manifest(bundle), OCI_MANIFEST)


def _unique(blobs: list[Descriptor]) -> list[Descriptor]:
    """A manifest may name one blob twice (a config that is also a layer); it goes up once."""
    unique: dict[Digest, Descriptor] = {}
    for blob in blobs:
        unique.setdefault(blob.digest, blob)
    return list(unique.values())


def push_to_registry(store: "Store", ref: Reference, progress: ProgressFn, config: RegistryConfig,
                     limits: PushLimits = PushLimits()) -> PushResult:
    return RegistryPush(store, ref, config, progress, limits).run()


__all__ = ["PushLimits", "PushResult", "RegistryPush", "push_to_registry", "signature_manifest"]
