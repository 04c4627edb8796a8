"""Raw HTTP against a real server: malformed input, limits, guards, operations endpoints, cancellation,
queue bounds, and a schemathesis run over the OpenAPI document."""

import json
import re
import subprocess
import time

import httpx
import pytest

from conftest import HTTP, BIN, Server, link_home
from slmops.security.keys import KeyStore

M = "smollm2:135m"
# Greedy counting goes on until the token limit: a generation that is certain to still be running.
ENDLESS = {"model": M, "prompt": "1, 2, 3, 4, 5,", "raw": True,
           "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 100000, "num_ctx": 8192}}


def metric(url: str, name: str, labels: str = "") -> float:
    text = HTTP.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed", "/api/show"])
def test_malformed_json_is_400_ollama_shape(server, path):
    r = HTTP.post(server.url + path, content=b'{"model": ')
    assert r.status_code == 400 and r.json() == {"error": "invalid JSON in request body"}


def test_malformed_json_is_400_openai_shape(server):
    r = HTTP.post(server.url + "/v1/chat/completions", content=b"[1, 2")
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,field", [
    ({"model": M, "messages": "hi"}, "messages"),
    ({"model": M, "messages": [{"role": "user", "content": 5}]}, "content"),
    ({"model": 3, "prompt": "x"}, "model"),
    ({"model": M, "prompt": "x", "stream": "maybe"}, "stream"),
])
def test_wrong_types_name_the_field(server, body, field):
    path = "/api/chat" if "messages" in body else "/api/generate"
    r = HTTP.post(server.url + path, json=body)
    assert r.status_code == 400 and field in r.json()["error"]


