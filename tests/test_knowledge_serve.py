"""Knowledge files end to end: built by the real ``slmops create`` with the real embedding model
(all-minilm:l6-v2), listed by ``show --files``, retrieved by a real server for the official clients, measured
for recall on the shipped question set, and carried through a registry with their signature."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from conftest import HTTP, Server, cached_home, link_home, run_cli
from registry import empty_registry  # noqa: F401 - the fixture
from slmops.store import knowledge as ks
from slmops.store.store import Store
from slmops.types.name import ModelName
from test_knowledge import HANDBOOK, pdf

pytestmark = pytest.mark.slow
MINILM = ModelName.parse("all-minilm:l6-v2")
QUESTIONS = json.loads((HANDBOOK.parent / "questions.json").read_text())["questions"]
RECALL_AT_3 = 0.9  # measured 1.0 (21/21) with all-minilm:l6-v2; smollm2:135m's own embeddings reach 0.57


def add_models(src_home: Path, dst_home: Path) -> None:
    src, dst = src_home / "models", dst_home / "models"
    for p in (src / "manifests").rglob("*"):
        if p.is_file():
            target = dst / "manifests" / p.relative_to(src / "manifests")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    for blob in (src / "blobs").iterdir():
        if blob.name.startswith("sha256-") and not (dst / "blobs" / blob.name).exists():
            os.link(blob, dst / "blobs" / blob.name)


def ok(r) -> None:
    assert r.returncode == 0, (r.stdout, r.stderr)


@pytest.fixture(scope="module")
def minilm_cache() -> Path:
    return cached_home("minilm-home", MINILM)


@pytest.fixture(scope="module")
def kb_home(tmp_path_factory, shared_home, minilm_cache) -> Path:
    """A home with smollm2, all-minilm and ``k7``: the handbook and a two-page PDF, built by the CLI."""
    home = link_home(shared_home, tmp_path_factory.mktemp("kb") / "home")
    add_models(minilm_cache, home)
    docs = home.parent / "docs"
    docs.mkdir()
    (docs / "leaflet.pdf").write_bytes(pdf(["Quarnel lamps glow teal.", "A Quarnel lamp costs 17 florins."]))
    (docs / "Modelfile").write_text(f"FROM smollm2:135m\nSYSTEM You answer about the Vantor K7.\n"
                                    f"FILE {HANDBOOK}\nFILE leaflet.pdf\n")
    ok(run_cli("create", "k7", "-f", str(docs / "Modelfile"), home=home))
    return home


@pytest.fixture(scope="module")
def kb_server(kb_home):
    s = Server(kb_home)
    yield s
    s.stop()


def test_show_files_lists_each_file_with_size_and_chunks(kb_home):
    r = run_cli("show", "k7", "--files", home=kb_home)
    ok(r)
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0] == ["NAME", "SIZE", "CHUNKS", "DIGEST"]
    store = Store(kb_home / "models")
    index = ks.read_index(store, store.manifest(ModelName.parse("k7")), "k7")
    counts = index.counts()
    assert rows[1][0] == HANDBOOK.name and rows[1][-2] == str(counts[HANDBOOK.name]) and counts[HANDBOOK.name] > 10
    assert rows[2][0] == "leaflet.pdf" and rows[2][-2] == "2"
    assert "embedded with all-minilm:l6-v2 (384 dimensions" in r.stdout
    plain = run_cli("show", "smollm2:135m", "--files", home=kb_home)
    assert plain.returncode == 0 and "has no knowledge files" in plain.stderr


def test_recall_at_3_on_the_shipped_questions(kb_home):
    """The server's own search over the stored index, questions embedded by the engine as the server embeds."""
    from slmops.engine.client import spec_from_store
    from slmops.engine.engine import Engine
    store = Store(kb_home / "models")
    index = ks.read_index(store, store.manifest(ModelName.parse("k7")), "k7")
    engine = Engine()
    try:
        vectors, _, _ = engine.embed(spec_from_store(store, MINILM), [q["question"] for q in QUESTIONS])
    finally:
        engine.close()
    hits = [any(q["answer"] in index.chunks[i].text for i, _ in index.search(v, 3)) for q, v in zip(QUESTIONS, vectors)]
    missed = [q["question"] for q, hit in zip(QUESTIONS, hits) if not hit]
    assert sum(hits) / len(hits) >= RECALL_AT_3, missed


