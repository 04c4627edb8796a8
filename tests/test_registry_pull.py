"""Pulling from a real registry (Debian's docker-registry, Distribution 2.8, started by tests/registry.py): by tag
and by digest, resumed after a SIGKILL with a Range request, refused when the registry's bytes or manifests are
wrong, with Basic and token auth, across redirects, through the CLI, a real `slmops serve` and the official
`ollama` client. Models are uploaded with plain distribution-API calls, not with slmops's own client."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import ollama
import pytest
from hypothesis import given, strategies as st

from conftest import BIN, Server, run_cli
from registry import (BINARY, DOCKER_MANIFEST, OCI_MANIFEST, Proxy, Recorder, Registry, TokenServer, ollama_manifest,
                      self_signed, sha, tiny_gguf, upload, upload_store_model)
from slmops.store import manifests as mt
from slmops.store.registry import RegistryClient
from slmops.store.registry_auth import Login, RegistryConfig
from slmops.store.transport import BulkTransport, iter_body
from slmops.store.store import Store
from slmops.types.digest import Digest
from slmops.types.errors import IntegrityError, InvalidInput, InvalidName, SourceError, UntrustedModel
from slmops.types.name import ModelName, Reference

ALLOW = {"SLMOPS_ALLOW_PRIVATE_REGISTRIES": "true"}
INSECURE = RegistryConfig(insecure=True)
SMOL = ("registry.ollama.ai", "library", "smollm2", "135m")
PASSWORD = "s3cret-registry-pass"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, shared_home):
    """One registry holding the real default model (library/pirate) and a tiny GGUF model (library/tiny)."""
    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    root = tmp_path_factory.mktemp("registry")
    reg = Registry(root / "main")
    models = shared_home / "models"
    digest, data = upload_store_model(reg.url, "library/pirate", "latest", models, SMOL)
    model_layer = next(l for l in json.loads(data)["layers"] if l["mediaType"] == mt.MODEL)
    tiny = tiny_gguf(root / "tiny.gguf")
    tiny_manifest, tiny_blobs = ollama_manifest(tiny)
    tiny_digest = upload(reg.url, "library/tiny", "latest", tiny_manifest, tiny_blobs)
    yield SimpleNamespace(reg=reg, host=reg.host, digest=digest, data=data, model=model_layer, tiny=tiny,
                          tiny_digest=tiny_digest, tiny_manifest=tiny_manifest, root=root)
    reg.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory, registry):
    home = tmp_path_factory.mktemp("served")
    s = Server(home, **ALLOW)
    yield s
    s.stop()


def store_at(root: Path, **kw) -> Store:
    return Store(root, allow_internal_registries=True, **kw)


def stored_files(home: Path) -> set[tuple[str, int]]:
    models = home / "models"
    return {(str(p.relative_to(models)), p.stat().st_size) for sub in ("manifests", "blobs", "signatures")
            for p in (models / sub).rglob("*") if p.is_file() and "partial" not in p.parts}


def one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and text in last, r.stderr


# -- names ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,name,digest,scheme,remote", [
    ("smollm2:135m", "smollm2:135m", None, None, False),
    ("127.0.0.1:5000/library/pirate", "127.0.0.1:5000/library/pirate:latest", None, None, True),
    ("http://127.0.0.1:5000/Team/M:V1", "127.0.0.1:5000/team/m:v1", None, "http", True),
    ("reg.example/ns/m@sha256:" + "a" * 64, "reg.example/ns/m:latest", "sha256:" + "a" * 64, None, True),
    ("reg.example/ns/m:pinned@sha256:" + "b" * 64, "reg.example/ns/m:pinned", "sha256:" + "b" * 64, None, True),
    ("registry.ollama.ai/library/smollm2:135m", "smollm2:135m", None, None, True),
])
def test_reference_grammar(text, name, digest, scheme, remote):
    ref = Reference.parse(text)
    assert (ref.name, str(ref.digest) if ref.digest else None, ref.scheme, ref.remote) == \
        (ModelName.parse(name), digest, scheme, remote)
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize("bad", ["ftp://h/ns/m", "http://m", "https://ns/m", "h/ns/m@sha256:abc", "h/ns/m@",
                                 "h/ns/m@md5:" + "a" * 32, "h/ns/m@sha256:../../" + "a" * 58, "a/b/c/d@sha256:x"])
def test_bad_references_are_refused_with_the_grammar(bad):
    with pytest.raises(InvalidName, match="invalid model name"):
        Reference.parse(bad)


@given(st.text(alphabet="abc09._-:/@%h tps", max_size=60))
def test_any_accepted_reference_stays_inside_the_store_and_round_trips(text):
    try:
        ref = Reference.parse(text)
    except InvalidName:
        return
    for part in ref.name.path_parts:
        assert part and "/" not in part and part not in (".", "..") and ".." not in part
    assert Reference.parse(str(ref)) == ref


# -- pull, run, byte-for-byte manifests ----------------------------------------------------------------------------
def test_ollama_client_pulls_through_slmops_serve_and_the_model_runs(registry, served):
    client = ollama.Client(host=served.url, timeout=120)
    name = f"{registry.host}/library/pirate:latest"
    parts = list(client.pull(name, insecure=True, stream=True))
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    assert statuses.index("verifying sha256 digest") < statuses.index("writing manifest")
    size = registry.model["size"]
    layer = [p for p in parts if p.status == f"pulling {registry.model['digest'][7:19]}"]
    assert layer and layer[-1].total == size and layer[-1].completed == size
    listed = {m.model: m.digest for m in client.list().models}
    assert listed[name] == registry.digest.removeprefix("sha256:")  # the registry's manifest, byte for byte
    out = client.generate(model=name, prompt="Say hi", options={"num_predict": 2, "temperature": 0})
    assert out.done and 1 <= out.eval_count <= 2


def test_second_pull_and_pull_by_digest_download_nothing(registry, served):
    host = registry.host
    first = run_cli("pull", "--insecure", f"{host}/library/pirate", home=served.home, **ALLOW)
    assert first.returncode == 0, first.stderr
    gets = len(registry.reg.requests())
    again = run_cli("pull", "--insecure", f"{host}/library/pirate", home=served.home, **ALLOW)
    pinned = run_cli("pull", "--insecure", f"{host}/library/pirate:pinned@{registry.digest}", home=served.home,
                     **ALLOW)
    assert again.returncode == 0 and pinned.returncode == 0, (again.stderr, pinned.stderr)
    assert len(registry.reg.requests()) == gets  # not one blob GET more
    tags = {m["model"]: m["digest"] for m in httpx.get(served.url + "/api/tags").json()["models"]}
    assert tags[f"{host}/library/pirate:pinned"] == registry.digest.removeprefix("sha256:")
    r = httpx.post(served.url + "/api/generate", json={"model": f"{host}/library/pirate:pinned", "prompt": "Hi",
                                                       "stream": False, "options": {"num_predict": 2}}, timeout=120)
    assert r.status_code == 200 and r.json()["done"], r.text


def test_a_digest_the_registry_does_not_serve_is_refused(registry, tmp_path):
    with pytest.raises(Exception, match="not found"):
        store_at(tmp_path).pull(Reference.parse(f"{registry.host}/library/tiny@sha256:{'0' * 64}"),
                                registry=INSECURE)


def test_killed_pull_resumes_with_a_range_request_and_verifies(registry, tmp_path):
    proxy = Proxy(registry.reg.url, rate=12e6)
    home = tmp_path / "home"
    env = {**os.environ, "SLMOPS_HOME": str(home), **ALLOW}
    digest = Digest.parse(registry.model["digest"])
    partial = home / "models" / "blobs" / "partial" / f"{digest.filename}.partial"
    name = f"{proxy.host}/library/pirate"
    try:
        proc = subprocess.Popen([str(BIN), "pull", "--insecure", name], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if partial.is_file() and partial.stat().st_size > 4_000_000:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the pull ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        have = partial.stat().st_size
        assert 0 < have < registry.model["size"]
        assert not (home / "models" / "blobs" / digest.filename).exists()
        proxy.rate = None
        again = run_cli("pull", "--insecure", name, home=home, **ALLOW)
        assert again.returncode == 0, again.stderr
    finally:
        proxy.stop()
    ranges = [s.headers.get("range") for s in proxy.seen if s.path.endswith(str(digest))]
    assert ranges == [None, f"bytes={have}-"]  # the first run, then only the rest
    assert (f"/v2/library/pirate/blobs/{digest}", 206, registry.model["size"] - have) in registry.reg.requests()
    assert not partial.exists()
    store = Store(home / "models")
    store.verify_blobs(ModelName.parse(name))
    assert store.manifests.path(ModelName.parse(name)).read_bytes() == registry.data


# -- refusals -------------------------------------------------------------------------------------------------
def test_a_blob_corrupted_in_the_registry_is_refused_and_the_store_is_unchanged(registry, tmp_path, cli_home):
    with Registry(tmp_path / "reg") as reg:
        manifest, blobs = ollama_manifest(registry.tiny)
        upload(reg.url, "library/tiny", "latest", manifest, blobs)
        data = reg.blob_file(sha(registry.tiny))
        broken = bytearray(data.read_bytes())
        broken[100] ^= 0xFF
        data.write_bytes(bytes(broken))
        before = stored_files(cli_home)
        r = run_cli("pull", "--insecure", f"{reg.host}/library/tiny", home=cli_home, **ALLOW)
    one_line_error(r, "does not match its digest")
    assert stored_files(cli_home) == before
    partial = cli_home / "models" / "blobs" / "partial" / f"sha256-{sha(registry.tiny)[7:]}.partial"
    assert not partial.exists()


def _fake(tiny: bytes, case: str) -> Recorder:
    """A registry that answers one model's requests with what ``case`` names."""
    manifest, blobs = ollama_manifest(tiny)
    doc = json.loads(manifest)
    blob_body = {d: b for d, b in blobs.items()}
    headers = {"Content-Type": DOCKER_MANIFEST}
    if case.startswith("huge"):
        doc["annotations"] = {"padding": "x" * (4 << 20)}
        headers = {**headers, "X-No-Length": "1"} if case == "huge-unsized" else headers
    elif case == "bad-digest":
        doc["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    elif case == "negative-size":
        doc["layers"][0]["size"] = -1
    elif case.startswith("longer"):
        blob_body[sha(tiny)] = tiny + b"\0" * 4096
    body = json.dumps(doc).encode()
    routes = {"/v2/library/m/manifests/latest": lambda req: (200, headers, body)}
    for digest, content in blob_body.items():
        extra = {"X-No-Length": "1"} if case == "longer-unsized" else {}
        routes[f"/v2/library/m/blobs/{digest}"] = lambda req, c=content, e=extra: (200, e, c)
    return Recorder(routes)


@pytest.mark.parametrize("case,error,text", [
    ("huge", SourceError, "over the 4 MiB"),
    ("huge-unsized", SourceError, "over the 4 MiB"),
    ("bad-digest", SourceError, "invalid digest"),
    ("negative-size", SourceError, "size -1"),
    ("longer", IntegrityError, "sent more than the"),
    ("longer-unsized", IntegrityError, "sent more than the"),
])
def test_bad_manifests_and_overlong_blobs_are_refused(registry, tmp_path, case, error, text):
    with _fake(registry.tiny, case) as fake:
        store = store_at(tmp_path / "models")
        with pytest.raises(error, match=text):
            store.pull(Reference.parse(f"{fake.host}/library/m"), registry=INSECURE)
    assert store.list() == [] and not list((tmp_path / "models" / "blobs").glob("sha256-*"))
    assert not (tmp_path / "models" / "blobs" / "partial" / f"sha256-{sha(registry.tiny)[7:]}.partial").exists()


def test_cli_errors_are_one_line(registry, tmp_path):
    with _fake(registry.tiny, "bad-digest") as fake:
        r = run_cli("pull", "--insecure", f"{fake.host}/library/m", home=tmp_path, **ALLOW)
    one_line_error(r, 'names an invalid digest "sha256:../../../../etc/passwd"')
    plain = run_cli("pull", f"http://{registry.host}/library/tiny", home=tmp_path, **ALLOW)
    one_line_error(plain, "is plain HTTP; pull with --insecure")
    tls = run_cli("pull", f"{registry.host}/library/tiny", home=tmp_path, **ALLOW)
    one_line_error(tls, "it may speak plain HTTP: pull with --insecure")


def test_loopback_registries_are_refused_unless_allowed(registry, tmp_path):
    before = len(registry.reg.requests(part="/library/tiny/"))
    r = run_cli("pull", "--insecure", f"{registry.host}/library/tiny", home=tmp_path)
    one_line_error(r, "resolves to an internal address")
    assert len(registry.reg.requests(part="/library/tiny/")) == before  # not one request was sent


# -- auth and transport --------------------------------------------------------------------------------------------
def test_basic_auth_from_env_or_registries_json_and_the_password_never_shows(registry, tmp_path):
    with Registry(tmp_path / "basic", auth="htpasswd", users={"alice": PASSWORD},
                  storage=registry.reg.storage) as reg:
        name = f"{reg.host}/library/tiny"
        anonymous = run_cli("pull", "--insecure", name, home=tmp_path / "h1", **ALLOW)
        one_line_error(anonymous, f"registry {reg.host} needs a login for library/tiny")
        wrong = run_cli("pull", "--insecure", name, home=tmp_path / "h1", SLMOPS_REGISTRY_USERNAME="alice",
                        SLMOPS_REGISTRY_PASSWORD="wrong-" + PASSWORD, **ALLOW)
        one_line_error(wrong, 'refused the login of user "alice"')
        assert PASSWORD not in wrong.stdout + wrong.stderr
        home = tmp_path / "h2"
        home.mkdir()
        creds = home / "registries.json"
        creds.write_text(json.dumps({reg.host: {"username": "alice", "password": PASSWORD}}))
        creds.chmod(0o644)
        one_line_error(run_cli("pull", "--insecure", name, home=home, **ALLOW), "can be read by other users")
        creds.chmod(0o600)
        ok = run_cli("pull", "--insecure", name, home=home, **ALLOW)
        assert ok.returncode == 0 and "success" in ok.stderr, ok.stderr
        assert PASSWORD not in ok.stdout + ok.stderr
        env = run_cli("env", home=home, SLMOPS_REGISTRY_USERNAME="alice", SLMOPS_REGISTRY_PASSWORD=PASSWORD)
        assert "SLMOPS_REGISTRY_PASSWORD=(set, hidden)" in env.stdout and PASSWORD not in env.stdout
    for line in (home / "audit" / "audit.log").read_text().splitlines():
        assert PASSWORD not in line


def test_token_auth_challenge_flow(registry, tmp_path):
    tokens = TokenServer(tmp_path / "tokens", users={"bob": PASSWORD})
    try:
        with Registry(tmp_path / "treg", auth="token", token=tokens, storage=registry.reg.storage) as reg:
            ref = Reference.parse(f"{reg.host}/library/tiny")
            with pytest.raises(SourceError, match="refused access to library/tiny without a login"):
                store_at(tmp_path / "anon").pull(ref, registry=INSECURE)
            store = store_at(tmp_path / "bob")
            config = RegistryConfig(logins={reg.host: Login("bob", PASSWORD)}, insecure=True)
            store.pull(ref, registry=config)
    finally:
        tokens.stop()
    assert store.manifests.path(ref.name).read_bytes() == registry.tiny_manifest
    assert tokens.seen == [{"user": "bob", "scopes": ["repository:library/tiny:pull"],
                                "service": "slmops-test-registry"}]  # one token, kept for every request


def _redirecting(tiny: bytes, target: Recorder) -> Recorder:
    """A registry that wants Basic auth and sends blobs to ``target`` (another host)."""
    manifest, blobs = ollama_manifest(tiny)

    def gate(answer):
        def route(req):
            if "authorization" not in req.headers:
                return 401, {"WWW-Authenticate": 'Basic realm="fake"'}, b""
            return answer(req)
        return route
    routes = {"/v2/library/m/manifests/latest": gate(lambda req: (200, {"Content-Type": DOCKER_MANIFEST}, manifest))}
    for digest, content in blobs.items():
        routes[f"/v2/library/m/blobs/{digest}"] = gate(lambda req, d=digest: (307, {"Location": f"{target.url}/o/{d}"},
                                                                              b""))
        target.state.routes[f"/o/{digest}"] = lambda req, c=content: (200, {}, c)
    return Recorder(routes)


def test_redirects_to_another_host_do_not_carry_authorization(registry, tmp_path):
    with Recorder({}, host="localhost") as storage, _redirecting(registry.tiny, storage) as reg:
        config = RegistryConfig(logins={reg.host: Login("carol", PASSWORD)}, insecure=True)
        store_at(tmp_path).pull(Reference.parse(f"{reg.host}/library/m"), registry=config)
    assert any(s.path.startswith("/v2/library/m/blobs/") and "authorization" in s.headers for s in reg.seen)
    assert len(storage.seen) == 2 and not any("authorization" in s.headers for s in storage.seen)


def test_every_redirect_hop_passes_the_private_address_guard(registry, tmp_path, monkeypatch):
    import slmops.store.network as network
    import slmops.store.pulling as pulling
    import slmops.store.registry as client
    with Recorder({}, host="localhost") as storage, _redirecting(registry.tiny, storage) as reg:
        def guard(host, allow=False):  # the registry itself passes; any other host meets the real check
            if host not in (reg.host, "127.0.0.1"):
                network.check_registry_host(host, False)
        monkeypatch.setattr(client, "check_registry_host", guard)
        monkeypatch.setattr(pulling, "check_registry_host", guard)
        config = RegistryConfig(logins={reg.host: Login("carol", PASSWORD)}, insecure=True)
        with pytest.raises(InvalidInput, match='"localhost" resolves to an internal address'):
            store_at(tmp_path).pull(Reference.parse(f"{reg.host}/library/m"), registry=config)
    assert storage.seen == []


def test_https_registry_with_slmops_ca_bundle(registry, tmp_path):
    cert, key = self_signed(tmp_path, "127.0.0.1")
    with Registry(tmp_path / "tls", storage=registry.reg.storage, tls=(cert, key)) as reg:
        ref = Reference.parse(f"{reg.host}/library/tiny")
        with pytest.raises(SourceError, match="certificate not trusted.*SLMOPS_CA_BUNDLE"):
            store_at(tmp_path / "a").pull(ref)
        store = store_at(tmp_path / "b")
        store.pull(ref, registry=RegistryConfig(ca_bundle=cert))
    assert store.exists(ref.name)


# -- store kinds: OCI artifacts, sealed stores, signatures ----------------------------------------------------------
def test_oci_artifact_with_a_bare_gguf_becomes_a_model(registry, tmp_path):
    empty = b"{}"
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.gguf",
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(empty), "size": 2},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(registry.tiny),
                       "size": len(registry.tiny), "annotations": {"org.opencontainers.image.title": "tiny.gguf"}}]}
    digest = upload(registry.reg.url, "library/artifact", "v1", json.dumps(doc).encode(),
                    {sha(empty): empty, sha(registry.tiny): registry.tiny}, media_type=OCI_MANIFEST)
    store = store_at(tmp_path)
    name = ModelName.parse(f"{registry.host}/library/artifact:v1")
    manifest = store.pull(Reference.of(name), registry=INSECURE)
    assert manifest.layer(mt.MODEL).digest == sha(registry.tiny)
    assert store.read_text(manifest, mt.TEMPLATE).startswith("{% for m in messages %}")
    config = store.config(name)
    assert config["model_family"] == "llama" and config["source_manifest"] == digest
    store.verify(name)


