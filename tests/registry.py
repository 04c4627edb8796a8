"""A real registry for tests, and the small HTTP servers around it.

:class:`Registry` runs Debian's ``docker-registry`` (Distribution 2.8; ``.ci/run`` installs it) on a free loopback
port with its own config and storage folder: anonymous, with htpasswd Basic auth, or with token auth whose tokens
:class:`TokenServer` issues, signed by a test certificate the registry is told to trust. :func:`upload` puts a
model into a registry with plain distribution-API calls (POST + PUT per blob, PUT of the manifest), so what slmops
pulls was written by code that is not slmops's own client.

:class:`Recorder` is a loopback HTTP server whose routes a test writes (canned answers: a manifest over 4 MiB, a
bad digest, a redirect); :class:`Proxy` forwards to a registry, logs each request's ``Range`` and can slow blob
bodies down, so a test can kill a pull in the middle.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.server
import json
import secrets
import shutil
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from conftest import free_port
from procs import ServerProcess

BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.docker.container.image.v1+json"
MODEL = "application/vnd.ollama.image.model"
SERVICE, ISSUER = "slmops-test-registry", "slmops-test-issuer"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry(ServerProcess):
    """``docker-registry serve`` on a free loopback port. ``auth``: None, ``"htpasswd"`` (``users``: name ->
    password) or ``"token"`` (``token_realm``: a :class:`TokenServer` URL). ``storage``: share another registry's
    folder (what one uploaded, the other serves)."""

    def __init__(self, root: Path, auth: str | None = None, users: dict[str, str] | None = None,
                 token: "TokenServer | None" = None, storage: Path | None = None,
                 tls: tuple[Path, Path] | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.storage = storage or root / "storage"
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if tls:
            config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        if auth == "htpasswd":
            import bcrypt
            lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
                     for u, p in (users or {}).items()]
            (root / "htpasswd").write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "slmops-test", "path": str(root / "htpasswd")}}
        elif auth == "token":
            assert token is not None
            config["auth"] = {"token": {"realm": token.url + "/token", "service": SERVICE, "issuer": ISSUER,
                                        "rootcertbundle": str(token.cert_path)}}
        (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        super().__init__([BINARY, "serve", root / "config.yml"], root / "registry.log", self.url)
        verify = ssl.create_default_context(cafile=str(tls[0])) if tls else True
        self.wait_ready("/v2/", ready=lambda r: r.status_code in (200, 401), verify=verify, within=20)

    def requests(self, method: str = "GET", part: str = "/blobs/") -> list[tuple[str, int, int]]:
        """(path, status, bytes) of each ``method`` request whose path has ``part``, from the access log."""
        out = []
        for line in self.log_path.read_text().splitlines():
            if f'"{method} ' in line and part in line and line.startswith("127.0.0.1 - "):
                path = line.split(f'"{method} ', 1)[1].split(" ", 1)[0]
                status, size = line.split('" ', 2)[1].split()[:2]
                out.append((path, int(status), int(size)))
        return out

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def upload(base_url: str, repo: str, ref: str, manifest: bytes, blobs: dict[str, bytes | Path],
           media_type: str = DOCKER_MANIFEST, headers: dict[str, str] | None = None) -> str:
    """Put blobs (POST an upload, PUT its bytes with the digest) and the manifest; returns the manifest digest."""
    with httpx.Client(base_url=base_url, headers=headers or {}, timeout=120) as c:
        for digest, content in blobs.items():
            if c.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
                continue
            start = c.post(f"/v2/{repo}/blobs/uploads/")
            assert start.status_code == 202, start.text
            location = str(start.url.join(start.headers["location"]))
            body = content.read_bytes() if isinstance(content, Path) else content
            done = c.put(httpx.URL(location).copy_merge_params({"digest": digest}), content=body,
                         headers={"Content-Type": "application/octet-stream"})
            assert done.status_code == 201, done.text
        put = c.put(f"/v2/{repo}/manifests/{ref}", content=manifest, headers={"Content-Type": media_type})
        assert put.status_code == 201, put.text
        return put.headers["docker-content-digest"]


def upload_store_model(base_url: str, repo: str, ref: str, models_root: Path, name_parts: tuple[str, ...],
                       **kw: Any) -> tuple[str, bytes]:
    """A model of an slmops (or Ollama) store, manifest bytes as stored; returns (manifest digest, bytes)."""
    manifest = models_root.joinpath("manifests", *name_parts).read_bytes()
    doc = json.loads(manifest)
    blobs: dict[str, bytes | Path] = {
        d["digest"]: models_root / "blobs" / d["digest"].replace(":", "-") for d in [doc["config"], *doc["layers"]]}
    return upload(base_url, repo, ref, manifest, blobs, **kw), manifest


def tiny_gguf(path: Path, seed: int = 0) -> bytes:
    """A small valid GGUF (not a model llama.cpp could run): enough for pulls that only store and validate."""
    import numpy as np
    from gguf import GGUFWriter
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_tensor("blk.0.attn_q.weight", np.random.default_rng(seed).standard_normal((16, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def ollama_manifest(model: bytes, config: bytes = b'{"model_format":"gguf","model_family":"llama"}',
                    **overrides: Any) -> tuple[bytes, dict[str, bytes | Path]]:
    """An Ollama-style manifest for ``model`` (a GGUF), and the blobs it names."""
    doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
           "config": {"mediaType": CONFIG, "digest": sha(config), "size": len(config)},
           "layers": [{"mediaType": MODEL, "digest": sha(model), "size": len(model)}]}
    doc.update(overrides)
    return json.dumps(doc, indent=2).encode(), {sha(config): config, sha(model): model}


def self_signed(folder: Path, ip: str) -> tuple[Path, Path]:
    """A certificate for ``ip`` that is its own CA (to pass as SLMOPS_CA_BUNDLE), and its key; PEM files."""
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "registry.crt", folder / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# -- token auth ----------------------------------------------------------------------------------------------
class TokenServer:
    """The token service of a registry with token auth: checks a Basic login (``users``; empty: anyone), grants
    what each scope asks, and signs ES256 JWTs with a test certificate the registry trusts (sent as ``x5c``)."""

    def __init__(self, root: Path, users: dict[str, str] | None = None):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        root.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slmops test token signer")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert_path = root / "token.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.users = users or {}
        self.seen: list[dict[str, Any]] = []
        self.server = Recorder({"/token": self._issue})
        self.url = self.server.url

    def _issue(self, req: "Seen") -> tuple[int, dict[str, str], bytes]:
        import jwt
        user = None
        if self.users:
            auth = req.headers.get("authorization", "")
            try:
                user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
            except ValueError:
                user, password = None, None
            if not auth.startswith("Basic ") or self.users.get(user or "") != password:
                return 401, {}, b'{"details":"bad login"}'
        scopes = req.query.get("scope", [])
        self.seen.append({"user": user, "scopes": scopes, "service": req.query.get("service", [""])[0]})
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")  # repository:ns/model:pull,push
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user or "anonymous", "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        token = jwt.encode(claims, self.key, algorithm="ES256", headers={"x5c": [self.x5c]})
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": token}).encode()

    def stop(self) -> None:
        self.server.stop()


# -- recorder and proxy ----------------------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""


Route = Callable[[Seen], "tuple[int, dict[str, str], bytes | Callable[[Any], None]]"]


@dataclass
class _State:
    routes: dict[str, Route]
    seen: list[Seen] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.0: each answer closes its connection, so a body without Content-Length simply ends there."""

    state: _State

    def log_message(self, *args: Any) -> None:
        pass

    def _any(self) -> None:
        from urllib.parse import parse_qs, urlsplit
        url = urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        seen = Seen(self.command, url.path, parse_qs(url.query), {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length) if length else b"")
        self.state.seen.append(seen)
        route = self.state.routes.get(url.path) or self.state.routes.get("*")
        status, headers, body = route(seen) if route else (404, {}, b'{"errors":[{"code":"NOT_FOUND"}]}')
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if isinstance(body, bytes) and "Content-Length" not in headers and headers.get("X-No-Length") is None:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if callable(body):
                body(self.wfile)
            elif self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any