def test_chat_answers_name_the_chunks_used_for_both_apis(kb_server):
    question = "What is the part number of the replacement backup cell?"
    body = {"model": "k7", "stream": False, "messages": [{"role": "user", "content": question}],
            "options": {"temperature": 0, "num_predict": 1}}
    r = HTTP.post(kb_server.url + "/api/chat", json=body)
    assert r.status_code == 200, r.text
    used = r.json()["knowledge"]
    assert len(used) == 3 and used[0]["source"] == HANDBOOK.name
    assert used[0]["section"] == "Power and the backup battery" and used[0]["score"] > used[1]["score"]
    assert r.headers["x-slmops-knowledge"].startswith(f"{HANDBOOK.name}#{used[0]['chunk']}, ")
    plain = HTTP.post(kb_server.url + "/api/chat", json={**body, "model": "smollm2:135m"})
    assert "knowledge" not in plain.json() and "x-slmops-knowledge" not in plain.headers
    assert r.json()["prompt_eval_count"] > plain.json()["prompt_eval_count"] + 100  # the chunks were in the prompt

    streamed = [json.loads(line) for line in HTTP.post(kb_server.url + "/api/chat", json={**body, "stream": True})
                .text.splitlines()]
    assert streamed[-1]["done"] and streamed[-1]["knowledge"] == used
    assert all("knowledge" not in line for line in streamed[:-1])

    client = ollama.Client(host=kb_server.url)  # the field is extra to Ollama's shape: the client takes the answer
    answer = client.chat(model="k7", messages=[{"role": "user", "content": question}],
                         options={"temperature": 0, "num_predict": 4})
    assert answer.done and answer.message.role == "assistant"
    assert "knowledge" not in answer.model_dump()  # it drops fields it does not know: hence the header too
    pdf_hit = HTTP.post(kb_server.url + "/api/generate", json={"model": "k7", "stream": False,
                                                                "prompt": "How much is a Quarnel lamp?",
                                                                "options": {"num_predict": 1}}).json()
    assert pdf_hit["knowledge"][0] == {"source": "leaflet.pdf", "chunk": 1, "page": 2,
                                       "score": pdf_hit["knowledge"][0]["score"]}

    oai = openai.OpenAI(base_url=kb_server.url + "/v1", api_key="unused")
    raw = oai.chat.completions.with_raw_response.create(
        model="k7", messages=[{"role": "user", "content": "How much does the unit weigh?"}], max_tokens=2)
    assert raw.parse().choices[0].message.role == "assistant"
    first = raw.headers["x-slmops-knowledge"].split(", ")[0]
    store = Store(kb_server.home / "models")
    index = ks.read_index(store, store.manifest(ModelName.parse("k7")), "k7")
    name, number = first.rsplit("#", 1)
    chunk = [c for c in index.chunks if c.source == name][int(number)]
    assert "1.4 kilograms" in chunk.text
    with httpx.stream("POST", kb_server.url + "/v1/chat/completions", timeout=120, json={
            "model": "k7", "stream": True, "max_tokens": 2,
            "messages": [{"role": "user", "content": "How much does the unit weigh?"}]}) as s:
        assert s.headers["x-slmops-knowledge"] == raw.headers["x-slmops-knowledge"]
    # the Responses API retrieves as chat does: the same question finds the same chunks
    answered = oai.responses.with_raw_response.create(model="k7", input="How much does the unit weigh?",
                                                      max_output_tokens=2)
    assert answered.parse().status in ("completed", "incomplete")
    assert answered.headers["x-slmops-knowledge"] == raw.headers["x-slmops-knowledge"]
    with httpx.stream("POST", kb_server.url + "/v1/responses", timeout=120, json={
            "model": "k7", "stream": True, "max_output_tokens": 2, "input": "How much does the unit weigh?"}) as s:
        assert s.headers["x-slmops-knowledge"] == raw.headers["x-slmops-knowledge"]
    plain = oai.responses.with_raw_response.create(model="smollm2:135m", input="How much does the unit weigh?",
                                                   max_output_tokens=2)
    assert "x-slmops-knowledge" not in plain.headers

    shown = client.show("k7")  # /api/show keeps Ollama's shape for the client, and lists the files besides
    assert shown.modelfile
    files = HTTP.post(kb_server.url + "/api/show", json={"model": "k7"}).json()["knowledge"]
    assert [(f["name"], f["chunks"]) for f in files][1] == ("leaflet.pdf", 2)


def test_knowledge_travels_through_a_registry_signed(kb_home, empty_registry, tmp_path, shared_home,  # noqa: F811
                                                      minilm_cache):
    from test_signing import keypair
    priv, pub = keypair(tmp_path, "release")
    allow = {"SLMOPS_ALLOW_PRIVATE_REGISTRIES": "true"}
    name = f"{empty_registry.host}/library/k7:1"
    ok(run_cli("cp", "k7", name, home=kb_home))
    ok(run_cli("sign", name, "--key", str(priv), home=kb_home))
    ok(run_cli("push", "--insecure", name, home=kb_home, **allow))
    device = link_home(shared_home, tmp_path / "device")
    add_models(minilm_cache, device)
    ok(run_cli("sign", "all-minilm:l6-v2", "--key", str(priv), home=device))  # under the policy it loads too
    ok(run_cli("pull", "--insecure", name, home=device, **allow, SLMOPS_TRUSTED_KEYS=str(pub)))
    src, dst = Store(kb_home / "models"), Store(device / "models")
    assert dst.manifest_bytes(ModelName.parse(name)) == src.manifest_bytes(ModelName.parse(name))
    r = run_cli("show", name, "--files", home=device)
    ok(r)
    assert HANDBOOK.name in r.stdout and "leaflet.pdf" in r.stdout
    s = Server(device, SLMOPS_TRUSTED_KEYS=str(pub))
    try:
        got = HTTP.post(s.url + "/api/chat", json={"model": name, "stream": False, "options": {"num_predict": 1},
                                                   "messages": [{"role": "user", "content": "What does E34 mean?"}]})
        assert got.status_code == 200, got.text
        assert got.json()["knowledge"][0]["section"] == "Alarms and error codes"
    finally:
        s.stop()
