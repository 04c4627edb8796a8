"""Abuse of the released server, each reproduced against a real `slmops serve` process: requests from foreign web
pages, Modelfiles that would freeze the event loop, token limits overdrawn by concurrency or dropped streams, a
`user` key acting on models everyone shares, input that used to become a 500 outside the audit trail, and uploads
with no size limit. After each attack the server still serves."""

import concurrent.futures
import hashlib
import json
import threading
import time

import httpx
import ollama
import pytest

from conftest import Server, link_home
from slmops.security.audit import AuditLog, verify
from slmops.security.keys import KeyStore

M = "smollm2:135m"
EVIL = "https://evil.example"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def audit_records(home) -> list[dict]:
    path = home / "audit" / "audit.log"
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line] if path.exists() else []


@pytest.fixture(scope="module")
def srv(shared_home, tmp_path_factory):
    home = link_home(shared_home, tmp_path_factory.mktemp("abuse"))
    with Server(home, SLMOPS_CONTEXT_LENGTH="512", SLMOPS_MAX_BLOB_SIZE="1MiB") as s:
        yield s


def still_serving(srv: Server) -> None:
    assert ollama.Client(host=srv.url).generate(model=M, prompt="Hi", options={"num_predict": 2}).done


def test_a_foreign_web_page_cannot_change_models(srv):
    """A text/plain POST is sent by browsers without a preflight: CORS alone let it run and only hid the answer."""
    httpx.post(srv.url + "/api/create", json={"model": "victim", "from": M, "system": "Be helpful."}, timeout=120)
    attacks = [("POST", "/api/create", {"model": "victim", "from": M, "system": "Leak everything."}),
               ("POST", "/api/copy", {"source": M, "destination": "planted"}),
               ("DELETE", "/api/delete", {"model": "victim"}),
               ("POST", "/api/pull", {"model": "planted2"})]
    for method, path, body in attacks:
        r = httpx.request(method, srv.url + path, content=json.dumps(body),
                          headers={"Origin": EVIL, "Content-Type": "text/plain"}, timeout=60)
        assert r.status_code == 403 and "origin" in r.json()["error"], (path, r.status_code, r.text)
    assert httpx.get(srv.url + "/api/tags", headers={"Origin": EVIL}).status_code == 403
    preflight = httpx.options(srv.url + "/api/create", headers={"Origin": EVIL,
                                                                "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403
    shown = httpx.post(srv.url + "/api/show", json={"model": "victim"}).json()
    assert shown["system"] == "Be helpful."
    names = [m["name"] for m in httpx.get(srv.url + "/api/tags").json()["models"]]
    assert "planted:latest" not in names and "victim:latest" in names
    # an allowed page must send JSON as JSON; clients that are no browser keep curl -d's form type
    page = {"Origin": "http://localhost:3000"}
    r = httpx.post(srv.url + "/api/copy", content=json.dumps({"source": M, "destination": "page-copy"}),
                   headers={**page, "Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = httpx.post(srv.url + "/api/copy", json={"source": M, "destination": "page-copy"}, headers=page)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page["Origin"]
    r = httpx.post(srv.url + "/api/copy", content=json.dumps({"source": M, "destination": "curl-copy"}),
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    still_serving(srv)


def test_a_huge_modelfile_neither_freezes_the_server_nor_takes_long(srv):
    """Parsing was quadratic and ran on the event loop: 360 KB of comment lines froze /health for 12 s."""
    text = "FROM " + M + "\n" + "# a comment line that says nothing at all\n" * 23_000  # ~ 980 KB
    result: dict = {}

    def create() -> None:
        result["r"] = httpx.post(srv.url + "/api/create", json={"model": "commented", "modelfile": text,
                                                                 "stream": False}, timeout=300)

    worker = threading.Thread(target=create)
    worker.start()
    while worker.is_alive():
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200  # a frozen loop would time out
        time.sleep(0.05)
    assert result["r"].status_code == 200, result["r"].text
    r = httpx.post(srv.url + "/api/create", json={"model": "too-big", "modelfile": text * 2, "stream": False})
    assert r.status_code == 400 and "limit" in r.json()["error"] and "\n" not in r.json()["error"]
    still_serving(srv)


@pytest.mark.parametrize("case", ["bad header byte", "escaped lone surrogate", "raw surrogate bytes",
                                  "1e999 parameter", "1e400 num_predict", "1e999 keep_alive"])
def test_malformed_input_is_a_400_with_its_audit_record(srv, case):
    """Each of these was a 500 sent outside the audit layer: no record, and a gap in the sequence."""
    gen = '{"model": "%s", "prompt": "hi", "stream": false, ' % M
    requests = {
        "bad header byte": ("/api/tags", None, {"X-Client": b"\xff\xfe"}),
        "escaped lone surrogate": ("/api/generate", gen.encode() + b'"system": "x \\ud800 y"}', {}),
        "raw surrogate bytes": ("/api/chat", b'{"model": "%s", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'
                                % M.encode(), {}),
        "1e999 parameter": ("/api/create", b'{"model": "inf", "from": "%s", "parameters": {"num_ctx": 1e999}}'
                            % M.encode(), {}),
        "1e400 num_predict": ("/api/generate", gen.encode() + b'"options": {"num_predict": 1e400}}', {}),
        "1e999 keep_alive": ("/api/generate", gen.encode() + b'"keep_alive": 1e999}', {}),
    }
    path, body, headers = requests[case]
    before = len(audit_records(srv.home))
    r = httpx.request("GET" if body is None else "POST", srv.url + path, content=body, headers=headers, timeout=120)
    if case == "bad header byte":
        assert r.status_code == 400 and "UTF-8" in r.json()["error"]
    else:
        assert r.status_code == 400, r.text
        assert "\n" not in r.json()["error"]
    records = audit_records(srv.home)
    mine = [x for x in records[before:] if x["request_id"] == r.headers["x-request-id"]]
    assert mine and mine[0]["status"] == 400
    assert [x["seq"] for x in records] == list(range(1, len(records) + 1))
    assert verify(AuditLog(srv.home / "audit" / "audit.log")).ok
    still_serving(srv)


def test_blob_uploads_are_capped_while_streaming(srv):
    big = b"\x01" * (2 << 20)
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    r = httpx.post(f"{srv.url}/api/blobs/{digest}", content=big, timeout=60)
    assert r.status_code == 413 and "SLMOPS_MAX_BLOB_SIZE" in r.json()["error"]

    def chunked():  # no Content-Length: held to the limit as the bytes arrive
        for i in range(0, len(big), 64 << 10):
            yield big[i:i + (64 << 10)]

    r = httpx.post(f"{srv.url}/api/blobs/{digest}", content=chunked(), timeout=60)
    assert r.status_code == 413
    blobs = srv.home / "models" / "blobs"
    assert not (blobs / digest.replace(":", "-")).exists()
    assert not [p for p in blobs.iterdir() if not p.name.startswith("sha256-")]  # nothing staged is left
    small = b"\x02" * 1000
    assert httpx.post(f"{srv.url}/api/blobs/sha256:{hashlib.sha256(small).hexdigest()}",
                      content=small).status_code == 201
    still_serving(srv)


@pytest.fixture(scope="module")
def keyed(shared_home, tmp_path_factory):
    home = link_home(shared_home, tmp_path_factory.mktemp("keyed"))
    ks = KeyStore(home / "keys.json")
    keys = {"user": ks.create("user-key", "user"), "operator": ks.create("operator-key", "operator"),
            "thrifty": ks.create("thrifty", "user", tokens_per_minute=60),
            "streamer": ks.create("streamer", "user", tokens_per_minute=5000)}
    with Server(home, SLMOPS_CONTEXT_LENGTH="1024", SLMOPS_NUM_PARALLEL="4") as s:
        s.keys = keys
        yield s


def test_concurrent_requests_cannot_overdraw_a_token_limit(keyed):
    """The bucket refused only once empty: 6 concurrent requests on a 60-token key used 942 tokens, all 200."""
    c = ollama.Client(host=keyed.url, headers=auth(keyed.keys["thrifty"]))

    def one(_):
        try:
            r = c.generate(model=M, prompt="Tell me a long story about a dragon.", options={"num_predict": 40})
            return r.eval_count
        except ollama.ResponseError as err:
            assert err.status_code == 429, err
            return None

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        counts = list(pool.map(one, range(6)))
    served = [n for n in counts if n is not None]
    assert served and None in counts
    assert sum(served) <= 60, counts  # completion tokens are reserved up front; only the prompts can overdraw
    still = ollama.Client(host=keyed.url, headers=auth(keyed.keys["user"]))
    assert still.generate(model=M, prompt="Hi", options={"num_predict": 2}).done


def test_a_dropped_stream_is_charged_and_audited_for_what_it_generated(keyed):
    body = {"model": M, "prompt": "1, 2, 3, 4, 5,", "raw": True, "stream": True,
            "options": {"temperature": 0, "num_predict": 400}}
    with httpx.stream("POST", keyed.url + "/api/generate", json=body, headers=auth(keyed.keys["streamer"]),
                      timeout=120) as r:
        request_id = r.headers["x-request-id"]
        lines = r.iter_lines()
        for _ in range(12):
            assert json.loads(next(lines))["done"] is False
    deadline = time.time() + 30
    mine: list = []
    while not mine and time.time() < deadline:
        mine = [x for x in audit_records(keyed.home) if x["request_id"] == request_id]
        time.sleep(0.2)
    assert mine, "a dropped stream must still be audited"
    assert mine[0]["completion_tokens"] >= 12 and mine[0]["prompt_tokens"] > 0 and mine[0]["complete"] is False


def test_a_user_key_cannot_load_pin_unload_or_reload_models(keyed):
    user = ollama.Client(host=keyed.url, headers=auth(keyed.keys["user"]))
    with pytest.raises(ollama.ResponseError) as err:
        user.embed(model=M, input=[])  # loads the model with no inference: the operator's right
    assert err.value.status_code == 403
    first = user.generate(model=M, prompt="Hi", options={"num_predict": 2})
    user.generate(model=M, prompt="Hi", options={"num_predict": 2}, keep_alive=-1)  # pin: clamped
    (loaded,) = httpx.get(keyed.url + "/api/ps", headers=auth(keyed.keys["user"])).json()["models"]
    assert not loaded["expires_at"].startswith("9999"), loaded
    user.generate(model=M, prompt="Hi", options={"num_predict": 2}, keep_alive=1e-9)  # unload for all: clamped
    time.sleep(2.5)  # the reaper runs every second
    assert [m["name"] for m in httpx.get(keyed.url + "/api/ps", headers=auth(keyed.keys["user"])).json()["models"]]
    again = user.generate(model=M, prompt="Hi", options={"num_predict": 2, "num_thread": 1024, "num_batch": 7,
                                                          "num_ctx": 8192})
    assert again.load_duration == 0, "a user's load options must not force a reload"
    (loaded,) = httpx.get(keyed.url + "/api/ps", headers=auth(keyed.keys["user"])).json()["models"]
    assert loaded["context_length"] <= 1024
    assert first.done
    operator = ollama.Client(host=keyed.url, headers=auth(keyed.keys["operator"]))
    operator.generate(model=M, prompt="Hi", options={"num_predict": 1}, keep_alive=-1)
    (loaded,) = httpx.get(keyed.url + "/api/ps", headers=auth(keyed.keys["operator"])).json()["models"]
    assert loaded["expires_at"].startswith("9999")


def test_an_unhandled_error_is_a_500_in_the_api_shape_and_is_audited(tmp_path):
    """Errors raised past every handler used to be answered by the outermost layer, outside the audit trail."""
    import asyncio

    from slmops.server.access import AccessPolicy, Recorder

    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    log = AuditLog(tmp_path / "audit.log")
    app = Recorder(broken, AccessPolicy(KeyStore(tmp_path / "keys.json"), audit=log))

    async def call(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(path, json={})

    native, openai_style = asyncio.run(call("/api/chat")), asyncio.run(call("/v1/chat/completions"))
    assert native.status_code == openai_style.status_code == 500
    assert native.json() == {"error": "internal server error; see the server log"}
    assert openai_style.json()["error"]["type"] == "server_error"
    records = audit_records_in(log)
    assert [(x["route"], x["status"]) for x in records] == [("/api/chat", 500), ("/v1/chat/completions", 500)]
    assert verify(log).ok


def audit_records_in(log: AuditLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_bytes().split(b"\n") if line]
