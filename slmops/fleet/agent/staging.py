"""Staging a release in a slot: pull the variant (digest-pinned, only the blobs the store lacks), check it, and
store it under the slot's hidden name.

Names. A slot's model is stored as ``slot/<release name>-<a|b>:<version>`` (``slot/smollm2-b:2.0.0``; a version's
characters outside the tag grammar become ``_``): a name no catalog or registry pull writes, one per slot and
version, so a new release never reuses the name of a model the server may still have loaded. The pull itself lands
under the reference's own name (``host/namespace/model:tag``), whose manifest bytes are then stored under the
slot name as they are (the registry's digest, the one the signature covers), and the registry name is removed
again unless it was in the store before.

Checks, before the slot is used:

* the reference must pin the release's manifest digest, and the registry must serve exactly that manifest (the
  registry client refuses other bytes); each blob is checked against its digest as it arrives;
* the stored manifest's digest must equal the target's ``manifest_digest`` (an artifact holding a bare GGUF gets a
  manifest made on the device, whose config records the registry's digest: that one must);
* with trusted keys (``SLMOPS_TRUSTED_KEYS``), the target's model-signing bundle must verify with one of them
  over the stored manifest and blobs; an unsigned target is refused. Without trusted keys the bundle is kept
  beside the model (so the server verifies it once keys are set) and the release is taken on the strength of its
  digest, which the signed desired state pins; the agent logs that model signatures go unchecked and that setting
  ``SLMOPS_TRUSTED_KEYS`` to the publisher's public key checks them.

Everything here is synchronous (the store and registry client are); the agent runs it on a thread.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from slmops.api.fleet import ReleaseTarget
from slmops.store.atomic import atomic_writer
from slmops.store.registry_auth import RegistryConfig
from slmops.store.store import Store
from slmops.types.digest import Digest
from slmops.types.errors import IntegrityError, SlmopsError, UntrustedModel
from slmops.types.name import ModelName, Reference

log = logging.getLogger("slmops.agent")
NAMESPACE = "slot"
Progress = Callable[[str, int, int | None], None]


def slot_name(release: str, slot: str) -> ModelName:
    """The hidden store name of ``release`` (NAME:VERSION) staged in ``slot``."""
    name, _, version = release.partition(":")
    tag = re.sub(r"[^a-z0-9_.-]", "_", version.lower())[:80] or "latest"
    if not re.match(r"[a-z0-9_]", tag):
        tag = "_" + tag[1:]
    return ModelName.parse(f"{NAMESPACE}/{name.lower()[:77]}-{slot}:{tag}")


def _quiet(status: str, completed: int, total: int | None) -> None:
    pass


class Stager:
    """Stages release targets into ``store`` (the served store, opened without a trust policy: signatures are
    checked here against ``trusted_keys``, with the target's own bundle)."""

    def __init__(self, store: Store, registry: RegistryConfig, trusted_keys: Sequence[Path] = ()):
        self.store = store
        self.registry = registry
        self.trusted_keys = list(trusted_keys)
        self._warned = False

    def stage(self, target: ReleaseTarget, slot: str, replaces: str | None = None,
              progress: Progress = _quiet) -> ModelName:
        """Pull ``target`` and store it as ``slot``'s model; ``replaces``: the slot's previous model, removed once
        the new one is in (blobs both use stay). Raises IntegrityError/UntrustedModel for a target that must not
        run, SourceError when the registry cannot be reached (worth another try)."""
        ref = Reference.parse(target.reference)
        if ref.digest is None or str(ref.digest) != target.manifest_digest:
            raise IntegrityError(f"release {target.release}: reference {target.reference} does not pin its manifest "
                                 f"digest {target.manifest_digest}; refused")
        existed = self.store.exists(ref.name)
        self.store.pull(ref, progress, registry=self.registry)
        dst = slot_name(target.release, slot)
        try:
            self._store_as(ref.name, dst, target)
        finally:
            if not existed and ref.name != dst:
                self.store.remove(ref.name)
        try:
            self._check_signature(dst, target)
        except SlmopsError:
            self.store.remove(dst)
            raise
        if replaces and replaces != dst.display:
            self.drop(replaces)
        return dst

    def drop(self, model: str) -> None:
        """Remove a slot's model from the store (blobs another model uses stay)."""
        name = ModelName.parse(model)
        if self.store.exists(name):
            self.store.remove(name)

    def _store_as(self, pulled: ModelName, dst: ModelName, target: ReleaseTarget) -> None:
        """The pulled manifest, byte for byte, under the slot name, once its digest is the target's."""
        with self.store.writing():
            data = self.store.manifest_bytes(pulled)
            digest = str(Digest.of_bytes(data))
            if digest != target.manifest_digest and \
                    self.store.config(pulled).get("source_manifest") != target.manifest_digest:
                raise IntegrityError(f"release {target.release}: the pulled manifest is {digest}, not the release's "
                                     f"{target.manifest_digest}; refused")
            self.store.manifests.put_bytes(dst, data)
            sig = self.store.signature_path(dst)
            sig.unlink(missing_ok=True)
            if target.signature:
                sig.parent.mkdir(parents=True, exist_ok=True)
                with atomic_writer(sig) as f:
                    f.write(_bundle(target))

    def _check_signature(self, dst: ModelName, target: ReleaseTarget) -> None:
        if not self.trusted_keys:
            if target.signature and not self._warned:
                self._warned = True
                log.warning("release %s is signed, but this device has no SLMOPS_TRUSTED_KEYS: model signatures "
                            "go unchecked (the signed desired state pins each manifest digest); set "
                            "SLMOPS_TRUSTED_KEYS to the publisher's public key to check them", target.release)
            return
        if not target.signature:
            raise UntrustedModel(f"release {target.release} ({target.variant}) is not signed and this device "
                                 "requires signatures (SLMOPS_TRUSTED_KEYS); publish a signed variant")
        # model-signing loads only when a signature is checked
        from slmops.security.signing import verify
        verify(self.store, dst, self.trusted_keys)


def _bundle(target: ReleaseTarget) -> bytes:
    try:
        return base64.b64decode(target.signature or "", validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError(f"release {target.release}: its signature is not base64; refused") from None


__all__ = ["NAMESPACE", "Stager", "slot_name"]
