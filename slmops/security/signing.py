"""Model signatures in the OpenSSF model-signing format (a Sigstore bundle holding a DSSE envelope over an
in-toto statement), made and checked offline with local EC keys (P-256/P-384) by the ``model-signing`` package.

What is signed: a folder holding ``manifest.json`` (the model's manifest as stored) and ``blobs/sha256-<hex>`` for
every layer it names; the statement lists each file with its sha256, so the signature covers the manifest and
every blob digest, and ``model_signing verify`` can check the same folder by hand. The folder is assembled from
symbolic links for the moment of signing or checking and removed after: to the blob itself, or for a sealed blob
(encryption at rest) to its plaintext in memory, so what is signed is always the plaintext: a signature made on a
plain store verifies on a sealed one and back. Symbolic, not hard, links: a hard link moves the blob's change time,
which would make every blob's verified-marker stale (:meth:`BlobStore.verify`) after each signature check.
Signatures live beside the model, in ``signatures/`` of the store, never inside the signed folder.

A successful check is remembered by (manifest digest, signature digest, key fingerprints). A remembered check
vouches for the digests the manifest names, not for the bytes on disk, so it is used only after every blob was
checked against its digest again (:meth:`Store.verify_blobs`: hashed afresh unless its verified-marker matches
the file as it is now).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from slmops.store.atomic import atomic_writer
from slmops.store.store import Store
from slmops.types.errors import InvalidInput, UntrustedModel
from slmops.types.name import ModelName


@contextlib.contextmanager
def signed_view(store: Store, name: ModelName) -> Iterator[Path]:
    """The folder a signature covers, built from symbolic links (no copies, and the blobs' inodes untouched)."""
    manifest = store.manifest(name)
    tmp = Path(tempfile.mkdtemp(prefix=".sign-view-", dir=store.root))
    try:
        with contextlib.ExitStack() as plain:
            (tmp / "manifest.json").write_bytes(store.manifest_bytes(name))
            (tmp / "blobs").mkdir()
            for layer in manifest.all_layers():
                target = tmp / "blobs" / layer.blob.filename
                if target.is_symlink() or target.exists():
                    continue
                if store.blobs.is_sealed(layer.blob):
                    target.symlink_to(plain.enter_context(store.blobs.plain(layer.blob, f"blob of {name.display}")))
                else:
                    target.symlink_to(store.blob_path(layer.blob).absolute())
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hashing():  # type: ignore[no-untyped-def]
    """Files hashed with sha256, following the view's links to sealed blobs' plaintext."""
    from model_signing import hashing
    return hashing.Config().set_allow_symlinks(True)


def check_key_file(path: Path, what: str, password: str | None = None) -> None:
    """model-signing takes EC keys on P-256 and P-384 only; say so before it fails in its own words."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise InvalidInput(f"{what} {path.name} does not exist or is not a file")
    data = path.read_bytes()
    try:
        if what == "private key":
            key = serialization.load_pem_private_key(data, password.encode() if password else None)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{what} {path.name} cannot be read: {_short(err)} (PEM expected; wrong password?)"
                           ) from None
    curve = getattr(key, "curve", None)
    if not isinstance(curve, (ec.SECP256R1, ec.SECP384R1)):
        raise InvalidInput(f"{what} {path.name} is not an EC P-256 or P-384 key, the kinds model signatures use")


def sign(store: Store, name: ModelName, private_key: Path, password: str | None = None) -> Path:
    """Sign ``name`` with an EC private key (PEM); returns where the signature was written."""
    from model_signing import signing

    check_key_file(private_key, "private key", password)
    target = store.signature_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with signed_view(store, name) as view, tempfile.TemporaryDirectory(dir=target.parent) as out:
        try:
            signing.Config().use_elliptic_key_signer(private_key=private_key, password=password).set_hashing_config(
                _hashing()).sign(
                view, Path(out) / "model.sig")
        except (ValueError, TypeError) as err:
            raise InvalidInput(f"cannot sign with {private_key.name}: {_short(err)} (an EC P-256 or P-384 "
                               "private key in PEM is needed)") from None
        with atomic_writer(target) as f:
            f.write((Path(out) / "model.sig").read_bytes())
    return target


def verify(store: Store, name: ModelName, public_keys: list[Path]) -> Path:
    """Check ``name``'s signature against the trusted keys; returns the key that verified it."""
    from model_signing import verifying

    sig = store.signature_path(name)
    if not sig.is_file():
        raise UntrustedModel(f'model "{name.display}" is not signed; sign it with `slmops sign {name.display} '
                             "--key KEY` using a trusted key")
    missing = next((k for k in public_keys if not k.is_file()), None)
    if missing is not None:
        raise InvalidInput(f"public key {missing.name} does not exist or is not a file")
    memo = _memo_path(store, name, sig, public_keys)
    if memo.is_file():  # checked before with these very keys: no need to parse them on every load...
        store.verify_blobs(name)  # ...but the blobs must still be the ones the manifest (and so the check) names
        return Path(memo.read_text())
    for key in public_keys:
        check_key_file(key, "public key")
    errors = []
    with signed_view(store, name) as view:
        for key in public_keys:
            try:
                verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing()).verify(
                    view, sig)
            except Exception as err:  # model-signing raises ValueError and library-specific errors alike
                errors.append(f"{key.name}: {_short(err)}")
                continue
            memo.parent.mkdir(parents=True, exist_ok=True)
            with atomic_writer(memo) as f:
                f.write(str(key).encode())
            return key
    raise UntrustedModel(f'model "{name.display}" is not signed by a trusted key or was changed after signing '
                         f"({'; '.join(errors)}); sign it again or check SLMOPS_TRUSTED_KEYS")


def _memo_path(store: Store, name: ModelName, sig: Path, keys: list[Path]) -> Path:
    h = hashlib.sha256(store.manifest_bytes(name))
    h.update(sig.read_bytes())
    for key in sorted(keys):
        h.update(key.read_bytes())
    return store.root / "cache" / "signatures" / h.hexdigest()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]


class TrustPolicy:
    """``SLMOPS_TRUSTED_KEYS``: with keys set, a model must carry a valid signature from one of them before it is
    loaded, pulled or used as the base of a new model."""

    def __init__(self, public_keys: list[Path]):
        self.public_keys = public_keys

    def __call__(self, store: Store, name: ModelName) -> None:
        verify(store, name, self.public_keys)
