"""The local server's slot table (served name -> stored model) over real HTTP: the real app served by uvicorn in
a thread, with a fake engine that streams a piece naming the model it runs and can hold a generation open. Fast:
the stored models are tiny GGUFs (valid files no engine runs).

What must hold: a served name resolves through the table; switching it while a stream is in flight lets that
stream finish on the old model while the next request gets the new one (the atomic, gapless switch); the table
survives a restart; only the manage right changes it; /metrics counts latencies in the fleet's buckets and
failures per stored model."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from registry import tiny_gguf
from slot_server import FakeEngine, serving, stored
from slmops.engine.outputs import Output, Stats
from slmops.fleet import histogram
from slmops.fleet.agent import telemetry
from slmops.security.keys import KeyStore
from slmops.server.app import create_app
from slmops.server.runtime import ModelRuntime
from slmops.types.errors import ConfigError
from slmops.types.name import ModelName

A, B, BROKEN = "slot/smol-a:1", "slot/smol-b:2", "slot/smol-b:3"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> bytes:
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def generate(url: str, model: str, **headers: str) -> httpx.Response:
    return httpx.post(url + "/api/generate", json={"model": model, "prompt": "hi", "stream": False},
                      headers=headers, timeout=30)


def test_a_switch_lets_the_stream_in_flight_finish_on_the_old_model(tmp_path: Path, gguf: bytes) -> None:
    store, engine = stored(tmp_path, gguf, A, B), FakeEngine()
    with serving(store, engine) as url:
        assert httpx.put(url + "/api/slots/smol", json={"model": A, "release": "smol:1"}).status_code == 200
        assert generate(url, "smol").json()["response"] == f"[{A}] done"
        engine.hold[A] = threading.Event()
        with httpx.stream("POST", url + "/api/generate", json={"model": "smol", "prompt": "hi"}, timeout=30) as r:
            lines = r.iter_lines()
            first = json.loads(next(lines))
            assert first["response"] == f"[{A}]" and first["model"] == "smol" and not first["done"]
            switched = httpx.put(url + "/api/slots/smol:latest", json={"model": B, "release": "smol:2"})
            assert switched.json()["model"] == B and switched.json()["served"] == "smol:latest"
            answer = generate(url, "smol")  # the next request: the new model, while the old stream still runs
            assert answer.status_code == 200 and answer.json()["response"] == f"[{B}] done"
            engine.hold[A].set()
            rest = [json.loads(line) for line in lines]
        assert rest[-1]["done"] is True and "".join(p["response"] for p in [first, *rest]) == f"[{A}] done"
        shown = {m["name"] for m in httpx.get(url + "/api/ps").json()["models"]}
        assert shown == {"smol:latest", A}  # the served slot as clients ask for it, the old one by its store name
        assert {m["name"] for m in httpx.get(url + "/api/tags").json()["models"]} == {A, B}  # the store, as before
        assert generate(url, B).json()["response"] == f"[{B}] done"  # a slot's model by its own name too
        assert generate(url, "absent").status_code == 404

        # the model a served name resolves to cannot be removed (every request for the name would fail); the
        # old slot's model can
        served = httpx.request("DELETE", url + "/api/delete", json={"model": B})
        assert served.status_code == 409 and served.json()["error"].startswith(
            f'model "{B}" is what "smol:latest" serves now;')
        assert httpx.request("DELETE", url + "/api/delete", json={"model": A}).status_code == 200
        assert generate(url, "smol").json()["response"] == f"[{B}] done"


def test_slots_persist_and_only_stored_models_can_be_served(tmp_path: Path, gguf: bytes) -> None:
    store = stored(tmp_path, gguf, A)
    with serving(store, FakeEngine()) as url:
        missing = httpx.put(url + "/api/slots/smol", json={"model": "slot/smol-b:9"})
        assert missing.status_code == 404 and missing.json() == {
            "error": 'model "slot/smol-b:9" is not in the store; pull or stage it before serving it as "smol:latest"'}
        assert httpx.put(url + "/api/slots/smol", json={"model": A, "release": "smol:1"}).status_code == 200
        assert httpx.put(url + "/api/slots/smol", json={"model": A, "extra": 1}).status_code == 400
    saved = json.loads((tmp_path / "slots.json").read_text())
    assert [(s["served"], s["model"], s["release"]) for s in saved["slots"]] == [("smol:latest", A, "smol:1")]
    with serving(store, FakeEngine()) as url:  # a restarted server serves what it served
        slots = httpx.get(url + "/api/slots").json()["slots"]
        assert [(s["served"], s["model"], s["release"]) for s in slots] == [("smol:latest", A, "smol:1")]
        assert generate(url, "smol").json()["response"] == f"[{A}] done"
        store.remove(ModelName.parse(A))  # the slot's model went: a 404 that says what to do, not a crash
        gone = generate(url, "smol")
        assert gone.status_code == 404 and "DELETE /api/slots/smol:latest" in gone.json()["error"]
        assert httpx.delete(url + "/api/slots/smol").json()["model"] == A
        assert httpx.get(url + "/api/slots").json() == {"slots": []}
        assert httpx.delete(url + "/api/slots/smol").status_code == 404
    (tmp_path / "slots.json").write_text("{not json")
    with pytest.raises(ConfigError, match="slots.json is unreadable"):
        create_app(store, ModelRuntime(store, FakeEngine(), keep_alive=300))  # type: ignore[arg-type]


def test_only_the_manage_right_changes_slots(tmp_path: Path, gguf: bytes) -> None:
    store = stored(tmp_path, gguf, A)
    keys = KeyStore(tmp_path / "keys.json")
    user, operator = keys.create("reader", "user"), keys.create("agent", "operator")
    with serving(store, FakeEngine(), keys) as url:
        def as_(key: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}"}
        body = {"model": A, "release": "smol:1"}
        refused = httpx.put(url + "/api/slots/smol", json=body, headers=as_(user))
        assert refused.status_code == 403 and "PUT /api/slots" in refused.json()["error"]
        assert httpx.delete(url + "/api/slots/smol", headers=as_(user)).status_code == 403
        assert httpx.put(url + "/api/slots/smol", json=body).status_code == 401
        assert httpx.put(url + "/api/slots/smol", json=body, headers=as_(operator)).status_code == 200
        assert httpx.get(url + "/api/slots", headers=as_(user)).json()["slots"][0]["model"] == A
        assert generate(url, "smol", **as_(user)).json()["response"] == f"[{A}] done"


class WholeAnswers(FakeEngine):
    """Answers a request that is not streamed as the engine does: the whole text with the final record, after
    0.3 s of decoding that began with its first token."""

    def start(self, spec, req, emit):  # type: ignore[no-untyped-def]
        self.load(spec)
        assert req.stream is False

        def produce() -> None:
            time.sleep(0.3)
            emit(Output(text=f"[{spec.name}] done", done=True, done_reason="stop",
                        stats=Stats(1, 1_000_000, 2, 300_000_000, 0, 310_000_000)))
        threading.Thread(target=produce, daemon=True).start()
        return lambda: None


def test_time_to_first_token_of_an_answer_not_streamed_is_when_its_first_token_came(tmp_path: Path,
                                                                                      gguf: bytes) -> None:
    with serving(stored(tmp_path, gguf, A), WholeAnswers()) as url:
        httpx.put(url + "/api/slots/smol", json={"model": A})
        assert generate(url, "smol").json()["response"] == f"[{A}] done"
        text = httpx.get(url + "/metrics").text
    [ttft] = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("slmops_time_to_first_token_seconds_sum") and f'model="{A}"' in line]
    assert 0 <= ttft < 0.2  # the answer came whole after 0.3 s of decoding, which followed its first token


def test_metrics_count_in_fleet_buckets_and_failures_per_stored_model(tmp_path: Path, gguf: bytes) -> None:
    store, engine = stored(tmp_path, gguf, A, BROKEN), FakeEngine()
    engine.broken.add(BROKEN)
    with serving(store, engine) as url:
        httpx.put(url + "/api/slots/smol", json={"model": A})
        for _ in range(3):
            assert generate(url, "smol").status_code == 200
        httpx.put(url + "/api/slots/smol", json={"model": BROKEN})
        assert generate(url, "smol").status_code == 500
        text = httpx.get(url + "/metrics").text
    bounds = {float(line.split('le="')[1].split('"')[0]) for line in text.splitlines()
              if line.startswith("slmops_time_to_first_token_seconds_bucket") and f'model="{A}"' in line}
    assert bounds == {*histogram.BOUNDS_S, float("inf")}
    counts = telemetry.parse(text)
    assert counts[A].finished == 3 and sum(counts[A].itl) == 3 and counts[A].failures == {}
    assert counts[A].itl[histogram.bucket(15.0)] == 3  # 30 ms over 2 tokens: one value per generation
    assert counts[BROKEN].failures == {"load": 1} and counts[BROKEN].finished == 0
