"""``slmops import --from-ollama``: a fake Ollama store built from the real default model, imported by the real CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import DEFAULT, link_home, run_cli

from slmops.store.importing import ALREADY, IMPORTED, KEPT, SKIPPED, import_ollama
from slmops.store.sealed import MAGIC
from slmops.store.store import Store

PIRATE = "127.0.0.1:5000/team/pirate:v1"
KEY = "ab" * 32


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(root: Path, data: bytes, media_type: str) -> dict:
    (root / "blobs" / f"sha256-{sha(data)}").write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{sha(data)}", "size": len(data)}


def put_manifest(root: Path, parts: tuple[str, ...], data: bytes | dict) -> Path:
    """Ollama writes compact JSON; slmops's own manifests are indented, so a re-serialised copy would show."""
    path = root.joinpath("manifests", *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode())
    return path


@pytest.fixture
def ollama(tmp_path: Path, shared_home: Path) -> Path:
    """An Ollama ``models`` folder: the default model, a namespaced ``host:port`` model (Ollama keeps the colon in
    the folder name), a manifest that does not parse, a name outside the grammar, and a model with a damaged blob."""
    root = tmp_path / "ollama" / "models"
    (root / "blobs").mkdir(parents=True)
    src = shared_home / "models"
    for blob in (src / "blobs").iterdir():
        if blob.name.startswith("sha256-"):
            try:
                os.link(blob, root / "blobs" / blob.name)
            except OSError:
                shutil.copy(blob, root / "blobs" / blob.name)
    m = json.loads(Store(src).manifest_bytes(DEFAULT))
    put_manifest(root, ("registry.ollama.ai", "library", "smollm2", "135m"), m)
    params = put_blob(root, b'{"stop":["<|im_start|>","<|im_end|>"],"temperature":0}', "application/vnd.ollama.image.params")
    pirate = [params if l["mediaType"].endswith(".params") else l for l in m["layers"]]
    put_manifest(root, ("127.0.0.1:5000", "team", "pirate", "v1"), {**m, "layers": pirate})
    put_manifest(root, ("registry.ollama.ai", "library", "broken", "latest"), b'{"schemaVersion": 2, "layers": [')
    put_manifest(root, ("registry.ollama.ai", "library", "bad..name", "latest"), m)
    (root / "manifests" / ".DS_Store").write_bytes(b"not a model")
    data = b"GGUF" + bytes(range(256)) * 8
    damaged = root / "blobs" / f"sha256-{sha(data)}"
    damaged.write_bytes(data[:100] + b"X" + data[101:])
    own = put_blob(root, b"You are a model whose weights were damaged.", "application/vnd.ollama.image.system")
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{sha(data)}", "size": len(data)},
              own]
    put_manifest(root, ("registry.ollama.ai", "library", "corrupt", "latest"), {**m, "layers": layers})
    return root


def listed(home: Path, **env: str) -> dict[str, str]:
    p = run_cli("list", home=home, **env)
    assert p.returncode == 0, p.stderr
    return {line.split()[0]: line.split()[1] for line in p.stdout.splitlines()[1:]}


def blobs(home: Path) -> list[Path]:
    return sorted((home / "models" / "blobs").iterdir())


def test_import_adopts_good_models_by_link_and_skips_bad_ones(home, ollama):
    p = run_cli("import", "--from-ollama", str(ollama), home=home)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "imported smollm2:135m (98 MB, linked)" in p.stdout
    assert f"imported {PIRATE} (98 MB, linked)" in p.stdout
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, p.stderr
    assert any("skipped broken:latest: its manifest does not parse" in w for w in warnings)
    assert any("skipped registry.ollama.ai/library/bad..name/latest: its name is outside" in w for w in warnings)
    assert any("skipped corrupt:latest: blob sha256:" in w and "does not match its digest" in w for w in warnings)
    assert "2 imported, 3 skipped" in p.stdout and "Traceback" not in p.stderr

    # names kept, manifests byte for byte: the ids `slmops list` shows are the ones `ollama list` shows
    ids = listed(home)
    assert set(ids) == {"smollm2:135m", PIRATE}
    assert ids["smollm2:135m"] == sha((ollama / "manifests/registry.ollama.ai/library/smollm2/135m").read_bytes())[:12]
    ours = (home / "models/manifests/127.0.0.1%5000/team/pirate/v1").read_bytes()
    assert ours == (ollama / "manifests/127.0.0.1:5000/team/pirate/v1").read_bytes() and ids[PIRATE] == sha(ours)[:12]

    # every blob is Ollama's file itself (same inode); nothing of the damaged model, no temp file, was kept
    stored = blobs(home)
    assert len(stored) == 6 and all(b.name.startswith("sha256-") for b in stored)
    for blob in stored:
        theirs = (ollama / "blobs" / blob.name).stat()
        if theirs.st_dev == blob.stat().st_dev:
            assert blob.stat().st_ino == theirs.st_ino
    own = sha(b"You are a model whose weights were damaged.")
    assert not (home / "models/blobs" / f"sha256-{own}").exists()

    # every import is in the audit log
    records = [json.loads(line) for line in (home / "audit" / "audit.log").read_text().splitlines()]
    imports = {r["model"]: r for r in records if r["route"] == "import"}
    assert imports["smollm2:135m"]["status"] == 0 and imports["corrupt:latest"]["status"] == 1
    assert "does not match its digest" in imports["corrupt:latest"]["error"]

    again = run_cli("import", "--from-ollama", str(ollama), home=home)
    assert again.returncode == 1
    assert "smollm2:135m is already there" in again.stdout and f"{PIRATE} is already there" in again.stdout
    assert "0 imported, 2 already there, 3 skipped" in again.stdout
    assert listed(home) == ids