def test_sealed_store_seals_pulled_blobs(registry, tmp_path):
    store = store_at(tmp_path, key=os.urandom(32))
    name = store.pull(Reference.parse(f"{registry.host}/library/tiny"), registry=INSECURE)
    for layer in name.all_layers():
        assert store.blobs.is_sealed(layer.blob)
    store.verify_blobs(ModelName.parse(f"{registry.host}/library/tiny"))
    assert registry.tiny not in store.blobs.path(Digest.parse(sha(registry.tiny))).read_bytes()


def test_signature_travels_with_the_model_and_trusted_keys_gate_the_pull(registry, tmp_path):
    from test_signing import keypair
    from slmops.security.signing import TrustPolicy, sign
    priv, pub = keypair(tmp_path, "release")
    _, stranger = keypair(tmp_path, "stranger")
    signer = store_at(tmp_path / "signer")
    name = ModelName.parse(f"{registry.host}/library/tiny")
    signer.pull(Reference.of(name), registry=INSECURE)
    bundle = sign(signer, name, priv).read_bytes()
    empty = b"{}"
    sig_manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(empty), "size": 2},
                    "layers": [{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "digest": sha(bundle),
                                "size": len(bundle)}]}
    manifest, blobs = ollama_manifest(registry.tiny)
    upload(registry.reg.url, "library/signed", "latest", manifest, blobs)
    upload(registry.reg.url, "library/signed", f"sha256-{registry.tiny_digest[7:]}.sig",
           json.dumps(sig_manifest).encode(), {sha(empty): empty, sha(bundle): bundle}, media_type=OCI_MANIFEST)
    signed = Reference.parse(f"{registry.host}/library/signed")
    trusted = store_at(tmp_path / "trusted", trust=TrustPolicy([pub]))
    trusted.pull(signed, registry=INSECURE)
    assert trusted.signature_path(signed.name).read_bytes() == bundle
    with pytest.raises(UntrustedModel, match="is not signed"):
        trusted.pull(Reference.of(name), registry=INSECURE)
    other = store_at(tmp_path / "other", trust=TrustPolicy([stranger]))
    with pytest.raises(UntrustedModel, match="not signed by a trusted key"):
        other.pull(signed, registry=INSECURE)
    for refused in (other, trusted):
        assert [r.name for r in refused.list()] == ([signed.name] if refused is trusted else [])
    assert not [p for p in (tmp_path / "other").rglob("sha256-*") if p.is_file() and "partial" not in p.parts]


