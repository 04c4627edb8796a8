"""Attack classes from Ollama's CVE history, each reproduced against a real server process: path traversal through
digests and names (CVE-2024-37032), crafted GGUF uploads (CVE-2025-0315/0317), and resource exhaustion through
nested JSON or huge context and prediction sizes. After each attack the server must still serve the model."""

import hashlib
import struct

import httpx
import ollama
import pytest

from conftest import Server, link_home

M = "smollm2:135m"


@pytest.fixture(scope="module")
def srv(shared_home, tmp_path_factory):
    with Server(link_home(shared_home, tmp_path_factory.mktemp("hardening")), SLMOPS_CONTEXT_LENGTH="512") as s:
        yield s


def still_serving(srv: Server) -> None:
    assert ollama.Client(host=srv.url).generate(model=M, prompt="Hi", options={"num_predict": 2}).done
    escaped = [p for p in srv.home.rglob("*") if "passwd" in p.name or p.name == "pwned"]
    assert escaped == []


def upload(srv: Server, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{srv.url}/api/blobs/{digest}", content=data, timeout=120).status_code == 201
    return digest


@pytest.mark.parametrize("digest", ["sha256:../../../etc/passwd", "sha256:..%2F..%2Fetc%2Fpasswd",
                                    "sha256-" + "a" * 64, "sha256:" + "g" * 64, "md5:" + "a" * 32,
                                    "sha256:" + "a" * 63 + "%00"])
def test_blob_digests_cannot_name_a_path(srv, digest):
    for method in ("HEAD", "POST"):
        r = httpx.request(method, f"{srv.url}/api/blobs/{digest}", content=b"x" if method == "POST" else None,
                          timeout=30)
        assert r.status_code in (400, 404), (method, digest, r.status_code)
    r = httpx.post(srv.url + "/api/create", json={"model": "x", "files": {"m.gguf": digest}, "stream": False})
    assert r.status_code in (400, 404) and "error" in r.json()
    still_serving(srv)


@pytest.mark.parametrize("name", ["../../../tmp/pwned", "..%2F..%2Fpwned", "a/../../pwned", "/etc/passwd",
                                  "x:../../pwned", "./.:latest"])
def test_model_names_cannot_escape_the_store(srv, name):
    calls = [("/api/pull", {"model": name, "stream": False}),
             ("/api/create", {"model": name, "from": M, "stream": False}),
             ("/api/copy", {"source": M, "destination": name}),
             ("/api/show", {"model": name}),
             ("/api/generate", {"model": name, "prompt": "x", "stream": False})]
    for path, body in calls:
        r = httpx.post(srv.url + path, json=body, timeout=60)
        assert r.status_code in (400, 404), (path, name, r.status_code, r.text)
    assert httpx.request("DELETE", srv.url + "/api/delete", json={"model": name}).status_code in (400, 404)
    still_serving(srv)


def crafted(model_file) -> dict[str, bytes]:
    data = model_file.read_bytes()
    header = b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60) + b"\0" * 64  # tensor and key counts no file holds
    return {"truncated": data[: len(data) // 2], "absurd counts": header,
            "not gguf": b"<html>" + b"\0" * 1024, "empty": b""}


@pytest.mark.parametrize("kind", ["truncated", "absurd counts", "not gguf", "empty"])
def test_a_crafted_gguf_upload_is_a_400_and_the_server_lives(srv, model_file, kind):
    digest = upload(srv, crafted(model_file)[kind])
    r = httpx.post(srv.url + "/api/create", json={"model": "crafted", "files": {"m.gguf": digest},
                                                   "stream": False}, timeout=120)
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert "GGUF" in message or "model file" in message, message
    assert "\n" not in message and str(srv.home) not in message
    assert httpx.post(srv.url + "/api/show", json={"model": "crafted"}).status_code == 404  # nothing half-made
    still_serving(srv)


def test_deeply_nested_json_is_a_400(srv):
    deep = b'{"model": "' + M.encode() + b'", "prompt": "x", "options": ' + b'{"a": ' * 100_000 + b"1" + \
        b"}" * 100_000 + b"}"
    for path in ("/api/generate", "/v1/chat/completions"):
        r = httpx.post(srv.url + path, content=deep, timeout=60)
        assert r.status_code in (400, 413), (path, r.status_code)
    lists = b'{"model": "' + M.encode() + b'", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert httpx.post(srv.url + "/api/chat", content=lists, timeout=60).status_code in (400, 413)
    still_serving(srv)


def test_huge_sizes_are_clamped_or_refused_never_allocated(srv):
    """num_ctx is capped at what the model was trained for (as Ollama does), num_predict by the context; a value
    that is no integer at all is a 400 naming the option."""
    for num_ctx in (10**9, 1e300):  # a whole-number float is an integer to Ollama's clients too
        r = httpx.post(srv.url + "/api/generate", json={"model": M, "prompt": "Say hi.", "stream": False,
                                                         "options": {"num_ctx": num_ctx, "num_predict": 3}},
                       timeout=120)
        assert r.status_code == 200 and r.json()["eval_count"] <= 3
        loaded = httpx.get(srv.url + "/api/ps").json()["models"]
        assert loaded and all(m["context_length"] <= 8192 for m in loaded)  # SmolLM2's trained context
    r = httpx.post(srv.url + "/api/generate", json={"model": M, "prompt": "1, 2, 3,", "raw": True, "stream": False,
                                                     "options": {"num_predict": 10**12, "num_ctx": 64}}, timeout=120)
    assert r.status_code == 200 and r.json()["eval_count"] < 64  # bounded by the context, not by num_predict
    for options in ({"num_ctx": 10**30}, {"num_ctx": -1}, {"num_predict": "lots"}, {"num_ctx": 1.5}):
        r = httpx.post(srv.url + "/api/generate", json={"model": M, "prompt": "x", "stream": False,
                                                         "options": options}, timeout=60)
        error = r.json()["error"]
        assert r.status_code == 400 and (next(iter(options)) in error or "too large" in error), (options, error)
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": M, "max_tokens": 10**12,
                                                            "messages": [{"role": "user", "content": "Hi"}]},
                   timeout=120)
    assert r.status_code in (200, 400), r.text
    still_serving(srv)