def test_ollama_models_is_the_default_dir(home, ollama, tmp_path):
    p = run_cli("import", "--from-ollama", home=home, OLLAMA_MODELS=str(ollama))
    assert "imported smollm2:135m" in p.stdout and p.returncode == 1
    # without it, ~/.ollama/models; here there is none
    p = run_cli("import", "--from-ollama", home=home, OLLAMA_MODELS="", HOME=str(tmp_path / "nobody"))
    default = tmp_path / "nobody" / ".ollama" / "models"
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        (f"Error: {default} is not an Ollama model store (it has no manifests folder); pass the folder Ollama keeps "
         "its models in, or set OLLAMA_MODELS")]
    p = run_cli("import", "--from-ollama", str(tmp_path), home=home)
    assert p.returncode == 1 and "is not an Ollama model store" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("import", str(ollama), home=home)
    assert p.returncode == 1 and "slmops import --from-ollama" in p.stderr


def test_sealed_store_gets_sealed_copies(home, ollama):
    p = run_cli("import", "--from-ollama", str(ollama), home=home, SLMOPS_STORE_KEY=KEY)
    assert "imported smollm2:135m (98 MB, sealed)" in p.stdout, p.stdout + p.stderr
    for blob in blobs(home):
        assert blob.stat().st_ino != (ollama / "blobs" / blob.name).stat().st_ino
        with open(blob, "rb") as f:
            assert f.read(len(MAGIC)) == MAGIC
    assert listed(home, SLMOPS_STORE_KEY=KEY)["smollm2:135m"] == \
        sha((ollama / "manifests/registry.ollama.ai/library/smollm2/135m").read_bytes())[:12]
    shown = run_cli("show", "smollm2:135m", home=home, SLMOPS_STORE_KEY=KEY)
    assert shown.returncode == 0 and "quantization        Q4_1" in shown.stdout


def test_copies_where_links_are_refused(home, ollama, monkeypatch):
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    results = {r.what: r for r in import_ollama(Store(home / "models"), ollama)}
    assert results["smollm2:135m"].outcome == IMPORTED and results["smollm2:135m"].how == "copied"
    assert results["corrupt:latest"].outcome == SKIPPED
    for blob in blobs(home):
        theirs = ollama / "blobs" / blob.name
        assert blob.stat().st_ino != theirs.stat().st_ino and blob.read_bytes() == theirs.read_bytes()


def test_a_different_model_of_the_same_name_is_kept_unless_forced(tmp_path, shared_home, ollama):
    home = link_home(shared_home, tmp_path / "mine")  # the same model, but as slmops writes manifests
    store = Store(home / "models")
    mine = store.manifest_bytes(DEFAULT)
    store.signature_path(DEFAULT).parent.mkdir(parents=True)
    store.signature_path(DEFAULT).write_text("a signature of my manifest")
    results = {r.what: r for r in import_ollama(store, ollama)}
    assert results["smollm2:135m"].outcome == KEPT and "--force" in results["smollm2:135m"].reason
    assert store.manifest_bytes(DEFAULT) == mine and store.signature_path(DEFAULT).exists()
    results = {r.what: r for r in import_ollama(store, ollama, force=True)}
    assert results["smollm2:135m"].outcome == IMPORTED and results["smollm2:135m"].how == ""  # blobs were there
    assert results[PIRATE].outcome == ALREADY
    theirs = (ollama / "manifests/registry.ollama.ai/library/smollm2/135m").read_bytes()
    assert store.manifest_bytes(DEFAULT) == theirs and not store.signature_path(DEFAULT).exists()


def test_trusted_keys_note_that_imports_are_unsigned(home, ollama, tmp_path):
    p = run_cli("import", "--from-ollama", str(ollama), home=home, SLMOPS_TRUSTED_KEYS=str(tmp_path / "trusted.pub"))
    assert "2 imported" in p.stdout
    assert p.stderr.count("will not load until signed") == 1


def test_imported_model_generates(home, ollama):
    assert "imported smollm2:135m" in run_cli("import", "--from-ollama", str(ollama), home=home).stdout
    import slmops

    with slmops.load("smollm2:135m", home=home, pull_missing=False) as model:
        assert model.generate("Hi", options={"num_predict": 8, "temperature": 0}).text.strip()
