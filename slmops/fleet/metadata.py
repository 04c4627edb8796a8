"""Signed desired-state metadata, TUF-style: the envelope the control plane seals and a device opens.

The fleet's trust has two levels, as in TUF. An offline **root** key signs root metadata (python-tuf's ``Root``)
naming the keys of the ``targets`` role; a device gets that root.json once, at enrolment, and trusts nothing else.
The online ``targets`` key signs every desired-state document the control plane serves::

    {"signed": {"_type": "slmops-desired", "spec_version": "1.0", "device_id": …, "version": 7,
                "issued_at": 1760000000, "expires": 1760003600, "release": …, "config": …},
     "signatures": [{"keyid": "<sha256 hex>", "sig": "<hex>"}]}

Signatures are over the OLPC canonical JSON of ``signed`` (securesystemslib's ``encode_canonical``, exactly what
TUF signs) and are checked with ``Root.verify_delegate``'s threshold logic, so any TUF tooling reads the keys, the
key ids and the signatures. ``_type`` keeps a desired-state document from ever passing for TUF targets metadata
signed by the same key, or the other way round.

Canonical JSON has no floats (TUF metadata carries none): times in ``signed`` are whole seconds, and any other
float (a config value such as ``keep_alive: 1.5``) travels as an integer when it is one, else as its shortest
decimal text, which the deployment config's number-or-text fields read the same way. Everything else of a
document is signed as it is.

Opening is cheap and allocation-light on purpose, since a simulator verifies thousands of documents a second:
one JSON decode, one canonical encoding (~25-40 µs for a document with a signature bundle) and one Ed25519 check
(~120-160 µs on this kind of 2-core machine): about 0.2 ms in all. Shared by the control plane, the agent and the
simulator; nothing here imports the engine or the server.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec
from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Key, Signature, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root

from slmops.types.errors import IntegrityError

TYPE = "slmops-desired"  # the ``_type`` of a desired-state document
SPEC_VERSION = "1.0"  # a device refuses a document whose major version it does not know
ROLE = "targets"  # the root's role whose keys sign desired state
ROOT_LIFETIME = timedelta(days=3650)  # root metadata is re-signed only by a rotation, which is not built yet
REASONS = frozenset({"signature", "unknown_key", "expired", "rollback", "device", "malformed"})

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Refused(IntegrityError):
    """A desired-state document a device must not act on. ``reason`` is one of :data:`REASONS`: ``signature``
    (a trusted key's signature does not verify: altered), ``unknown_key`` (no key of the trust root signed it),
    ``expired``, ``rollback`` (older than a version the device has seen), ``device`` (another device's document),
    ``malformed`` (not a document of this format)."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(message)


def canonical(signed: dict[str, Any]) -> bytes:
    """The bytes signatures are over: OLPC canonical JSON, as TUF signs (FormatError on a float)."""
    return encode_canonical(signed).encode("utf-8")  # type: ignore[union-attr]  # None only with an output_function


def _plain(value: Any) -> Any:
    """``value`` with no float left (see the module docstring): integral floats as integers, others as text."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else repr(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def seal(signer: Signer, document: dict[str, Any], expires: float) -> bytes:
    """``document`` (a ``DesiredState``'s fields) signed by ``signer`` with an expiry (epoch seconds, the control
    plane's clock), as the served ``SignedDesired`` JSON bytes."""
    signed = _plain({**document, "_type": TYPE, "spec_version": SPEC_VERSION, "expires": int(expires)})
    signature = signer.sign(canonical(signed))
    return _encode({"signed": signed, "signatures": [signature.to_dict()]})


def open_envelope(root: Root, data: bytes | dict[str, Any]) -> dict[str, Any]:
    """The ``signed`` part of a served document once the ``targets`` keys of ``root`` have signed it to their
    threshold; :class:`Refused` (``malformed``, ``signature`` or ``unknown_key``) otherwise. Expiry, version and
    device are the caller's to judge (``slmops.fleet.agent.trust``): they need the device's own state."""
    signed, signatures = _envelope(data)
    try:
        payload = canonical(signed)
    except FormatError:
        raise Refused("malformed", "desired state holds a value canonical JSON cannot sign (a float?); "
                                   "refused") from None
    result = root.get_verification_result(ROLE, payload, signatures)
    if not result.verified:
        known = set(root.roles[ROLE].keyids) & signatures.keys()
        if known:
            raise Refused("signature", f"desired state version {signed.get('version')!r}: signed by "
                                       f"{len(result.signed)} of the {result.threshold} trusted key(s) needed; "
                                       "a signature does not verify (the document was altered); refused")
        raise Refused("unknown_key", "desired state is signed by no key this device's trust root names (another "
                                     "control plane's, or a forged document); refused")
    if signed.get("_type") != TYPE:
        raise Refused("malformed", f"metadata of type {signed.get('_type')!r} where desired state was expected; "
                                   "refused")
    spec = signed.get("spec_version")
    if not isinstance(spec, str) or spec.split(".")[0] != SPEC_VERSION.split(".")[0]:
        raise Refused("malformed", f"desired state of format {spec!r} (this agent reads {SPEC_VERSION}); "
                                   "upgrade the agent")
    return signed


def _envelope(data: bytes | dict[str, Any]) -> tuple[dict[str, Any], dict[str, Signature]]:
    """``signed`` and the signatures by key id; the caller's dict is left as it was."""
    if not isinstance(data, dict):
        try:
            data = _decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError):
            data = None
    signed = data.get("signed") if isinstance(data, dict) else None
    listed = data.get("signatures") if isinstance(data, dict) else None
    if not isinstance(signed, dict) or not isinstance(listed, list):
        raise Refused("malformed", "not signed desired state ({signed, signatures}); is the control plane older "
                                   "than this agent?")
    signatures: dict[str, Signature] = {}
    for item in listed:
        if not (isinstance(item, dict) and isinstance(item.get("keyid"), str) and isinstance(item.get("sig"), str)):
            raise Refused("malformed", "desired state with a malformed signature entry; refused")
        sig = Signature.from_dict(dict(item))  # from_dict empties the dict it is given
        if sig.keyid in signatures:
            raise Refused("malformed", f"desired state signed twice by key {sig.keyid[:12]}; refused")
        signatures[sig.keyid] = sig
    return signed, signatures


# -- root metadata ---------------------------------------------------------------------------------------------
def make_root(root_signer: Signer, targets: list[Key], *, version: int = 1, threshold: int = 1,
              expires: datetime | None = None) -> dict[str, Any]:
    """root.json (a dict): ``root_signer``'s key for the root role, ``targets`` (``threshold`` of them) for the
    targets role, signed by ``root_signer``. The snapshot and timestamp roles TUF requires are left without keys:
    desired state is one document per device, with its own version and expiry, so they have nothing to sign."""
    root = Root(version=version, expires=expires or datetime.now(UTC) + ROOT_LIFETIME,
                consistent_snapshot=False)
    root.add_key(root_signer.public_key, "root")
    for key in targets:
        root.add_key(key, ROLE)
    root.roles[ROLE].threshold = threshold
    metadata = Metadata(root)
    metadata.sign(root_signer)
    return metadata.to_dict()


def load_root(root_json: dict[str, Any]) -> Root:
    """The ``Root`` of ``root_json`` once its own root keys have signed it to their threshold; ValueError (with
    a short reason) for anything else. Root expiry is not judged: without rotation a root is replaced only by
    enrolling again, and a device must not stop trusting its control plane on a date."""
    try:
        metadata = Metadata.from_dict(copy.deepcopy(root_json))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"not TUF root metadata ({err.__class__.__name__}: {err})") from None
    if metadata.signed.type != Root.type:
        raise ValueError(f"metadata of type {metadata.signed.type!r}, not root")
    root = cast(Root, metadata.signed)
    try:
        root.verify_delegate("root", metadata.signed_bytes, metadata.signatures)
    except UnsignedMetadataError as err:
        raise ValueError(f"its root keys did not sign it ({err})") from None
    if not root.roles[ROLE].keyids:
        raise ValueError("it names no targets key")
    return root


def names(root: Root, role: str, key: Key) -> bool:
    """Whether ``root`` lists ``key`` (the same key, not only its id) among the keys of ``role``."""
    return key.keyid in root.roles[role].keyids and root.keys.get(key.keyid) == key
