"""Device identity and request signatures, shared by the control plane (verifies) and the agent (signs).

A device makes its own Ed25519 key and never lets the private half leave it; the control plane stores only the raw
32-byte public key it was shown at enrolment. Every later request carries

    Authorization: Slmops-Device id="dev_0123456789ab",ts="1733200000",sig="<base64url, no padding>"

where ``sig`` signs ``METHOD\\nPATH?QUERY\\nTS\\nsha256-hex(body)``. The method is an upper-case token and the body
enters as a fixed-length hash, so the four fields parse back one way only. A timestamp more than ``skew`` seconds
from the server's clock is refused with :class:`ClockSkew`, which carries the server's time: the agent corrects
its offset (:func:`server_time_offset` reads it from the answer's ``Slmops-Server-Time``, :func:`clock_offset`
from its ``Date``) and retries.

The enrolment proof signs ``ENROL_CONTEXT + token``. The context starts with a lower-case letter and holds a NUL
byte, neither of which a request's signing input can start with or contain before the path, so a captured request
signature can never pass as a proof of possession, nor a proof as a request.

Verification runs on every poll: public keys are parsed once per distinct raw key (an LRU cache), and the header
is matched by one compiled expression.

Sessions. An Ed25519 verification costs 130-350 µs of server CPU, more than the rest of a poll, so a device proves
itself once per session instead of once per request: a signed ``POST /fleet/v1/device/session`` returns a token
that later requests carry as

    Authorization: Slmops-Session dev_0123456789ab.1733200900.1.<base64url HMAC-SHA256, no padding>

The token is the device id, its expiry (server seconds) and the epoch of the server secret that MACs them
(``session_input``); checking it is one HMAC and a constant-time compare, a few µs. The secret is random, kept in
the control plane's database so every replica shares it, and never logged nor written to the ledger; epochs let a
new secret take over while tokens made under the old one run out. Whoever can read that table can make tokens for
any device, so it is as sensitive as the database itself (whoever can write the database can do more). A token is
refused once it expires, when its MAC does not hold (forged, altered, another secret), and, since the control
plane checks its device's row on every request as it does for signatures, as soon as the device is revoked.

What a stolen token allows: requests as that one device (its own desired state, its own reports) until it
expires, 15 minutes (``DEFAULT_SESSION_S``) after it was made; nothing else, and it cannot be renewed: a new token
needs a fresh Ed25519 signature, so the private key. Tokens travel only in the Authorization header, over TLS like
every request to a deployed control plane. The private key still never leaves the device: the token is the
server's statement about the device, made after the device proved itself with the key, not a copy of anything
secret the device holds.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import hashlib
import hmac
import math
import os
import re
import secrets
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from slmops.store.atomic import atomic_writer
from slmops.types.errors import ConfigError, InvalidInput, Unauthenticated

SCHEME = "Slmops-Device"
SESSION_SCHEME = "Slmops-Session"
ENROL_CONTEXT = b"slmops fleet enrolment proof v1\x00"
SESSION_CONTEXT = b"slmops fleet session v1\x00"
DEFAULT_SKEW = 300
DEFAULT_SESSION_S = 900  # a session token's lifetime
DEVICE_ID_RE = re.compile(r"^dev_[0-9a-f]{12}$")
_HEADER_RE = re.compile(r'^(?i:slmops-device)[ ]+id="(dev_[0-9a-f]{12})",[ ]*ts="([0-9]{1,12})",[ ]*'
                        r'sig="([A-Za-z0-9_-]{86})"[ ]*$')
_SESSION_RE = re.compile(r"^(?i:slmops-session)[ ]+((dev_[0-9a-f]{12})\.([0-9]{1,12})\.([0-9]{1,9}))\."
                         r"([A-Za-z0-9_-]{43})[ ]*$")
_SESSION_HINT = ("renew the session: POST /fleet/v1/device/session signed with the device's key "
                 f"({SCHEME} Authorization), then send {SESSION_SCHEME} <token>")
_METHOD_RE = re.compile(r"^[A-Z]{1,16}$")
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_FORMAT_HINT = (f'send Authorization: {SCHEME} id="dev_<12 hex>",ts="<unix seconds>",sig="<base64url Ed25519 '
                'signature>"')


class ClockSkew(Unauthenticated):
    """A well-signed request whose timestamp is too far from the server's clock; ``server_time`` says by how much."""

    def __init__(self, ts: int, server_time: float, skew: float):
        self.ts = ts
        self.server_time = server_time
        self.offset = server_time - ts  # what the device should add to its clock
        super().__init__(f"request time {ts} is {ts - server_time:+.0f} s from the server's clock ({server_time:.0f}, "
                         f"allowed ±{skew:.0f} s); correct the device's clock or its offset and retry")