def test_unknown_fields_are_ignored_and_form_content_type_accepted(server):
    r = HTTP.post(server.url + "/api/generate", json={"model": M, "prompt": "hi", "stream": False,
                                                        "bogus": {"x": 1}, "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.json()["done"]
    r = HTTP.post(server.url + "/api/generate", content=json.dumps({"model": M, "prompt": "hi", "stream": False,
                                                                      "options": {"num_predict": 1}}),
                   headers={"Content-Type": "application/x-www-form-urlencoded"})  # what `curl -d` sends
    assert r.status_code == 200


def test_unknown_route_and_method(server):
    r = HTTP.get(server.url + "/api/nope")
    assert r.status_code == 404 and r.json() == {"error": "GET /api/nope is not a route of this server; see /docs "
                                                          "for the API"}
    r = HTTP.get(server.url + "/api/chat")
    assert r.status_code == 405 and "GET /api/chat" in r.json()["error"]
    r = HTTP.post(server.url + "/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("POST /v1/nope is not a route")
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_is_413(shared_home, tmp_path):
    s = Server(link_home(shared_home, tmp_path / "h"), SLMOPS_MAX_REQUEST_BYTES="1000")
    try:
        r = HTTP.post(s.url + "/api/generate", json={"model": M, "prompt": "x" * 2000})
        assert r.status_code == 413 and "larger than 1000 bytes" in r.json()["error"]

        def chunks():
            for _ in range(5):
                yield b" " * 400
        r = HTTP.post(s.url + "/v1/chat/completions", content=chunks())  # no Content-Length
        assert r.status_code == 413 and "larger than 1000" in r.json()["error"]["message"]
        ok = HTTP.post(s.url + "/api/show", json={"model": M})
        assert ok.status_code == 200
    finally:
        s.stop()


def test_dns_rebinding_host_is_refused(server):
    r = HTTP.get(server.url + "/api/tags", headers={"Host": "attacker.example:11434"})
    assert r.status_code == 403 and "host not allowed" in r.json()["error"]
    for host in ("localhost:11434", "127.0.0.1", "[::1]:11434", "app.localhost"):
        assert HTTP.get(server.url + "/api/tags", headers={"Host": host}).status_code == 200


def test_cors_allows_local_origins_only(server):
    ok = HTTP.options(server.url + "/api/chat", headers={"Origin": "http://localhost:3000",
                                                          "Access-Control-Request-Method": "POST"})
    assert ok.headers.get("access-control-allow-origin") == "http://localhost:3000"
    bad = HTTP.options(server.url + "/api/chat", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in bad.headers


def test_cors_origins_setting(shared_home, tmp_path):
    s = Server(link_home(shared_home, tmp_path / "h"), SLMOPS_ORIGINS="https://app.example.com")
    try:
        r = HTTP.get(s.url + "/api/tags", headers={"Origin": "https://app.example.com"})
        assert r.headers.get("access-control-allow-origin") == "https://app.example.com"
    finally:
        s.stop()


def test_health_ready_openapi_and_metrics(server):
    assert HTTP.get(server.url + "/health").json() == {"status": "ok"}
    assert HTTP.get(server.url + "/ready").json() == {"status": "ready"}
    paths = HTTP.get(server.url + "/openapi.json").json()["paths"]
    for p in ("/api/generate", "/api/chat", "/api/embed", "/api/tokenize", "/v1/chat/completions", "/v1/models"):
        assert p in paths
    before = metric(server.url, "slmops_completion_tokens_total", f'{{model="{M}"}}')
    HTTP.post(server.url + "/api/generate", json={"model": M, "prompt": "hi", "stream": False,
                                                    "options": {"num_predict": 3, "temperature": 0}})
    text = HTTP.get(server.url + "/metrics").text
    after = metric(server.url, "slmops_completion_tokens_total", f'{{model="{M}"}}')
    assert after - before >= 1
    for name in ("slmops_requests_total", "slmops_request_duration_seconds_bucket", "slmops_prompt_tokens_total",
                 "slmops_time_to_first_token_seconds_bucket", "slmops_time_per_output_token_seconds_bucket",
                 "slmops_loaded_models", "slmops_queue_depth", "slmops_cached_prompt_tokens_total"):
        assert name in text, name
    assert 'slmops_requests_total{method="POST",route="/api/generate",status="200"}' in text


def test_a_streamed_request_is_timed_to_its_last_chunk(server):
    """The request latency histogram holds a stream's whole length, as docs/monitoring.md says, not the time to
    its response headers."""
    route = '{route="/api/generate"}'
    body = {**ENDLESS, "options": {**ENDLESS["options"], "num_predict": 40}}
    HTTP.post(server.url + "/api/generate", json={**body, "stream": False})  # loaded: the next one only streams
    before = metric(server.url, "slmops_request_duration_seconds_sum", route)
    times = []
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=120) as r:
        for _ in r.iter_lines():
            times.append(time.perf_counter())
    span = times[-1] - times[0]  # first chunk received to last: inside the server's own span for the request
    assert len(times) > 30 and span > 0.05
    assert metric(server.url, "slmops_request_duration_seconds_sum", route) - before >= 0.9 * span


def test_client_disconnect_stops_generation(server):
    cancelled = metric(server.url, "slmops_cancelled_generations_total", f'{{model="{M}"}}')
    with httpx.stream("POST", server.url + "/api/generate", json=ENDLESS, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(3):
            assert json.loads(next(lines))["done"] is False
    deadline = time.time() + 60
    while time.time() < deadline and metric(server.url, "slmops_requests_in_flight") > 0:
        time.sleep(0.2)
    assert metric(server.url, "slmops_requests_in_flight") == 0
    assert metric(server.url, "slmops_cancelled_generations_total", f'{{model="{M}"}}') == cancelled + 1
    r = HTTP.post(server.url + "/api/generate", json={"model": M, "prompt": "hi", "stream": False,
                                                        "options": {"num_predict": 2}})
    assert r.status_code == 200


def test_client_disconnect_stops_a_generation_that_is_not_streamed(server):
    """Its answer comes whole at the end, so nothing is written that could fail before: the route watches the
    connection, and the generation is cancelled when the client leaves."""
    cancelled = metric(server.url, "slmops_cancelled_generations_total", f'{{model="{M}"}}')
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/api/generate", json={**ENDLESS, "stream": False}, timeout=3)
    deadline = time.time() + 60
    while time.time() < deadline and metric(server.url, "slmops_requests_in_flight") > 0:
        time.sleep(0.2)
    assert metric(server.url, "slmops_requests_in_flight") == 0
    assert metric(server.url, "slmops_cancelled_generations_total", f'{{model="{M}"}}') == cancelled + 1


def test_full_queue_is_503(shared_home, tmp_path):
    s = Server(link_home(shared_home, tmp_path / "h"), SLMOPS_MAX_QUEUE="0", SLMOPS_NUM_PARALLEL="1")
    try:
        with httpx.stream("POST", s.url + "/api/generate", json=ENDLESS, timeout=120) as r:
            lines = r.iter_lines()  # kept referenced: a collected iterator closes the connection
            assert json.loads(next(lines))["done"] is False
            cancelled = metric(s.url, "slmops_cancelled_generations_total", f'{{model="{M}"}}')
            busy = HTTP.post(s.url + "/api/generate", json={"model": M, "prompt": "hi", "stream": False})
            assert busy.status_code == 503 and "busy" in busy.json()["error"], busy.text
            busy = HTTP.post(s.url + "/v1/chat/completions",
                              json={"model": M, "messages": [{"role": "user", "content": "hi"}]})
            assert busy.status_code == 503 and busy.json()["error"]["type"] == "server_error"
            # a refusal is not a generation the client stopped
            assert metric(s.url, "slmops_cancelled_generations_total", f'{{model="{M}"}}') == cancelled
    finally:
        s.stop()


def test_schemathesis_finds_no_server_errors(shared_home, tmp_path):
    """Property-based requests from the OpenAPI document, with auth on (an admin key reaches every route; which
    role reaches which route is walked in test_security_server); no response may be a 5xx."""
    home = link_home(shared_home, tmp_path / "h")
    key = KeyStore(home / "keys.json").create("fuzzer", "admin")
    s = Server(home, SLMOPS_CONTEXT_LENGTH="256")
    try:
        assert HTTP.get(s.url + "/api/tags").status_code == 401  # auth is on
        cmd = [str(BIN.parent / "schemathesis"), "run", s.url + "/openapi.json", "--checks", "not_a_server_error",
               "-H", f"Authorization: Bearer {key}",
               "--max-examples", "4", "--phases", "coverage,fuzzing", "--exclude-path-regex", "/api/pull",
               "--max-time", "100", "--request-timeout", "90", "--suppress-health-check", "all",
               "--seed", "20261122"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        (tmp_path / "schemathesis.log").write_text(out)
        found = out[out.find("ERRORS") if "ERRORS" in out else out.find("FAILURES"):][:6000]
        assert proc.returncode == 0, found or out[-4000:]
    finally:
        s.stop()


def test_least_recently_used_model_is_evicted(shared_home, tmp_path):
    home = link_home(shared_home, tmp_path / "h")
    s = Server(home, SLMOPS_MAX_LOADED_MODELS="1", SLMOPS_NUM_PARALLEL="1")
    try:
        assert HTTP.post(s.url + "/api/copy", json={"source": M, "destination": "other"}).status_code == 200
        for name in (M, "other:latest"):
            r = HTTP.post(s.url + "/api/generate", json={"model": name, "prompt": "hi", "stream": False,
                                                           "options": {"num_predict": 1}}, timeout=120)
            assert r.status_code == 200
            assert [m["name"] for m in HTTP.get(s.url + "/api/ps").json()["models"]] == [name]
    finally:
        s.stop()


def test_unsupported_inputs_are_400(server):
    for body in ({"model": M, "prompt": "x", "images": ["aGk="]}, {"model": M, "prompt": "x", "think": True},
                 {"model": M, "prompt": "x", "suffix": "y"}):
        r = HTTP.post(server.url + "/api/generate", json=body)
        assert r.status_code == 400 and "does not support" in r.json()["error"]
    r = HTTP.post(server.url + "/api/generate", json={"model": M, "prompt": "x", "keep_alive": "soon"})
    assert r.status_code == 400 and "invalid duration" in r.json()["error"]


def test_request_template_overrides_the_model_template(server):
    r = HTTP.post(server.url + "/api/generate", json={
        "model": M, "prompt": "The capital of France is", "stream": False, "template": "{{ .Prompt }}",
        "options": {"temperature": 0, "num_predict": 3}})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] <= 8 and "Paris" in r.json()["response"]
    r = HTTP.post(server.url + "/api/generate", json={
        "model": M, "prompt": "x", "template": "{{ .Prompt | bad }}"})
    assert r.status_code == 400 and "TEMPLATE" in r.json()["error"]


def test_blob_head_and_upload(server, model_file):
    digest = "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert HTTP.head(server.url + f"/api/blobs/{digest}").status_code == 200
    missing = "sha256:" + "0" * 64
    assert HTTP.head(server.url + f"/api/blobs/{missing}").status_code == 404
    r = HTTP.post(server.url + f"/api/blobs/{missing}", content=b"not the right bytes")
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert HTTP.head(server.url + f"/api/blobs/{missing}").status_code == 404
    for bad in ("sha256:../../etc/passwd", "md5:abc", "sha256-" + "A" * 64):
        r = HTTP.post(server.url + f"/api/blobs/{bad}", content=b"x")
        assert r.status_code in (400, 404) and "Traceback" not in r.text
    data = b"hello blob"
    import hashlib
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    assert HTTP.post(server.url + f"/api/blobs/{d}", content=data).status_code == 201
    assert HTTP.head(server.url + f"/api/blobs/{d}").status_code == 200
