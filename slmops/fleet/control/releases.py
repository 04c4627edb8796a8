"""Releases (``NAME:VERSION`` with one model per hardware variant) and channels that point at them.

The control plane stores what devices should pull (a pinned registry reference, the manifest's digest and its
signature bundle), never weights. A variant is resolved against its registry before anything is written: the
manifest is fetched (run in a thread: the registry client is synchronous), its digest must equal the one an
operator pinned, and its signature comes from the request or from the ``sha256-<hex>.sig`` tag.

Trust. With trusted keys (``SLMOPS_FLEET_TRUSTED_KEYS``) every variant must carry a signature that verifies with
one of them, checked without the weights: the model-signing bundle's DSSE signature is verified with the key's
verifier, then the in-toto statement must list exactly ``manifest.json`` (sha256 of the manifest as the registry
serves it) and ``blobs/sha256-<hex>`` for each blob the manifest names, each with that digest. The digests of the
blobs are what the manifest promises; the device checks the bytes against them when it pulls. Without trusted keys
a signature is stored as given, unverified (the device checks it against its own policy), and a variant without
one is stored unsigned.

Channels only move forward: within one model name by version (dotted numbers with an optional ``-pre-release``,
:func:`version_key`), and otherwise (another model name, or a version outside that grammar) to a release created
after the one the channel points at. Going back means publishing a new version that holds the old artifact, so a
device's view of a channel never moves back in time (anti-rollback).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from slmops.api.fleet import NAME_RE, TAG_RE, VERSION_RE, ChannelInfo, Golden, ReleaseInfo, ReleaseRequest, VariantInfo, VariantSpec
from slmops.fleet.control import ledger
from slmops.fleet.control.models import Channel, Release, Variant
from slmops.store.registry import RegistryClient, RemoteManifest, fetch_signature
from slmops.store.registry_auth import RegistryConfig
from slmops.types.digest import Digest
from slmops.types.errors import ConfigError, Conflict, IntegrityError, InvalidInput, NotFound, SlmopsError, \
    SourceError, UntrustedModel
from slmops.types.name import Reference

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

MAX_SIGNATURE_BYTES = 4 << 20
_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
EXTRAS = "releases"  # plane.extras key: the trusted keys' verifiers, loaded once


@dataclass(frozen=True)
class ResolvedVariant:
    hardware: str
    reference: str  # host/namespace/model:tag@sha256:…, what a device pulls
    manifest_digest: str
    signature: bytes | None
    verified_by: str | None = None  # the trusted key's file name, when one verified it

    @property
    def signed(self) -> bool:
        return self.signature is not None


# -- trust -------------------------------------------------------------------------------------------------------

def load_verifiers(paths: tuple[Path, ...]) -> list[tuple[str, Any]]:
    """(file name, model-signing EC verifier) per trusted key; a key that cannot be used is a start-up error."""
    from model_signing._signing import sign_ec_key

    return [(Path(path).name, sign_ec_key.Verifier(_checked_key(Path(path)))) for path in paths]


def _checked_key(path: Path) -> Path:
    """The key kinds model signatures use (``security/signing.py``), said in our words before the library's."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    hint = "SLMOPS_FLEET_TRUSTED_KEYS takes EC P-256 or P-384 public keys in PEM"
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"trusted key {path}: cannot read it ({err.strerror}); {hint}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"trusted key {path}: not a PEM public key; {hint}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
        raise ConfigError(f"trusted key {path}: not an EC P-256 or P-384 key; {hint}")
    return path


def verifiers(plane: "ControlPlane") -> list[tuple[str, Any]]:
    """The plane's trusted keys, loaded once (again if the plane's keys change)."""
    state = plane.extras.setdefault(EXTRAS, {})
    if state.get("keys") != plane.trusted_keys:
        state["verifiers"], state["keys"] = load_verifiers(plane.trusted_keys), plane.trusted_keys
    return state["verifiers"]


def covered_files(remote: RemoteManifest) -> dict[str, str]:
    """What a model-signing statement over this manifest must list: the signed folder's files and digests."""
    files = {"manifest.json": str(remote.digest)}
    for desc in [remote.doc["config"], *remote.doc["layers"]]:
        digest = Digest.parse(desc["digest"])
        files[f"blobs/{digest.filename}"] = str(digest)
    return files


