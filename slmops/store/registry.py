"""A client of the registry HTTP API v2 (the Docker/OCI distribution spec), over httpx.

One :class:`RegistryClient` talks to one registry host for one pull or push: manifests (GET, PUT) and blobs
(HEAD, GET with ``Range``, and the upload session: POST, PATCH, PUT). It knows nothing of the store: what it
returns is bytes and responses, checked against the protocol's limits (a manifest over 4 MiB, a digest outside
``sha256:<64 hex>``, a negative size) before anyone acts on them.

Every request the client sends, redirects and token requests included, first passes :meth:`_guard`: the host must
pass the private-address check (:func:`check_registry_host`) and the scheme must be HTTPS unless the pull is
``insecure``. httpx follows redirects (object storage is where registries send blobs) and drops the
Authorization header on any hop to another origin; :class:`RegistryAuth` adds it only for the registry's own host.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from dataclasses import dataclass
from typing import Any, Iterator

import httpx

import slmops
from slmops.store.manifests import MANIFEST_MEDIA_TYPE
from slmops.store.network import check_registry_host
from slmops.store.registry_auth import RegistryAuth, RegistryConfig
from slmops.store.transport import BulkTransport
from slmops.types.digest import Digest
from slmops.types.errors import IntegrityError, InvalidDigest, InvalidInput, NotFound, SourceError

DOCKER_MANIFEST = MANIFEST_MEDIA_TYPE  # what Ollama pushes and the store keeps
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
ACCEPT = ", ".join((DOCKER_MANIFEST, OCI_MANIFEST, *INDEX_TYPES))
MAX_MANIFEST_BYTES = 4 << 20
TIMEOUT = httpx.Timeout(60.0, connect=15.0)


@dataclass(frozen=True)
class RemoteManifest:
    """A manifest as the registry served it: the bytes (kept as they are), their digest, and the parsed JSON."""

    data: bytes
    media_type: str
    digest: Digest
    doc: dict[str, Any]


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str]


def _what(repo: str, ref: str) -> str:
    return f"manifest {repo}@{ref}" if ref.startswith("sha256:") else f"manifest {repo}:{ref}"


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


class RegistryClient:
    def __init__(self, host: str, config: RegistryConfig, allow_internal: bool = False, scheme: str | None = None):
        """``scheme``: from an ``http://``/``https://`` prefix of the name; without one, HTTPS, or plain HTTP
        when ``config.insecure`` (as Ollama's ``--insecure``)."""
        if scheme == "http" and not config.insecure:
            raise InvalidInput(f"{scheme}://{host} is plain HTTP; pull with --insecure (insecure: true on "
                               "/api/pull) to allow it")
        self.host = host.lower()
        self.scheme = scheme or ("http" if config.insecure else "https")
        self.base = f"{self.scheme}://{self.host}"
        self.insecure = config.insecure
        self.allow_internal = allow_internal
        self._checked: set[str] = set()
        self._http = httpx.Client(
            timeout=TIMEOUT, follow_redirects=True, max_redirects=10, transport=BulkTransport(config.ssl_context()),
            auth=RegistryAuth(self.host, config.login_for(self.host)),
            headers={"User-Agent": f"slmops/{slmops.__version__}"}, event_hooks={"request": [self._guard]})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self, request: httpx.Request) -> None:
        """Runs before every request and every redirect hop."""
        if request.url.scheme != "https" and not self.insecure:
            raise SourceError(f"registry {self.host} sent slmops to plain HTTP ({request.url.host}); refused "
                              "without --insecure")
        host = request.url.host  # without brackets or port: what the address check resolves
        if host not in self._checked:
            check_registry_host(host, self.allow_internal)
            self._checked.add(host)

    @contextlib.contextmanager
    def _stream(self, method: str, url: str, **kw: Any) -> Iterator[httpx.Response]:
        """A streamed response, with transport failures turned into one-line SourceErrors."""
        try:
            with self._http.stream(method, url, **kw) as response:
                yield response
        except httpx.TooManyRedirects:
            raise SourceError(f"registry {self.host} redirected too many times; check the registry") from None
        except httpx.TransportError as err:
            raise SourceError(self._unreachable(err)) from None

    def _unreachable(self, err: httpx.TransportError) -> str:
        text, hint = _one_line(str(err)) or type(err).__name__, "check the host and port"
        cause: BaseException | None = err
        while cause is not None:  # httpx keeps the ssl error it wraps
            if isinstance(cause, ssl.SSLCertVerificationError):
                text, hint = "certificate not trusted", "add its CA to SLMOPS_CA_BUNDLE"
            elif isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
                text, hint = "no TLS there", "it may speak plain HTTP: pull with --insecure"
            cause = cause.__cause__ or cause.__context__
        return f"cannot reach registry {self.host} ({text}); {hint}"

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        with self._stream(method, url, **kw) as r:
            r.read()
        return r

    def _fail(self, r: httpx.Response, what: str) -> SourceError:
        """The registry's own error code and message (the distribution spec's ``errors`` list), on one line."""
        detail = ""
        with contextlib.suppress(Exception):
            body = r.read()[:4096]
            err = json.loads(body)["errors"][0]
            detail = f": {err.get('code', '')} {_one_line(str(err.get('message', '')))}".rstrip()
        return SourceError(f"registry {self.host} answered {r.status_code} to {what}{detail}")

    def url(self, repo: str, kind: str, ref: str = "") -> str:
        return f"{self.base}/v2/{repo}/{kind}/{ref}"

    # -- pull ------------------------------------------------------------------------------------------------
    def manifest(self, repo: str, ref: str) -> RemoteManifest:
        """GET a manifest by tag or digest, at most 4 MiB, checked against the digest when ``ref`` is one."""
        found = self.find_manifest(repo, ref)
        if found is None:
            raise NotFound(f"{_what(repo, ref)} not found at registry {self.host}; check the name and tag")
        return found

    def find_manifest(self, repo: str, ref: str) -> RemoteManifest | None:
        """:meth:`manifest`, or None where the registry has none (404)."""
        what = _what(repo, ref)
        with self._stream("GET", self.url(repo, "manifests", ref), headers={"Accept": ACCEPT}) as r:
            if r.status_code == 404:
                return None
            if r.status_code != 200:
                raise self._fail(r, f"GET {what}")
            data = self._read_limited(r, MAX_MANIFEST_BYTES, what)
        digest = Digest.of_bytes(data)
        served = r.headers.get("docker-content-digest", "")
        if ref.startswith("sha256:") and str(digest) != ref or served.startswith("sha256:") and served != str(digest):
            raise IntegrityError(f"{what} from {self.host} does not match its digest (its bytes hash to "
                                 f"{digest}); refused, nothing was stored")
        media_type = r.headers.get("content-type", "").split(";")[0].strip()
        return RemoteManifest(data, media_type, digest, parse_manifest(data, what))

    def _read_limited(self, r: httpx.Response, limit: int, what: str) -> bytes:
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise SourceError(f"{what} at {self.host} is {declared} bytes, over the {limit >> 20} MiB slmops "
                              "accepts; refused, nothing was stored")
        data = bytearray()
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) > limit:
                raise SourceError(f"{what} at {self.host} is over the {limit >> 20} MiB slmops accepts; refused, "
                                  "nothing was stored")
        return bytes(data)

    @contextlib.contextmanager
    def blob(self, repo: str, digest: Digest, offset: int = 0) -> Iterator[httpx.Response]:
        """GET a blob's bytes from ``offset`` on (``Range``); the response is 200 (all of it) or 206 (the rest,
        from exactly ``offset``), which the caller must tell apart."""
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with self._stream("GET", self.url(repo, "blobs", str(digest)), headers=headers) as r:
            if r.status_code == 206 and not r.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                raise SourceError(f"registry {self.host} answered a range request for blob {digest.hex[:12]} with "
                                  "other bytes; run the pull again")
            if r.status_code not in (200, 206):
                raise self._fail(r, f"GET blob {digest.hex[:12]}")
            yield r

    def blob_bytes(self, repo: str, digest: Digest, limit: int) -> bytes:
        """A small blob (a signature bundle) in memory, checked against its digest."""
        with self.blob(repo, digest) as r:
            data = self._read_limited(r, limit, f"blob {digest.hex[:12]}")
        if Digest.of_bytes(data) != digest:
            raise IntegrityError(f"blob {digest.hex[:12]} from {self.host} does not match its digest; refused")
        return data

    # -- push (the same session, the other direction) -----------------------------------------------------
    def has_blob(self, repo: str, digest: Digest) -> bool:
        r = self._request("HEAD", self.url(repo, "blobs", str(digest)))
        if r.status_code in (200, 404):
            return r.status_code == 200
        raise self._fail(r, f"HEAD blob {digest.hex[:12]}")

    def start_upload(self, repo: str) -> str:
        """POST an upload session; returns its location (absolute) for :meth:`upload_chunk`/:meth:`finish_upload`."""
        r = self._request("POST", self.url(repo, "blobs", "uploads/"))
        if r.status_code != 202 or "location" not in r.headers:
            raise self._fail(r, f"POST an upload to {repo}")
        return str(r.url.join(r.headers["location"]))

    def upload_chunk(self, location: str, data: bytes, offset: int) -> str:
        """PATCH one chunk at ``offset``; returns the session's next location."""
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Range": f"{offset}-{offset + len(data) - 1}"}
        r = self._request("PATCH", location, content=data, headers=headers)
        if r.status_code != 202:
            raise self._fail(r, "PATCH an upload chunk")
        return str(r.url.join(r.headers.get("location", location)))

    def finish_upload(self, location: str, digest: Digest, data: bytes = b"") -> None:
        """PUT the last bytes (or all of them: a monolithic upload) and close the session under ``digest``."""
        url = httpx.URL(location).copy_merge_params({"digest": str(digest)})  # keep the session's own query
        r = self._request("PUT", str(url), content=data,
                          headers={"Content-Type": "application/octet-stream"})
        if r.status_code != 201:
            raise self._fail(r, f"PUT blob {digest.hex[:12]}")

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str = DOCKER_MANIFEST) -> Digest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidInput(f"manifest is over the {MAX_MANIFEST_BYTES >> 20} MiB a registry accepts")
        r = self._request("PUT", self.url(repo, "manifests", ref), content=data,
                          headers={"Content-Type": media_type})
        if r.status_code != 201:
            raise self._fail(r, f"PUT manifest {repo}:{ref}")
        return Digest.of_bytes(data)