@dataclass(frozen=True, slots=True)
class Signed:
    """A parsed ``Authorization`` header; ``sig`` is the decoded 64-byte signature."""

    device_id: str
    ts: int
    sig: bytes


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Base64url with or without padding; raises ValueError on anything else."""
    if not isinstance(text, str) or not _B64URL_RE.match(text):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None


def new_device_id() -> str:
    return f"dev_{secrets.token_hex(6)}"


def signing_input(method: str, path_qs: str, ts: int, body: bytes) -> bytes:
    """The bytes a request signature covers (see the module docstring)."""
    if not _METHOD_RE.match(method):
        raise InvalidInput(f"HTTP method {method!r} cannot be signed; use an upper-case method such as GET or POST")
    return f"{method}\n{path_qs}\n{ts}\n{hashlib.sha256(body).hexdigest()}".encode()


def enrol_input(token: str | bytes) -> bytes:
    return ENROL_CONTEXT + (token.encode() if isinstance(token, str) else token)


@lru_cache(maxsize=1 << 16)
def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    """The key object for 32 raw bytes, parsed once per distinct key (raises ValueError for a wrong length)."""
    return Ed25519PublicKey.from_public_bytes(raw)


class DeviceKey:
    """The device's private key. Made on the device; stored PKCS#8 PEM, mode 0600, written atomically."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public_raw: bytes = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                                   serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        """The key saved at ``path``; refuses a file others can read, as ssh does."""
        return cls(read_private_key(Path(path), "device key", missing="no device key there; enrol this device first",
                                    wrong="not an Ed25519 device key; remove it and enrol this device again"))

    def save(self, path: Path) -> None:
        """Write atomically with mode 0600 (the folder is made 0700 if it does not exist)."""
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        with atomic_writer(path) as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(pem)

    @property
    def public_b64(self) -> str:
        return b64url(self.public_raw)

    def sign(self, data: bytes) -> str:
        return b64url(self._private.sign(data))

    def prove(self, token: str | bytes) -> str:
        """The enrolment proof of possession for ``token``."""
        return self.sign(enrol_input(token))

    def authorization(self, device_id: str, method: str, path_qs: str, body: bytes, ts: int) -> str:
        """The ``Authorization`` header value for one request; ``path_qs`` exactly as sent (path, ``?``, query)."""
        if not DEVICE_ID_RE.match(device_id):
            raise InvalidInput(f"device id {device_id!r} is not dev_<12 hex>; use the id enrolment returned")
        if "\n" in path_qs:
            raise InvalidInput("a request path cannot contain a newline")
        sig = self.sign(signing_input(method, path_qs, int(ts), body))
        return f'{SCHEME} id="{device_id}",ts="{int(ts)}",sig="{sig}"'


def parse_authorization(value: str | None) -> Signed:
    """The header's fields, or :class:`Unauthenticated` saying what the header should look like."""
    m = _HEADER_RE.match(value) if value else None
    if m is None:
        raise Unauthenticated(f"no device signature: {_FORMAT_HINT}")
    return Signed(m[1], int(m[2]), base64.urlsafe_b64decode(m[3] + "=="))  # 86 checked characters: 64 bytes


def verify_request(signed: Signed, public_key_raw: bytes, method: str, path_qs: str, body: bytes, now: float,
                   skew: float = DEFAULT_SKEW) -> None:
    """Raise :class:`Unauthenticated` unless the device's key signed this very request, or :class:`ClockSkew` when
    it did but too far from ``now``. The signature is checked first: a skew answer promises the key holder that
    only its clock is wrong, so correcting the offset and retrying will work."""
    try:
        key = public_key_from_raw(public_key_raw)
        key.verify(signed.sig, signing_input(method, path_qs, signed.ts, body))
    except (InvalidSignature, ValueError, InvalidInput):
        raise Unauthenticated(f"device signature of {signed.device_id} does not match this request; sign "
                              "METHOD\\nPATH?QUERY\\nTS\\nsha256(body) with the key this device enrolled with "
                              "(enrol again if it was lost)") from None
    if abs(now - signed.ts) > skew:
        raise ClockSkew(signed.ts, now, skew)