def verify_bundle(bundle: bytes, remote: RemoteManifest, verifiers: list[tuple[str, Any]], what: str) -> str:
    """The name of the trusted key whose signature in ``bundle`` covers exactly this manifest and its blobs;
    UntrustedModel otherwise. No blob is read: the statement's digests are compared with the manifest's."""
    from model_signing._signing import sign_sigstore_pb

    with tempfile.TemporaryDirectory(prefix="slmops-sig-") as tmp:
        path = Path(tmp) / "model.sig"
        path.write_bytes(bundle)
        try:
            signature = sign_sigstore_pb.Signature.read(path)
        except Exception as err:  # JSON, protobuf and key errors alike: the bundle is not one we can read
            raise UntrustedModel(f"{what}: its signature is not a model-signing bundle ({_short(err)}); sign it "
                                 "with `slmops sign` and push it again") from None
    problems = []
    for name, verifier in verifiers:
        try:
            statement = verifier.verify(signature)
        except Exception as err:  # model-signing raises ValueError and cryptography's errors alike
            problems.append(f"{name}: {_short(err)}")
            continue
        signed = {rd.identifier: f"{rd.digest.algorithm}:{rd.digest.digest_hex}"
                  for rd in statement.resource_descriptors()}
        mismatch = _mismatch(signed, covered_files(remote))
        if mismatch:
            raise UntrustedModel(f"{what}: the signature by {name} is over other content ({mismatch}); sign this "
                                 "manifest and push its signature")
        return name
    raise UntrustedModel(f"{what}: not signed by a trusted key ({'; '.join(problems)}); sign it with a key in "
                         "SLMOPS_FLEET_TRUSTED_KEYS and push it again")


def _mismatch(signed: dict[str, str], wanted: dict[str, str]) -> str | None:
    if signed.get("manifest.json") != wanted["manifest.json"]:
        return "it covers another manifest.json"
    for name, digest in wanted.items():
        if signed.get(name) != digest:
            return f"{name} is not covered"
    extra = sorted(set(signed) - set(wanted))
    return f"it covers {extra[0]}, which the manifest does not name" if extra else None


# -- variants ------------------------------------------------------------------------------------------------------

async def resolve_variant(spec: VariantSpec, plane: "ControlPlane") -> ResolvedVariant:
    """Fetch the variant's manifest (and signature) from its registry and check them; nothing is written."""
    trusted = verifiers(plane)
    config = plane.extras.get("registry_config") or RegistryConfig(insecure=plane.registry_insecure)
    return await asyncio.to_thread(_resolve, spec, config, plane.allow_private_registries, trusted)


def _reference(spec: VariantSpec) -> Reference:
    what = f"variant {spec.hardware}"
    if spec.hardware != "*" and not TAG_RE.match(spec.hardware):  # a class is a tag value (fleet/hardware.py)
        raise InvalidInput(f"{what}: the hardware key is a hardware class (cpu-x86_64), an accelerator (cpu, cuda) "
                           "or *")
    try:
        ref = Reference.parse(spec.reference)
    except InvalidInput as err:
        raise InvalidInput(f"{what}: {err}") from None
    if not ref.host_given:
        raise InvalidInput(f"{what}: {spec.reference!r} names no registry; use host[:port]/namespace/model:tag")
    return ref


def _resolve(spec: VariantSpec, config: RegistryConfig, allow_internal: bool,
             trusted: list[tuple[str, Any]]) -> ResolvedVariant:
    what = f"variant {spec.hardware}"
    ref = _reference(spec)
    with _naming(what), RegistryClient(ref.name.host, config, allow_internal, ref.scheme) as client:
        remote = client.find_manifest(ref.repository, ref.manifest_ref)
        if remote is None:
            raise InvalidInput(f"{what}: {ref.display} is not in the registry; push it first or check the "
                               "reference")
        if spec.manifest_digest is not None and str(remote.digest) != spec.manifest_digest:
            raise InvalidInput(f"{what}: the registry serves {remote.digest} for {ref.display}, not the pinned "
                               f"{spec.manifest_digest}")
        _check_model(remote, ref.display)
        pinned = Reference(ref.name, remote.digest, ref.scheme, host_given=True)
        bundle = _signature(spec, client, ref, remote.digest, strict=bool(trusted))
    if not trusted:
        return ResolvedVariant(spec.hardware, pinned.display, str(remote.digest), bundle)
    if bundle is None:
        raise UntrustedModel(f"{what}: {pinned.display} is not signed; sign it with a trusted key (slmops sign "
                             "NAME --key KEY) and push it again, or give its signature")
    key = verify_bundle(bundle, remote, trusted, f"{what} ({pinned.display})")
    return ResolvedVariant(spec.hardware, pinned.display, str(remote.digest), bundle, key)


def _check_model(remote: RemoteManifest, shown: str) -> None:
    """A release of something devices cannot run fails now, not on every device."""
    from slmops.store.pulling import plan_of

    try:
        plan_of(remote, f"the manifest of {shown}")
    except SourceError as err:
        raise InvalidInput(str(err)) from None


