"""Device identity and request signatures: what a signature binds, what it refuses, and the key on disk."""

from __future__ import annotations

import base64
import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.fleet.deviceauth import (
    ENROL_CONTEXT,
    ClockSkew,
    DeviceKey,
    Signed,
    b64url,
    clock_offset,
    new_device_id,
    parse_authorization,
    public_key_from_raw,
    signing_input,
    verify_proof,
    verify_request,
)
from slmops.types.errors import ConfigError, InvalidInput, Unauthenticated

DEV = "dev_0123456789ab"
PATH = "/fleet/v1/device/reports?window=60"
BODY = b'{"requests": 12}'
TS = 1733200000


@pytest.fixture(scope="module")
def key() -> DeviceKey:
    return DeviceKey.generate()


def signed(key: DeviceKey, method: str = "POST", path: str = PATH, body: bytes = BODY, ts: int = TS) -> Signed:
    return parse_authorization(key.authorization(DEV, method, path, body, ts))


def test_header_format_and_round_trip(key):
    header = key.authorization(DEV, "POST", PATH, BODY, TS)
    assert header.startswith(f'Slmops-Device id="{DEV}",ts="{TS}",sig="')
    sig = header.rsplit('sig="', 1)[1].rstrip('"')
    assert "=" not in sig and len(sig) == 86
    s = parse_authorization(header)
    assert (s.device_id, s.ts, len(s.sig)) == (DEV, TS, 64)
    verify_request(s, key.public_raw, "POST", PATH, BODY, now=TS + 10)


def test_signature_covers_exactly_the_documented_input(key):
    """A verifier written from the documentation alone (not this module) accepts the signature."""
    s = signed(key)
    message = f"POST\n{PATH}\n{TS}\n{hashlib.sha256(BODY).hexdigest()}".encode()
    assert signing_input("POST", PATH, TS, BODY) == message
    Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key.public_b64 + "=")).verify(s.sig, message)


@pytest.mark.parametrize("change", ["body", "path", "query", "method", "ts"])
def test_tampered_request_is_refused(key, change):
    s = signed(key)
    method, path, body, ts = "POST", PATH, BODY, TS
    if change == "body":
        body = b'{"requests": 13}'
    elif change == "path":
        path = "/fleet/v1/device/desired?window=60"
    elif change == "query":
        path = "/fleet/v1/device/reports?window=61"
    elif change == "method":
        method = "PUT"
    else:
        s = Signed(s.device_id, TS + 1, s.sig)
    with pytest.raises(Unauthenticated, match="does not match this request") as err:
        verify_request(s, key.public_raw, method, path, body, now=ts)
    assert not isinstance(err.value, ClockSkew)


def test_flipped_signature_bit_is_refused(key):
    s = signed(key)
    bad = bytes([s.sig[0] ^ 1]) + s.sig[1:]
    with pytest.raises(Unauthenticated, match="does not match"):
        verify_request(Signed(s.device_id, s.ts, bad), key.public_raw, "POST", PATH, BODY, now=TS)


def test_another_devices_key_is_refused(key):
    other = DeviceKey.generate()
    forged = parse_authorization(other.authorization(DEV, "POST", PATH, BODY, TS))
    with pytest.raises(Unauthenticated, match=f"{DEV} does not match"):
        verify_request(forged, key.public_raw, "POST", PATH, BODY, now=TS)
    verify_request(forged, other.public_raw, "POST", PATH, BODY, now=TS)  # the forger's own key does verify it


def test_malformed_stored_key_is_refused_not_crashed(key):
    with pytest.raises(Unauthenticated):
        verify_request(signed(key), b"short", "POST", PATH, BODY, now=TS)


@pytest.mark.parametrize("offset", [301, -301, 86400])
def test_clock_skew_is_refused_with_the_server_time(key, offset):
    now = TS + offset
    with pytest.raises(ClockSkew) as err:
        verify_request(signed(key), key.public_raw, "POST", PATH, BODY, now=now)
    assert isinstance(err.value, Unauthenticated)
    assert err.value.server_time == now and err.value.offset == offset
    assert str(now) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("offset", [0, 300, -300])
def test_within_skew_is_accepted(key, offset):
    verify_request(signed(key), key.public_raw, "POST", PATH, BODY, now=TS + offset)


def test_skew_is_only_reported_to_the_key_holder(key):
    """A bad signature with a stale time is a bad signature: the server's clock is not a hint to a forger."""
    forged = parse_authorization(DeviceKey.generate().authorization(DEV, "POST", PATH, BODY, TS))
    with pytest.raises(Unauthenticated) as err:
        verify_request(forged, key.public_raw, "POST", PATH, BODY, now=TS + 10_000)
    assert not isinstance(err.value, ClockSkew)


@pytest.mark.parametrize("value", [
    None, "", "Bearer slm_0123456789ab_x",
    'Slmops-Device id="dev_0123456789ab",ts="1733200000"',
    'Slmops-Device id="dev_XYZ",ts="1733200000",sig="' + "A" * 86 + '"',
    'Slmops-Device id="dev_0123456789ab",ts="-5",sig="' + "A" * 86 + '"',
    'Slmops-Device id="dev_0123456789ab",ts="1733200000",sig="' + "A" * 85 + '"',
    'Slmops-Device id="dev_0123456789ab",ts="1733200000",sig="' + "A" * 84 + '=="',
    'Slmops-Device id="dev_0123456789ab",ts="1733200000",sig="' + "+" * 86 + '"',
    'Slmops-Device ts="1733200000",id="dev_0123456789ab",sig="' + "A" * 86 + '"',
])
def test_unknown_header_format_says_what_to_send(value):
    with pytest.raises(Unauthenticated) as err:
        parse_authorization(value)
    assert 'Slmops-Device id="dev_<12 hex>"' in str(err.value) and "\n" not in str(err.value)


