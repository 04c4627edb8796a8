"""Access control against a real server: keys with the official clients, every route of the role table with
every role, rate limits, the audit trail it writes, TLS, and refusing to listen on a network without keys."""

import datetime
import json
import os
import ssl
import subprocess

import httpx
import ollama
import openai
import pytest

from conftest import BIN, Server, free_port, link_home
from slmops.security import roles
from slmops.security.audit import AuditLog, verify
from slmops.security.keys import KeyStore

M = "smollm2:135m"
ROLE_NAMES = ("admin", "operator", "user", "metrics")


@pytest.fixture(scope="module")
def secured(shared_home, tmp_path_factory):
    home = link_home(shared_home, tmp_path_factory.mktemp("secured"))
    ks = KeyStore(home / "keys.json")
    keys = {role: ks.create(f"{role}-key", role) for role in ROLE_NAMES}
    s = Server(home, SLMOPS_NUM_PARALLEL="2")
    s.keys = keys
    yield s
    s.stop()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_official_clients_send_keys(secured):
    c = ollama.Client(host=secured.url, headers=auth(secured.keys["user"]))
    assert c.generate(model=M, prompt="hi", options={"num_predict": 3}).done
    o = openai.OpenAI(base_url=secured.url + "/v1", api_key=secured.keys["user"], max_retries=0)
    assert o.chat.completions.create(model=M, messages=[{"role": "user", "content": "hi"}], max_tokens=3).choices
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=secured.url).generate(model=M, prompt="hi")
    assert err.value.status_code == 401 and "API key" in err.value.error
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=secured.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert err.value.body["type"] == "authentication_error"


def test_unauthenticated_refusals_have_each_api_shape(secured):
    r = httpx.post(secured.url + "/api/chat", json={"model": M})
    assert r.status_code == 401 and set(r.json()) == {"error"}
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(secured.url + "/v1/chat/completions", json={}, headers=auth("slm_000000000000_" + "a" * 43))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(secured.url + "/api/pull", json={"model": M}, headers=auth(secured.keys["user"]))
    assert r.status_code == 403 and 'role "user" may not call POST /api/pull' in r.json()["error"]
    for path in ("/", "/health", "/ready", "/api/version", "/openapi.json"):
        assert httpx.get(secured.url + path).status_code == 200, path


def _call(url: str, method: str, path: str, key: str) -> int:
    """Call a route with a body that passes validation where one is easy, so a 4xx means the role check."""
    concrete = path.replace("{model:path}", M).replace("{digest}", "sha256:" + "0" * 64)
    bodies = {"/api/generate": {"model": M, "prompt": "hi", "options": {"num_predict": 1}},
              "/api/chat": {"model": M, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 1}},
              "/api/embed": {"model": "absent:model", "input": "x"}, "/api/embeddings": {"model": "absent:model"},
              "/api/tokenize": {"model": M, "text": "hi"}, "/api/detokenize": {"model": M, "tokens": [1]},
              "/api/show": {"model": M}, "/api/copy": {"source": M, "destination": "rbac-copy"},
              "/api/delete": {"model": "rbac-copy"}, "/api/pull": {"model": "absent/model:x", "stream": False},
              "/api/create": {"model": "rbac-made", "from": M},
              "/v1/chat/completions": {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
              "/v1/completions": {"model": M, "prompt": "hi", "max_tokens": 1},
              "/v1/embeddings": {"model": "absent:model", "input": "x"}}
    kw = {"json": bodies.get(path, {})} if method in ("POST", "DELETE") else {}
    if path.startswith("/api/blobs"):
        kw = {"content": b"x"} if method == "POST" else {}
    return httpx.request(method, url + concrete, headers=auth(key), timeout=120, **kw).status_code


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_every_route_answers_each_role_as_the_table_says(secured, role):
    for (method, path), needed in roles.ROUTES.items():
        if path in ("/docs", "/docs/oauth2-redirect", "/redoc") or method == "HEAD" and path == "/":
            continue
        status = _call(secured.url, method, path, secured.keys[role])
        allowed = roles.allowed(role, needed)
        assert (status not in (401, 403)) == allowed, f"{role} {method} {path} -> {status}"
        assert status < 500, f"{role} {method} {path} -> {status}"


def test_explicit_load_and_unload_need_manage(secured):
    user = ollama.Client(host=secured.url, headers=auth(secured.keys["user"]))
    for call in (lambda c: c.generate(model=M), lambda c: c.generate(model=M, keep_alive=0),
                 lambda c: c.chat(model=M, messages=[{"role": "user", "content": "hi"}], keep_alive=0)):
        with pytest.raises(ollama.ResponseError) as err:
            call(user)
        assert err.value.status_code == 403 and "operator" in err.value.error
    operator = ollama.Client(host=secured.url, headers=auth(secured.keys["operator"]))
    assert operator.generate(model=M).done_reason == "load"