def _signature(spec: VariantSpec, client: RegistryClient, ref: Reference, digest: Digest,
               strict: bool) -> bytes | None:
    """The request's bundle (base64), else the registry's. Without trust, a registry signature that cannot be
    fetched is left out, as a pull without a trust policy does."""
    if spec.signature is not None:
        try:
            bundle = base64.b64decode(spec.signature.encode().translate(bytes.maketrans(b"-_", b"+/")),
                                      validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"variant {spec.hardware}: signature is not base64") from None
        if not bundle or len(bundle) > MAX_SIGNATURE_BYTES:
            raise InvalidInput(f"variant {spec.hardware}: a signature is a bundle of 1 byte to 4 MiB")
        return bundle
    try:
        return fetch_signature(client, ref.repository, digest, MAX_SIGNATURE_BYTES)
    except SlmopsError:
        if strict:
            raise
        return None


@contextlib.contextmanager
def _naming(what: str) -> Iterator[None]:
    """Registry errors say which variant they are about (their classes keep their HTTP status)."""
    try:
        yield
    except (InvalidInput, IntegrityError, SourceError) as err:
        if str(err).startswith(f"{what}:"):
            raise
        raise type(err)(f"{what}: {err}") from None


# -- releases ------------------------------------------------------------------------------------------------------

def split_release(text: str) -> tuple[str, str]:
    """``NAME:VERSION`` → (name, version); InvalidInput otherwise."""
    name, sep, version = text.partition(":")
    if not sep or not NAME_RE.match(name) or not VERSION_RE.fullmatch(version):
        raise InvalidInput(f"{text[:80]!r} is not NAME:VERSION (smol:1.2.0)")
    return name, version


def _check_request(req: ReleaseRequest) -> None:
    if not NAME_RE.match(req.name):
        raise InvalidInput(f"release name {req.name[:80]!r}: lowercase letters, digits and ._- (64 at most)")
    seen: set[str] = set()
    for v in req.variants:
        if v.hardware in seen:
            raise InvalidInput(f"variant {v.hardware} is given twice; one model per hardware key")
        seen.add(v.hardware)


async def create_release(plane: "ControlPlane", req: ReleaseRequest, actor: str) -> ReleaseInfo:
    """Resolve every variant against its registry, then write the release, its variants and a ledger entry in
    one transaction. No registry call happens inside the transaction (SQLite has one writer)."""
    _check_request(req)
    label = f"{req.name}:{req.version}"
    async with plane.db.read() as s:
        if await _find(s, req.name, req.version) is not None:
            raise _exists(label)
    resolved = [await resolve_variant(v, plane) for v in req.variants]
    now = plane.clock()
    golden = [g.model_dump(exclude_none=True) for g in req.golden]
    try:
        async with plane.db.write() as s:
            if await _find(s, req.name, req.version) is not None:
                raise _exists(label)
            release = Release(name=req.name, version=req.version, golden=golden, notes=req.notes,
                              created_by=actor, created_at=now)
            s.add(release)
            await s.flush()
            variants = [Variant(release_id=release.id, hardware=r.hardware, reference=r.reference,
                                manifest_digest=r.manifest_digest, signature=r.signature) for r in resolved]
            s.add_all(variants)
            await s.flush()
            data = {"variants": {r.hardware: {"reference": r.reference, "digest": r.manifest_digest,
                                              "signed": r.signed, "verified_by": r.verified_by}
                                 for r in resolved}}
            await ledger.append(s, actor=actor, action="release.create", subject=f"release:{label}", data=data,
                                at=now)
    except DbIntegrityError:  # another replica created it between the check and the insert
        raise _exists(label) from None
    return to_info(release, variants)


def _exists(label: str) -> Conflict:
    return Conflict(f"release {label} exists and releases never change; publish a new version")


async def _find(s: AsyncSession, name: str, version: str) -> Release | None:
    q = select(Release).where(Release.name == name, Release.version == version)
    return (await s.execute(q)).scalars().first()


def to_info(release: Release, variants: list[Variant]) -> ReleaseInfo:
    return ReleaseInfo(
        release=f"{release.name}:{release.version}", name=release.name, version=release.version,
        variants=[VariantInfo(hardware=v.hardware, reference=v.reference, manifest_digest=v.manifest_digest,
                              signed=v.signature is not None) for v in sorted(variants, key=lambda v: v.hardware)],
        golden=[Golden(**g) for g in release.golden], notes=release.notes, created_at=release.created_at,
        created_by=release.created_by)


