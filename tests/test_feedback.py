"""Rated feedback on a device: ``POST /api/feedback`` on the real app (no model needed: the route never reaches the
engine), the opt-in from the device's setting or the fleet's privacy file (an opt-out holds from the next request),
the log on disk (whole lines only, bounded, per release), the export's JSONL shape, and the CLI against a real
``slmops serve`` started with ``privacy: {feedback: true}`` in its deployment config."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, run_cli

from slmops.api.feedback import FeedbackMessage, FeedbackRecord
from slmops.engine.client import EngineConfig
from slmops.engine.process import ProcessEngine
from slmops.fleet import privacy
from slmops.security.keys import KeyStore
from slmops.server.access import AccessPolicy
from slmops.server.app import ServerConfig, create_app
from slmops.server.runtime import ModelRuntime
from slmops.store.feedback import FeedbackLog, file_stem
from slmops.store.store import Store

M = "smollm2:135m"
RATED = {"model": M, "prompt": "What is 2+2?", "response": "5", "rating": -1, "comment": "wrong sum",
         "tags": ["wrong-fact"]}
OPT_IN = {"privacy": {"feedback": True}}


def app_for(home: Path, local: bool = False, keys: KeyStore | None = None) -> Any:
    store = Store(home / "models")
    runtime = ModelRuntime(store, ProcessEngine(EngineConfig()), keep_alive=300)
    access = AccessPolicy(keys) if keys is not None else None
    return create_app(store, runtime, ServerConfig(home=home, feedback=local), access=access)


def post(app: Any, *bodies: dict[str, Any], key: str | None = None) -> list[httpx.Response]:
    """Each body POSTed to /api/feedback in turn, through the app's whole middleware stack."""
    async def go() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
                                     headers=headers) as c:
            return [await c.post("/api/feedback", json=body) for body in bodies]
    return asyncio.run(go())


def lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


# -- opting in and out -----------------------------------------------------------------------------------------------
def test_without_an_opt_in_nothing_is_kept(tmp_path: Path) -> None:
    (r,) = post(app_for(tmp_path), RATED)
    assert r.status_code == 403
    assert r.json() == {"error": privacy.REFUSED} and "privacy: {feedback: true}" in privacy.REFUSED
    assert not (tmp_path / "feedback").exists() or not list((tmp_path / "feedback").glob("*.jsonl"))


def test_with_the_device_setting_a_rating_is_kept_on_disk_before_202(tmp_path: Path) -> None:
    (r,) = post(app_for(tmp_path, local=True), RATED)
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["release"] == M and answer["id"].startswith("fb_")
    (record,) = lines(tmp_path / "feedback" / f"{file_stem(M)}.jsonl")
    assert record["id"] == answer["id"] and record["release"] == M and record["model"] == M
    assert record["messages"] == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}]
    assert (record["rating"], record["comment"], record["tags"]) == (-1, "wrong sum", ["wrong-fact"])
    assert abs(record["at"] - time.time()) < 600
    assert oct(os.stat(tmp_path / "feedback" / f"{file_stem(M)}.jsonl").st_mode & 0o777) == "0o600"


def test_the_fleet_decides_and_an_opt_out_holds_from_the_next_request(tmp_path: Path) -> None:
    app = app_for(tmp_path, local=True)  # the device's own setting says yes ...
    privacy.apply(tmp_path, {"channel": "stable", **OPT_IN})
    assert [r.status_code for r in post(app, RATED, RATED)] == [202, 202]
    privacy.apply(tmp_path, {"channel": "stable"})  # ... but a blueprint without the opt-in wins, at once
    assert [r.status_code for r in post(app, RATED)] == [403]
    privacy.apply(tmp_path, {"privacy": {"feedback": False}})
    privacy.apply(tmp_path, OPT_IN)  # back and forth within one clock tick: a new file (inode) each time
    assert [r.status_code for r in post(app, RATED)] == [202]
    assert len(lines(tmp_path / "feedback" / f"{file_stem(M)}.jsonl")) == 3


