"""Encryption at rest with the real model: a sealed store holds no plaintext, the server and the CLI run models
from it, the plaintext exists only in memory, and a wrong or missing key is a clear error."""

import psutil
import pytest

from conftest import HTTP, Server, link_home, run_cli
from test_signing import keypair
from slmops.store import manifests as mt
from slmops.store.store import Store
from slmops.types.name import ModelName

M = "smollm2:135m"
KEY = "5e" * 32
OTHER_KEY = "a7" * 32


def plaintext_markers(shared_home) -> list[bytes]:
    """Bytes any plain copy of the model would contain: a tensor name from the GGUF header, the chat template,
    the licence text."""
    store = Store(shared_home / "models")
    manifest = store.manifest(ModelName.parse(M))
    return [b"token_embd.weight", store.read_text(manifest, mt.TEMPLATE)[:60].encode(),
            store.read_text(manifest, mt.LICENSE)[:60].encode()]


def files_holding(home, markers: list[bytes]) -> list[str]:
    found = []
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(home)}: {m[:20]!r}" for m in markers if m in data]
    return found


@pytest.fixture(scope="module")
def sealed_home(shared_home, tmp_path_factory):
    """The default model sealed in place by `slmops store seal`, then used by a server (caches written sealed)."""
    home = link_home(shared_home, tmp_path_factory.mktemp("sealed"))
    r = run_cli("store", "seal", home=home, SLMOPS_STORE_KEY=KEY)
    assert r.returncode == 0, r.stderr
    assert "rewritten sealed" in r.stdout
    return home


@pytest.fixture(scope="module")
def sealed_server(sealed_home):
    s = Server(sealed_home, SLMOPS_STORE_KEY=KEY)
    yield s
    s.stop()


def test_a_sealed_server_answers_and_keeps_plaintext_only_in_memory(sealed_server, sealed_home, shared_home):
    import ollama
    client = ollama.Client(host=sealed_server.url)
    r = client.generate(model=M, prompt="The capital of France is", raw=True,
                        options={"num_predict": 4, "temperature": 0})
    assert "Paris" in r.response
    shown = client.show(M)
    assert shown.template and "Apache" in (shown.license or "") and shown.details.family == "llama"
    runners = [p for p in psutil.Process(sealed_server.proc.pid).children()
               if "slmops.engine.worker" in " ".join(p.cmdline())]
    assert len(runners) == 1
    maps = (runners[0].open_files(), open(f"/proc/{runners[0].pid}/maps").read())
    assert "/memfd:slmops-plain" in maps[1]  # llama.cpp mapped the weights from memory
    assert "/blobs/sha256-" not in maps[1]
    assert files_holding(sealed_home, plaintext_markers(shared_home)) == []  # nothing plain on disk, caches included
    assert "store seal" in (sealed_home / "audit" / "audit.log").read_text()


def test_a_wrong_or_missing_key_is_a_clear_error(sealed_home, tmp_path):
    wrong = Server(sealed_home, SLMOPS_STORE_KEY=OTHER_KEY)
    try:
        r = HTTP.post(wrong.url + "/api/generate", json={"model": M, "prompt": "hi", "stream": False})
        assert r.status_code == 400
        error = r.json()["error"]
        assert "cannot be decrypted: wrong SLMOPS_STORE_KEY" in error and "/" not in error.split(":")[0]
        assert str(sealed_home) not in error
        assert HTTP.get(wrong.url + "/api/version").status_code == 200
    finally:
        wrong.stop()
    none = run_cli("show", M, home=sealed_home)
    assert none.returncode != 0 and "is encrypted and no store key is set; set SLMOPS_STORE_KEY" in none.stderr
    assert len(none.stderr.strip().splitlines()) == 1
    bad = run_cli("show", M, home=sealed_home, SLMOPS_STORE_KEY="not-a-key")
    assert bad.returncode != 0 and "SLMOPS_STORE_KEY must be a 256-bit key" in bad.stderr
    both = tmp_path / "key"
    both.write_text(KEY)
    twice = run_cli("show", M, home=sealed_home, SLMOPS_STORE_KEY=KEY, SLMOPS_STORE_KEY_FILE=str(both))
    assert twice.returncode != 0 and "both set; keep one" in twice.stderr
    from_file = run_cli("show", M, "--template", home=sealed_home, SLMOPS_STORE_KEY_FILE=str(both))
    assert from_file.returncode == 0 and "im_start" in from_file.stdout


def test_pull_and_create_seal_what_they_write_and_run_works(tmp_path, shared_home):
    home = tmp_path / "fresh"
    env = {"SLMOPS_STORE_KEY": KEY}
    assert run_cli("pull", M, home=home, **env).returncode == 0
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {M}\nSYSTEM You answer in one word, a secret system prompt.\n")
    assert run_cli("create", "terse", "-f", str(modelfile), home=home, **env).returncode == 0
    blobs = list((home / "models" / "blobs").iterdir())
    assert blobs and all(b.read_bytes()[:8] == b"SLMSEAL1" for b in blobs)
    assert files_holding(home, plaintext_markers(shared_home) + [b"a secret system prompt"]) == []
    r = run_cli("run", "terse", "What color is the sky?", "--verbose", home=home, **env)
    assert r.returncode == 0 and r.stdout.strip() and "eval count:" in r.stderr


def test_a_signature_covers_plaintext_so_it_survives_sealing_and_unsealing(tmp_path, shared_home):
    home = link_home(shared_home, tmp_path / "h")
    priv, pub = keypair(tmp_path, "release")
    assert run_cli("sign", M, "--key", str(priv), home=home).returncode == 0
    env = {"SLMOPS_STORE_KEY": KEY}
    assert run_cli("store", "seal", home=home, **env).returncode == 0
    ok = run_cli("verify", M, "--key", str(pub), home=home, **env)
    assert ok.returncode == 0, ok.stderr
    unsealed = run_cli("store", "unseal", home=home, **env)
    assert unsealed.returncode == 0 and "now plain" in unsealed.stdout
    assert all(b.read_bytes()[:8] != b"SLMSEAL1" for b in (home / "models" / "blobs").iterdir())
    assert run_cli("verify", M, "--key", str(pub), home=home).returncode == 0
    no_key = run_cli("store", "seal", home=home)
    assert no_key.returncode != 0 and "no store key is set" in no_key.stderr