def parse_manifest(data: bytes, what: str) -> dict[str, Any]:
    """The manifest's JSON, refused unless it is one image manifest whose every descriptor has a
    ``sha256:<64 hex>`` digest and a size of zero or more (a digest names a file in the store)."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise SourceError(f"{what} is not JSON; refused, nothing was stored") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{what} is not a manifest; refused, nothing was stored")
    if doc.get("mediaType") in INDEX_TYPES or "manifests" in doc:
        raise SourceError(f"{what} is an index of several images; slmops pulls one model manifest (name one "
                          "of its manifests by digest)")
    if doc.get("schemaVersion") != 2 or not isinstance(doc.get("config"), dict) \
            or not isinstance(doc.get("layers"), list):
        raise SourceError(f"{what} is not a schema 2 image manifest (config and layers); refused")
    for desc in [doc["config"], *doc["layers"]]:
        descriptor(desc, what)
    return doc


def descriptor(desc: Any, what: str) -> Descriptor:
    if not isinstance(desc, dict):
        raise SourceError(f"{what} has a layer that is not an object; refused, nothing was stored")
    try:
        digest = Digest.parse(desc.get("digest"))
    except InvalidDigest:
        shown = desc.get("digest") if isinstance(desc.get("digest"), str) else "<not a string>"
        raise SourceError(f'{what} names an invalid digest "{_one_line(shown, 80)}" (only sha256:<64 hex> is '
                          "accepted); refused, nothing was stored") from None
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SourceError(f"{what} gives blob {digest.hex[:12]} the size {_one_line(str(size), 40)}; a size is "
                          "a whole number of bytes; refused, nothing was stored")
    media_type = desc.get("mediaType")
    if not isinstance(media_type, str):
        raise SourceError(f"{what} gives blob {digest.hex[:12]} no media type; refused, nothing was stored")
    notes = desc.get("annotations") if isinstance(desc.get("annotations"), dict) else {}
    return Descriptor(media_type, digest, size, {str(k): str(v) for k, v in notes.items()})


def fetch_signature(client: RegistryClient, repo: str, manifest_digest: Digest, limit: int) -> bytes | None:
    """The signature bundle of the manifest ``manifest_digest`` in ``repo``: the one layer of the artifact tagged
    ``sha256-<hex>.sig`` (registries without the referrers API find it by that name, as cosign does), checked
    against its digest; None where the registry has no such tag."""
    sig = client.find_manifest(repo, f"sha256-{manifest_digest.hex}.sig")
    if sig is None:
        return None
    layers = [descriptor(d, "signature manifest") for d in sig.doc["layers"]]
    if len(layers) != 1 or layers[0].size > limit:
        raise SourceError(f"the signature of {repo}@{manifest_digest} at {client.host} is not one bundle of at "
                          f"most {limit >> 20} MiB")
    return client.blob_bytes(repo, layers[0].digest, limit)