def test_header_scheme_is_case_insensitive_and_spaces_after_commas_are_allowed(key):
    header = key.authorization(DEV, "GET", "/fleet/v1/device/desired", b"", TS)
    loose = header.replace("Slmops-Device", "slmops-device").replace(",", ", ")
    s = parse_authorization(loose)
    verify_request(s, key.public_raw, "GET", "/fleet/v1/device/desired", b"", now=TS)


def test_signer_refuses_what_would_make_the_input_ambiguous(key):
    with pytest.raises(InvalidInput):
        key.authorization(DEV, "get", PATH, b"", TS)
    with pytest.raises(InvalidInput):
        key.authorization(DEV, "GET", "/a\n1733200000", b"", TS)
    with pytest.raises(InvalidInput):
        key.authorization("device-1", "GET", PATH, b"", TS)


def test_enrolment_proof(key):
    token = "fleet-enrol-secret-1"
    proof = key.prove(token)
    assert verify_proof(key.public_b64, token, proof) == key.public_raw
    assert verify_proof(key.public_b64, token.encode(), key.sign(ENROL_CONTEXT + token.encode())) == key.public_raw


def test_proof_over_another_token_is_refused(key):
    with pytest.raises(Unauthenticated, match="enrolment proof does not match"):
        verify_proof(key.public_b64, "token-b", key.prove("token-a"))


def test_proof_by_another_key_is_refused(key):
    with pytest.raises(Unauthenticated):
        verify_proof(key.public_b64, "token-a", DeviceKey.generate().prove("token-a"))


def test_request_signature_is_not_an_enrolment_proof(key):
    """The signing input of a request never starts with the enrolment context, so a captured request signature
    fails as a proof whatever the token, including the very bytes the request signed."""
    message = signing_input("POST", PATH, TS, BODY)
    request_sig = b64url(signed(key).sig)
    for token in (message, message.decode(), PATH, ""):
        with pytest.raises(Unauthenticated):
            verify_proof(key.public_b64, token, request_sig)
    assert not message.startswith(ENROL_CONTEXT)


def test_enrolment_proof_is_not_a_request_signature(key):
    """Nor does a proof pass as a request: a raw signature over a request's input is needed."""
    proof = key.prove(signing_input("GET", "/fleet/v1/device/desired", TS, b"").decode())
    s = Signed(DEV, TS, base64.urlsafe_b64decode(proof + "=="))
    with pytest.raises(Unauthenticated):
        verify_request(s, key.public_raw, "GET", "/fleet/v1/device/desired", b"", now=TS)


@pytest.mark.parametrize("public", ["", "not base64!", b64url(b"\x01" * 31), b64url(b"\x01" * 33)])
def test_malformed_public_key_is_bad_input(key, public):
    with pytest.raises(InvalidInput, match="public_key"):
        verify_proof(public, "t", key.prove("t"))


def test_key_file_is_0600_and_round_trips(tmp_path, key):
    path = tmp_path / "agent" / "device.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = DeviceKey.load(path)
    assert loaded.public_raw == key.public_raw and loaded.public_b64 == key.public_b64
    s = parse_authorization(loaded.authorization(DEV, "GET", PATH, b"", TS))
    verify_request(s, key.public_raw, "GET", PATH, b"", now=TS)
    assert [p.name for p in path.parent.iterdir()] == ["device.key"]  # no temp file left behind


def test_saving_replaces_atomically_and_keeps_0600(tmp_path, key):
    path = tmp_path / "device.key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert DeviceKey.load(path).public_raw == key.public_raw


def test_key_readable_by_others_is_refused(tmp_path, key):
    path = tmp_path / "device.key"
    key.save(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        DeviceKey.load(path)


def test_missing_or_foreign_key_file(tmp_path):
    with pytest.raises(ConfigError, match="enrol this device first"):
        DeviceKey.load(tmp_path / "absent.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    os.chmod(junk, 0o600)
    with pytest.raises(ConfigError, match="not an Ed25519 device key"):
        DeviceKey.load(junk)


def test_public_keys_are_parsed_once(key):
    public_key_from_raw.cache_clear()
    for _ in range(3):
        verify_request(signed(key), key.public_raw, "POST", PATH, BODY, now=TS)
    info = public_key_from_raw.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_clock_offset_from_date_header():
    assert clock_offset("Tue, 03 Dec 2024 04:26:40 GMT", 1733200000.0) == 0.0
    assert clock_offset("Tue, 03 Dec 2024 04:31:40 GMT", 1733200000.0) == 300.0
    assert clock_offset("Tue, 03 Dec 2024 04:26:40 -0000", 1733200010.5) == -10.5
    with pytest.raises(InvalidInput, match="not an HTTP date"):
        clock_offset("yesterday", 0.0)


def test_device_ids():
    ids = {new_device_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("dev_") and len(i) == 16 for i in ids)