def verify_proof(public_b64: str, token: str | bytes, proof_b64: str) -> bytes:
    """The raw public key when ``proof_b64`` signs ``ENROL_CONTEXT + token`` under it; else :class:`InvalidInput`
    for a malformed key, :class:`Unauthenticated` for a proof that does not hold."""
    try:
        raw = unb64url(public_b64)
        key = public_key_from_raw(raw)
    except ValueError:
        raise InvalidInput("public_key: must be a raw 32-byte Ed25519 public key as base64url") from None
    try:
        key.verify(unb64url(proof_b64), enrol_input(token))
    except (InvalidSignature, ValueError):
        raise Unauthenticated("enrolment proof does not match: sign ENROL_CONTEXT + token with the private key of "
                              "the public key sent") from None
    return raw


def clock_offset(date_header: str, local_now: float) -> float:
    """Seconds to add to the local clock to match the server's, from an HTTP ``Date`` header (1 s resolution)."""
    try:
        when = email.utils.parsedate_to_datetime(date_header)
        server = (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()
    except (TypeError, ValueError, IndexError):
        raise InvalidInput(f"Date header {date_header!r} is not an HTTP date; the server must send RFC 9110 "
                           "dates") from None
    return server - local_now


# -- sessions -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Session:
    """A verified session token's fields."""

    device_id: str
    expires_at: int
    epoch: int


def is_session(authorization: str | None) -> bool:
    """Whether an ``Authorization`` value uses the session scheme (else it should be a signature)."""
    return authorization is not None and authorization[:15].lower() == "slmops-session "


def session_input(device_id: str, expires_at: int, epoch: int) -> bytes:
    """The bytes a session token's MAC covers; the context keeps it apart from anything else the secret could MAC."""
    return SESSION_CONTEXT + f"{device_id}.{expires_at}.{epoch}".encode()


def mint_session(secret: bytes, epoch: int, device_id: str, expires_at: int) -> str:
    """A session token for ``device_id`` until ``expires_at`` (server seconds), MACed with the epoch's secret."""
    if not DEVICE_ID_RE.match(device_id):
        raise InvalidInput(f"device id {device_id!r} is not dev_<12 hex>")
    mac = hmac.digest(secret, session_input(device_id, int(expires_at), epoch), "sha256")
    return f"{device_id}.{int(expires_at)}.{epoch}.{b64url(mac)}"


def verify_session(authorization: str | None, secrets_by_epoch: dict[int, bytes], now: float) -> Session:
    """The session an ``Authorization: Slmops-Session <token>`` value proves, or :class:`Unauthenticated`: a token
    that is malformed, names an unknown secret, carries a MAC that does not hold, or has expired. The MAC is
    checked before the expiry, so only a token the server made learns that it merely expired."""
    m = _SESSION_RE.match(authorization) if authorization else None
    if m is None:
        raise Unauthenticated(f"no valid session token: {_SESSION_HINT}")
    secret = secrets_by_epoch.get(int(m[4]))
    if secret is not None:
        expected = hmac.digest(secret, SESSION_CONTEXT + m[1].encode(), "sha256")
        if hmac.compare_digest(b64url(expected), m[5]):
            expires_at = int(m[3])
            if now >= expires_at:
                raise Unauthenticated(f"session token of {m[2]} expired at {expires_at}; {_SESSION_HINT}")
            return Session(m[2], expires_at, int(m[4]))
    raise Unauthenticated(f"session token does not hold (forged, altered, or from another control plane); "
                          f"{_SESSION_HINT}")


def server_time_offset(value: str, local_now: float) -> float:
    """Seconds to add to the local clock, from a clock-skew answer's ``Slmops-Server-Time`` (unix seconds)."""
    try:
        server = float(value)
    except (TypeError, ValueError):
        server = math.nan
    if not math.isfinite(server):
        raise InvalidInput(f"Slmops-Server-Time {value!r} is not a number of seconds; the server must send unix "
                           "seconds")
    return server - local_now


def read_private_key(path: Path, what: str, *, missing: str, wrong: str) -> Ed25519PrivateKey:
    """An Ed25519 private key (PKCS#8 PEM) from ``path``, refusing a file others can read, as ssh does. ``missing``
    and ``wrong``: what to tell the user when the file is absent or holds something else."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror}); check its owner") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise ConfigError(f"{path}: the {what} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"run chmod 600 {path}")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        private = None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{path}: {wrong}")
    return private