def test_a_revoked_key_is_refused_without_a_restart(secured):
    ks = KeyStore(secured.home / "keys.json")
    temp = ks.create("temporary", "user")
    assert httpx.get(secured.url + "/api/tags", headers=auth(temp)).status_code == 200
    ks.revoke("temporary")
    assert httpx.get(secured.url + "/api/tags", headers=auth(temp)).status_code == 401


def test_audit_records_who_did_what_without_content(secured):
    c = ollama.Client(host=secured.url, headers=auth(secured.keys["user"]))
    secret_prompt = "the launch code is zebra-quartz"  # not hexadecimal: no request id or hash can hold it
    r = c.generate(model=M, prompt=secret_prompt, options={"num_predict": 4})
    httpx.post(secured.url + "/api/pull", json={"model": M}, headers=auth(secured.keys["user"]))
    log = AuditLog(secured.home / "audit" / "audit.log")
    text = log.path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    gen = [x for x in records if x["route"] == "/api/generate" and x["prompt_tokens"] == r.prompt_eval_count
           and x["key"] == "user-key"][-1]
    assert gen["role"] == "user" and gen["model"] == M and gen["status"] == 200 and gen["client"] == "127.0.0.1"
    assert gen["completion_tokens"] == r.eval_count and len(gen["request_id"]) == 16
    assert secret_prompt not in text and "zebra-quartz" not in text
    denied = [x for x in records if x["route"] == "/api/pull" and x["status"] == 403]
    assert denied and denied[-1]["key"] == "user-key"
    assert not any(x["route"] in ("/health", "/api/version") for x in records)  # public probes are not audited
    assert verify(log).ok


def test_content_is_audited_only_when_asked(shared_home, tmp_path):
    s = Server(link_home(shared_home, tmp_path), SLMOPS_AUDIT_CONTENT="1")
    try:
        r = ollama.Client(host=s.url).generate(model=M, prompt="remember 4471", options={"num_predict": 4})
        records = [json.loads(x) for x in (tmp_path / "audit" / "audit.log").read_text().splitlines()]
        gen = [x for x in records if x["route"] == "/api/generate"][-1]
        assert "remember 4471" in gen["content"]["request"] and gen["content"]["completions"] == [r.response]
        assert gen["key"] == "-" and gen["role"] == "local"  # loopback without keys: no auth, still audited
    finally:
        s.stop()


def test_rate_limits_answer_429_with_retry_after(shared_home, tmp_path):
    home = link_home(shared_home, tmp_path)
    key = KeyStore(home / "keys.json").create("limited", "user", requests_per_minute=3)
    s = Server(home, SLMOPS_TOKEN_LIMIT="100000")
    try:
        statuses = [httpx.get(s.url + "/api/tags", headers=auth(key)).status_code for _ in range(4)]
        assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
        r = httpx.post(s.url + "/v1/completions", json={"model": M, "prompt": "hi"}, headers=auth(key))
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 20
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0).models.list()
    finally:
        s.stop()


def test_token_limit_counts_generated_tokens(shared_home, tmp_path):
    home = link_home(shared_home, tmp_path)
    key = KeyStore(home / "keys.json").create("thrifty", "user", tokens_per_minute=60)
    s = Server(home)
    try:
        c = ollama.Client(host=s.url, headers=auth(key))
        c.generate(model=M, prompt="Write a long story.", options={"num_predict": 80})  # overdraws the bucket
        with pytest.raises(ollama.ResponseError) as err:
            c.generate(model=M, prompt="hi", options={"num_predict": 2})
        assert err.value.status_code == 429
    finally:
        s.stop()


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls(shared_home, tmp_path):
    cert, key = _self_signed(tmp_path)
    home = link_home(shared_home, tmp_path / "h")
    trust = ssl.create_default_context(cafile=str(cert))
    s = Server(home, args=("--tls-cert", str(cert), "--tls-key", str(key)), verify=trust)
    try:
        assert s.url.startswith("https://")
        c = ollama.Client(host=s.url, verify=trust)
        assert c.generate(model=M, prompt="hi", options={"num_predict": 2}).done
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url.replace("https", "http") + "/health", timeout=5)
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused by a default client
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.stop()