def test_privacy_file_is_written_only_when_the_answer_changes_and_fails_closed(tmp_path: Path) -> None:
    assert privacy.read(tmp_path) is None and privacy.allowed(tmp_path, local=True)
    privacy.apply(tmp_path, OPT_IN)
    first = os.stat(privacy.path(tmp_path))
    privacy.apply(tmp_path, {**OPT_IN, "model": "other:1"})
    assert os.stat(privacy.path(tmp_path)).st_ino == first.st_ino  # the same answer: not rewritten
    assert privacy.from_config({"privacy": {"feedback": "true"}}) == privacy.Privacy(False)  # only a real true
    privacy.path(tmp_path).write_text("{not json")
    assert privacy.allowed(tmp_path, local=True) is False
    assert privacy.OptIn(tmp_path, local=True)() is False


def test_the_route_needs_the_inference_right(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.json")
    user, metrics = keys.create("alice", "user"), keys.create("prom", "metrics")
    app = app_for(tmp_path, local=True, keys=keys)
    assert post(app, RATED)[0].status_code == 401
    refused = post(app, RATED, key=metrics)[0]
    assert refused.status_code == 403 and "POST /api/feedback" in refused.json()["error"]
    assert post(app, RATED, key=user)[0].status_code == 202


@pytest.mark.parametrize("change, field", [
    ({"rating": True}, "rating"), ({"rating": 5}, "rating"), ({"rating": "1"}, "rating"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "assistant"),
    ({"tags": ["Not A Tag"]}, "tags"), ({"ratng": 1}, "ratng"), ({"response": None}, "prompt and response"),
])
def test_bad_ratings_are_400_naming_the_problem(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    body = {**RATED, **change}
    if "messages" in change:
        del body["prompt"], body["response"]
    (r,) = post(app_for(tmp_path, local=True), {k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400 and field in r.json()["error"], r.text


def test_a_conversation_is_filed_under_the_release_its_served_name_runs(tmp_path: Path) -> None:
    from slmops.types.name import ModelName

    app = app_for(tmp_path, local=True)
    app.state.slots.put(ModelName.parse("smol"), ModelName.parse("slot/smol-a:1"), "smol:1.2.0")
    chat = {"model": "smol", "rating": 1, "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Capital of France?"},
                                                       {"role": "assistant", "content": "Paris."}]}
    unslotted = {**RATED, "model": "smollm2"}
    assert [r.json()["release"] for r in post(app, chat, unslotted)] == ["smol:1.2.0", "smollm2:latest"]
    (record,) = lines(tmp_path / "feedback" / f"{file_stem('smol:1.2.0')}.jsonl")
    assert record["model"] == "smol" and record["messages"] == chat["messages"]


# -- the log on disk -------------------------------------------------------------------------------------------------
def record(log: FeedbackLog, release: str = "smol:1.2.0", text: str = "Paris.", rating: int = 1) -> FeedbackRecord:
    return log.new_record(release, "smol", [FeedbackMessage(role="user", content="Capital of France?"),
                                           FeedbackMessage(role="assistant", content=text)], rating)


def test_a_torn_last_line_is_never_read_and_the_next_append_cuts_it(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path / "feedback")
    log.append(record(log))
    path = log.path("smol:1.2.0")
    whole = path.read_bytes()
    with open(path, "ab") as f:  # what a crash in the middle of an append leaves
        f.write(record(log, text="cut short").model_dump_json().encode()[:50])
    assert [r.messages[-1].content for r in log.records()] == ["Paris."]
    records, cursor = log.pending(path, 100, 1 << 20)
    assert len(records) == 1 and cursor is not None and cursor.offset == len(whole)
    log.append(record(log, text="Lyon?", rating=-1))
    assert [x["messages"][-1]["content"] for x in lines(path)] == ["Paris.", "Lyon?"]


def test_a_full_log_refuses_with_what_to_do_and_clear_empties_it(tmp_path: Path) -> None:
    app = app_for(tmp_path, local=True)
    app.state.feedback.log.max_bytes = 1500
    statuses = [r.status_code for r in post(app, *[RATED] * 6)]
    assert statuses[0] == 202 and statuses[-1] == 409
    full = post(app, RATED)[0].json()["error"]
    assert f"the feedback log of {M} is full" in full and f"slmops feedback clear --release {M}" in full
    size = os.stat(tmp_path / "feedback" / f"{file_stem(M)}.jsonl").st_size
    assert size <= 1500 and len(lines(tmp_path / "feedback" / f"{file_stem(M)}.jsonl")) == statuses.count(202)
    p = run_cli("feedback", "clear", "--release", M, "--yes", home=tmp_path)
    assert p.returncode == 0 and f"deleted {statuses.count(202)} rating(s)" in p.stdout, p.stderr
    assert post(app, RATED)[0].status_code == 202


def test_a_record_too_large_is_413(tmp_path: Path) -> None:
    long = [{"role": "user", "content": "x" * 60_000}, {"role": "assistant", "content": "y" * 60_000}] * 3
    (r,) = post(app_for(tmp_path, local=True), {"model": M, "rating": 1, "messages": long})
    assert r.status_code == 413 and "KiB" in r.json()["error"]


# -- export ----------------------------------------------------------------------------------------------------------
def test_export_writes_chat_fine_tuning_lines_per_release_and_since(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    log = FeedbackLog(tmp_path / "feedback", clock=lambda: now[0])
    log.append(record(log, "smol:1.2.0", "Paris."))
    now[0] += 86400 * 10
    log.append(record(log, "smol:1.3.0", "Lyon?", -1))
    (tmp_path / "feedback" / "junk.jsonl").write_text('{"not": "a record"}\n')  # skipped, not fatal
    p = run_cli("feedback", "export", home=tmp_path)
    assert p.returncode == 0, p.stderr
    out = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(x["release"], x["rating"]) for x in out] == [("smol:1.2.0", 1), ("smol:1.3.0", -1)]
    for x in out:
        assert set(x) == {"messages", "rating", "release", "at", "id", "model"}
        assert x["messages"][-1]["role"] == "assistant" and isinstance(x["at"], float)
    one = run_cli("feedback", "export", "--release", "smol:1.3.0", home=tmp_path).stdout.splitlines()
    assert [json.loads(line)["release"] for line in one] == ["smol:1.3.0"]
    since = run_cli("feedback", "export", "--since", "2023-11-20", home=tmp_path).stdout.splitlines()
    assert [json.loads(line)["release"] for line in since] == ["smol:1.3.0"]
    bad = run_cli("feedback", "export", "--since", "soon", home=tmp_path)
    assert bad.returncode == 1 and "--since 'soon'" in bad.stderr


def test_cli_rates_through_a_real_server_opted_in_by_its_deployment_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "deploy.yaml"
    config.write_text("privacy:\n  feedback: true\n")
    server = Server(home, args=("--config", str(config)))
    try:
        env = {"SLMOPS_HOST": server.url.removeprefix("http://")}
        p = run_cli("feedback", "add", M, "--rating", "bad", "--prompt", "2+2?", "--response", "5", "--tag",
                    "math", home=home, **env)
        assert p.returncode == 0 and f"under {M}" in p.stdout, p.stderr
        bad = run_cli("feedback", "add", M, "--rating", "meh", "--prompt", "a", "--response", "b", home=home, **env)
        assert bad.returncode == 1 and "--rating 'meh'" in bad.stderr
        privacy.apply(home, {})  # the device joins a fleet whose blueprint does not opt in
        refused = run_cli("feedback", "add", M, "--rating", "1", "--prompt", "a", "--response", "b", home=home,
                          **env)
        assert refused.returncode == 1 and refused.stderr.strip() == f"Error: {privacy.REFUSED}"
    finally:
        server.stop()
    out = run_cli("feedback", "export", home=home).stdout.splitlines()
    assert [(x["rating"], x["tags"], x["messages"][-1]["content"]) for x in map(json.loads, out)] == \
        [(-1, ["math"], "5")]