class Recorder:
    """A loopback HTTP server answering ``routes`` (path -> function of the request; ``"*"`` for any other) and
    keeping every request it saw in ``seen``."""

    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1"):
        self.state = _State(dict(routes))
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.host = f"{host}:{self.port}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def seen(self) -> list[Seen]:
        return self.state.seen

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Proxy(Recorder):
    """Forwards every request to ``upstream`` (a registry URL); blob bodies at most ``rate`` bytes a second when
    set (change it between pulls). Each request, with its Range header, is in ``seen``."""

    def __init__(self, upstream: str, rate: float | None = None):
        self.upstream = upstream
        self.rate = rate
        self._client = httpx.Client(timeout=120)
        super().__init__({"*": self._forward})

    def _forward(self, req: Seen) -> tuple[int, dict[str, str], Callable[[Any], None]]:
        from urllib.parse import urlencode
        query = urlencode([(k, v) for k, vs in req.query.items() for v in vs])
        headers = {k: v for k, v in req.headers.items() if k not in ("host", "content-length", "connection")}
        upstream = self._client.send(self._client.build_request(
            req.method, f"{self.upstream}{req.path}" + (f"?{query}" if query else ""), headers=headers,
            content=req.body or None), stream=True)
        out = {k: v.replace(self.upstream, "") if k.lower() == "location" else v
               for k, v in upstream.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
        slow = self.rate if "/blobs/sha256:" in req.path else None

        def body(w: Any) -> None:
            try:
                for chunk in upstream.iter_raw(64 << 10):
                    w.write(chunk)
                    if slow:
                        time.sleep(len(chunk) / slow)
            finally:
                upstream.close()
        return upstream.status_code, out, body

    def stop(self) -> None:
        super().stop()
        self._client.close()


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory):
    """A registry of its own for a module's tests, empty at first."""
    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    reg = Registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()