# -- the client's push half ------------------------------------------------------------------------------------
def test_client_push_primitives_round_trip(registry):
    data = os.urandom(3 << 20)
    digest = Digest.of_bytes(data)
    config = b'{"model_format":"gguf"}'
    doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
           "config": {"mediaType": mt.CONFIG_MEDIA_TYPE, "digest": sha(config), "size": len(config)},
           "layers": [{"mediaType": mt.MODEL, "digest": str(digest), "size": len(data)}]}
    manifest = json.dumps(doc).encode()
    with RegistryClient(registry.host, INSECURE, allow_internal=True) as c:
        assert not c.has_blob("library/pushed", digest)
        location = c.upload_chunk(c.start_upload("library/pushed"), data[:2 << 20], 0)
        c.finish_upload(location, digest, data[2 << 20:])
        c.finish_upload(c.start_upload("library/pushed"), Digest.parse(sha(config)), config)
        assert c.has_blob("library/pushed", digest)
        assert c.put_manifest("library/pushed", "v1", manifest) == Digest.of_bytes(manifest)
    got = httpx.get(f"{registry.reg.url}/v2/library/pushed/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
    assert got.content == manifest
    assert httpx.get(f"{registry.reg.url}/v2/library/pushed/blobs/{digest}").content == data


# -- blob bodies straight from the socket ------------------------------------------------------------------------
def _no_httpx_body(*a, **kw):
    raise AssertionError("the body went through httpx")


def test_blob_bodies_come_straight_from_the_socket_over_plain_http(registry, monkeypatch):
    """The transport reads each response head exactly, so a blob's body is read from the socket, not through h11;
    the connection that served it is closed, and the client's next requests open another."""
    data = os.urandom(3 << 20)
    digest = Digest.of_bytes(data)
    with RegistryClient(registry.host, INSECURE, allow_internal=True) as c:
        c.finish_upload(c.start_upload("library/direct"), digest, data)
        monkeypatch.setattr(httpx.Response, "iter_bytes", _no_httpx_body)
        for _ in range(2):
            with c.blob("library/direct", digest) as r:
                assert b"".join(iter_body(r)) == data
            with c.blob("library/direct", digest, 1 << 20) as r:
                assert r.status_code == 206 and b"".join(iter_body(r)) == data[1 << 20:]
        monkeypatch.undo()
        assert c.has_blob("library/direct", digest)


@pytest.mark.parametrize("case", ["head in two pieces", "chunked body"])
def test_bodies_the_socket_cannot_give_whole_go_through_httpx(case, monkeypatch):
    body = os.urandom(300_000)
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            if case == "head in two pieces":  # the peek sees no end of the head: h11 reads it, and may read on
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                time.sleep(0.3)
                conn.sendall(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    through_httpx = []
    real = httpx.Response.iter_bytes
    monkeypatch.setattr(httpx.Response, "iter_bytes", lambda self, *a: (through_httpx.append(1), real(self, *a))[1])
    with server, httpx.Client(transport=BulkTransport(ssl.create_default_context())) as client, \
            client.stream("GET", f"http://127.0.0.1:{server.getsockname()[1]}/blob") as r:
        assert b"".join(iter_body(r)) == body
    assert through_httpx == [1]
