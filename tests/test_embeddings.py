"""The real sentence-embedding model: all-MiniLM-L6-v2 converted to GGUF at pull time with llama.cpp's converter,
checked against its pinned digest, served by a real server."""

import numpy as np
import ollama
import openai
import pytest

from conftest import HTTP, Server, cached_home, link_home
from slmops.store.store import Store
from slmops.types.name import ModelName

MINILM = ModelName.parse("all-minilm:l6-v2")
PARAPHRASES = ["A man is playing a guitar.", "Someone plays an acoustic guitar."]
UNRELATED = "The stock market fell sharply on Tuesday."


@pytest.fixture(scope="module")
def minilm_home(tmp_path_factory):
    """A home with all-minilm only, pulled (downloaded and converted) once per machine into its own cache."""
    return link_home(cached_home("minilm-home", MINILM), tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="module")
def minilm_server(minilm_home):
    s = Server(minilm_home)
    yield s
    s.stop()


def test_pulled_conversion_matches_pinned_digest(minilm_home):
    store = Store(minilm_home / "models")
    layer = store.manifest(MINILM).layers[0]
    assert layer.digest == "sha256:be5ea7c0ae9b264417f91fa5c71210c93ed5abcf6d5904fd03e42c4f44b7df3e"
    info = store.inspect(MINILM)
    assert info.architecture == "bert" and info.embedding_only and info.file_type == "F16"


def test_paraphrases_score_higher_than_unrelated(minilm_server):
    client = ollama.Client(host=minilm_server.url)
    v = np.array(client.embed(model="all-minilm:l6-v2", input=PARAPHRASES + [UNRELATED]).embeddings)
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > 0.6 > v[0] @ v[2]
    o = openai.OpenAI(base_url=minilm_server.url + "/v1", api_key="x")
    w = np.array([d.embedding for d in o.embeddings.create(model="all-minilm:l6-v2",
                                                           input=PARAPHRASES + [UNRELATED]).data])
    assert np.allclose(v, w, atol=1e-5)


def test_embedding_model_refuses_generation(minilm_server):
    r = HTTP.post(minilm_server.url + "/api/generate", json={"model": "all-minilm:l6-v2", "prompt": "hi"})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]
    info = ollama.Client(host=minilm_server.url).show("all-minilm:l6-v2")
    assert info.capabilities == ["embedding"]


def test_long_input_truncates_or_errors(minilm_server):
    long = "word " * 2000
    ok = HTTP.post(minilm_server.url + "/api/embed", json={"model": "all-minilm:l6-v2", "input": long})
    assert ok.status_code == 200 and ok.json()["prompt_eval_count"] == 512
    bad = HTTP.post(minilm_server.url + "/api/embed", json={"model": "all-minilm:l6-v2", "input": long,
                                                              "truncate": False})
    assert bad.status_code == 400 and "shorten it or allow truncation" in bad.json()["error"]


def test_zip_slip_entries_are_refused(tmp_path):
    import zipfile
    from slmops.store.sources import safe_extract_zip
    from slmops.types.errors import SourceError
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escaped.txt", "x")
    with pytest.raises(SourceError, match="escapes its folder"):
        safe_extract_zip(zipfile.ZipFile(evil), tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