def test_serve_refuses_a_network_address_without_keys(tmp_path):
    port = free_port()
    env = {**os.environ, "SLMOPS_HOME": str(tmp_path), "SLMOPS_HOST": f"0.0.0.0:{port}"}
    r = subprocess.run([str(BIN), "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "refusing to serve on 0.0.0.0 without API keys" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    proc = subprocess.Popen([str(BIN), "serve", "--insecure"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                import time
                time.sleep(0.1)
        # Off loopback, the Host check does not apply, but every other route still wants nothing: --insecure.
        assert httpx.get(f"http://127.0.0.1:{port}/api/tags").status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert "WARNING: serving on 0.0.0.0 without API keys" in err
    r = subprocess.run([str(BIN), "serve", "--tls-cert", str(tmp_path / "nope.pem")], capture_output=True,
                       text=True, timeout=60, env={**env, "SLMOPS_HOST": f"127.0.0.1:{port}"})
    assert r.returncode == 1 and "needs both --tls-cert and --tls-key" in r.stderr


def test_a_corrupted_blob_is_refused_at_load_and_the_server_lives(shared_home, tmp_path):
    from slmops.store.store import Store
    from slmops.types.name import ModelName
    home = link_home(shared_home, tmp_path)
    store = Store(home / "models")
    blob = store.model_path(ModelName.parse(M))
    s = Server(home)
    try:
        assert ollama.Client(host=s.url).generate(model=M, prompt="hi", options={"num_predict": 1}).done
        assert any((home / "models" / "cache" / "verified").iterdir())  # verified once, remembered
        data = bytearray(blob.read_bytes())  # a new file, not the hard-linked original
        data[len(data) // 2] ^= 0xFF
        (tmp_path / "bad").write_bytes(data)
        os.replace(tmp_path / "bad", blob)
        r = httpx.post(s.url + "/api/generate", json={"model": M, "prompt": "hi"}, timeout=120)
        assert r.status_code == 400 and "is corrupt" in r.json()["error"] and "pull" in r.json()["error"]
        assert str(home) not in r.text
        assert httpx.get(s.url + "/api/tags").status_code == 200
    finally:
        s.stop()


@pytest.mark.parametrize("name", ["127.0.0.1:5000/library/x", "169.254.169.254/latest/meta", "10.0.0.8/lib/m",
                                  "localhost/lib/m", "[::1]:8080/lib/m"])
def test_pull_refuses_registry_hosts_on_internal_addresses(secured, name):
    r = httpx.post(secured.url + "/api/pull", json={"model": name, "stream": False},
                   headers=auth(secured.keys["operator"]), timeout=60)
    if "[" in name:  # not a valid host in the name grammar: refused even earlier
        assert r.status_code == 400
        return
    assert r.status_code == 400 and "internal address" in r.json()["error"], r.text
    if name.startswith("localhost"):  # the address a name resolves to is not told: it would map the network
        assert "127.0.0.1" not in r.json()["error"] and "::1" not in r.json()["error"]


def test_internal_registries_can_be_allowed(tmp_path):
    env = {**os.environ, "SLMOPS_HOME": str(tmp_path)}
    refused = subprocess.run([str(BIN), "pull", "127.0.0.1:5000/library/x"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "internal address" in refused.stderr
    allowed = subprocess.run([str(BIN), "pull", "127.0.0.1:5000/library/x"], capture_output=True, text=True,
                             timeout=60, env={**env, "SLMOPS_ALLOW_PRIVATE_REGISTRIES": "true"})
    # past the guard: nothing listens there
    assert allowed.returncode == 1 and "internal address" not in allowed.stderr and "cannot reach" in allowed.stderr


def test_error_messages_never_show_server_paths(secured):
    h = auth(secured.keys["admin"])
    bad = [("POST", "/api/create", {"model": "x", "from": "/etc/passwd", "stream": False}),
           ("POST", "/api/create", {"model": "x", "modelfile": "FROM ./weights.gguf", "stream": False}),
           ("POST", "/api/create", {"model": "x", "files": {"a.gguf": "sha256:" + "1" * 64}, "stream": False}),
           ("POST", "/api/show", {"model": "../../etc/passwd"}),
           ("POST", "/api/generate", {"model": "absent:tag", "prompt": "x"}),
           ("POST", "/api/generate", {"model": M, "prompt": "x " * 3000, "options": {"num_ctx": 256}}),
           ("POST", "/api/embed", {"model": M, "input": "x " * 6000, "truncate": False, "options": {"num_ctx": 256}}),
           ("DELETE", "/api/delete", {"model": "absent:tag"}),
           ("POST", "/api/blobs/sha256:" + "2" * 64, None)]
    for method, path, body in bad:
        kw = {"json": body} if body is not None else {"content": b"not the digest"}
        r = httpx.request(method, secured.url + path, headers=h, timeout=120, **kw)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        for leak in (str(secured.home), "/root", "/work/", "/tmp/", ".venv", "site-packages"):
            assert leak not in r.text, (path, r.text)


def test_every_reply_is_audited_before_the_client_holds_it(secured):
    """A reply whose last byte leaves before the message that ends the body (Content-Length) was once audited
    after the client already had it."""
    log = secured.home / "audit" / "audit.log"
    with httpx.Client(headers=auth(secured.keys["user"])) as c:
        for _ in range(300):  # the race lost about 1 in 60 refusals here
            r = c.post(secured.url + "/api/pull", json={"model": M})
            assert r.status_code == 403 and r.headers["x-request-id"] in log.read_text()