async def list_releases(plane: "ControlPlane", name: str | None = None) -> list[ReleaseInfo]:
    """Oldest first."""
    async with plane.db.read() as s:
        q = select(Release).order_by(Release.id)
        if name is not None:
            q = q.where(Release.name == name)
        releases = list((await s.execute(q)).scalars())
        variants = await _variants(s, [r.id for r in releases])
    return [to_info(r, variants.get(r.id, [])) for r in releases]


async def get_release(plane: "ControlPlane", name: str, version: str) -> ReleaseInfo:
    async with plane.db.read() as s:
        release = await _find(s, name, version)
        if release is None:
            raise _no_release(f"{name}:{version}")
        variants = await _variants(s, [release.id])
    return to_info(release, variants.get(release.id, []))


async def _variants(s: AsyncSession, ids: list[int]) -> dict[int, list[Variant]]:
    out: dict[int, list[Variant]] = {}
    if ids:
        for v in (await s.execute(select(Variant).where(Variant.release_id.in_(ids)))).scalars():
            out.setdefault(v.release_id, []).append(v)
    return out


def _no_release(label: str) -> NotFound:
    return NotFound(f"release {label} not found; `slmops fleet releases list` shows them")


# -- channels ------------------------------------------------------------------------------------------------------

def version_key(version: str) -> tuple[Any, ...] | None:
    """An ordering key for ``1.2.0``, ``v2``, ``1.3.0-rc.1`` (a pre-release sorts before its release; numeric
    pre-release parts compare as numbers and before words; trailing zeros do not count; ``+build`` is ignored), or
    None for a version outside this grammar."""
    m = _VERSION.match(version)
    if m is None:
        return None
    numbers = [int(n) for n in m.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    pre = m.group(2)
    if pre is None:
        return (tuple(numbers), (1,))
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (tuple(numbers), (0, parts))


def moves_forward(current: Release, target: Release) -> bool:
    """Whether a channel at ``current`` may move to ``target`` (see the module's docstring)."""
    if current.name == target.name:
        now, then = version_key(current.version), version_key(target.version)
        if now is not None and then is not None:
            return then > now
    return target.id > current.id


async def set_channel(plane: "ControlPlane", channel: str, target: str, actor: str) -> ChannelInfo:
    """Point ``channel`` at the release ``target`` (NAME:VERSION). Setting it where it is changes nothing."""
    if not NAME_RE.match(channel):
        raise InvalidInput(f"channel name {channel[:80]!r}: lowercase letters, digits and ._- (64 at most)")
    name, version = split_release(target)
    now = plane.clock()
    try:
        async with plane.db.write(bump=False) as s:
            release = await _find(s, name, version)
            if release is None:
                raise _no_release(target)
            row = await s.get(Channel, channel, with_for_update=True)
            before = await s.get(Release, row.release_id) if row is not None else None
            if before is not None and before.id == release.id:
                return ChannelInfo(name=channel, release=target, updated_at=row.updated_at)  # type: ignore[union-attr]
            if before is not None and not moves_forward(before, release):
                raise Conflict(f"channel {channel} is at {before.name}:{before.version}; it only moves forward "
                               "(publish a newer version, or roll back with a new version)")
            if row is None:
                s.add(Channel(name=channel, release_id=release.id, updated_at=now))
            else:
                row.release_id, row.updated_at = release.id, now
            await s.flush()
            await plane.db.bump(s)
            await ledger.append(s, actor=actor, action="channel.set", subject=f"channel:{channel}", at=now,
                                data={"from": f"{before.name}:{before.version}" if before else None, "to": target})
    except DbIntegrityError:  # another replica made the channel between the read and the insert
        raise Conflict(f"channel {channel} was set by someone else at the same moment; look at it and try again"
                       ) from None
    return ChannelInfo(name=channel, release=target, updated_at=now)


async def list_channels(plane: "ControlPlane") -> list[ChannelInfo]:
    async with plane.db.read() as s:
        q = select(Channel, Release).join(Release, Channel.release_id == Release.id).order_by(Channel.name)
        return [ChannelInfo(name=c.name, release=f"{r.name}:{r.version}", updated_at=c.updated_at)
                for c, r in (await s.execute(q)).all()]


async def get_channel(plane: "ControlPlane", channel: str) -> ChannelInfo:
    async with plane.db.read() as s:
        q = select(Channel, Release).join(Release, Channel.release_id == Release.id).where(Channel.name == channel)
        found = (await s.execute(q)).first()
    if found is None:
        raise NotFound(f"channel {channel} not found; `slmops fleet channels list` shows them")
    c, r = found
    return ChannelInfo(name=c.name, release=f"{r.name}:{r.version}", updated_at=c.updated_at)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]
