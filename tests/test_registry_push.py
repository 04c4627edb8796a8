"""Pushing to a real registry (Debian's docker-registry, started by tests/registry.py): through the CLI, a real
`slmops serve` with the official `ollama` client, and the Python API; round trips back through `slmops pull`,
chunked uploads shown in the registry's own access log, signatures that travel with the model, and interop both
ways with the `oras` client, which no one here wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import ollama
import pytest

from conftest import DEFAULT, Server, link_home, run_cli
from registry import DOCKER_MANIFEST, OCI_MANIFEST, Registry, empty_registry, tiny_gguf  # noqa: F401
from slmops.modelfile import build, parse
from slmops.store import manifests as mt
from slmops.store.pushing import BUNDLE_MEDIA_TYPE, PushLimits, push_to_registry
from slmops.store.registry_auth import RegistryConfig
from slmops.store.store import Store
from slmops.types.errors import IntegrityError
from slmops.types.name import ModelName, Reference

ALLOW = {"SLMOPS_ALLOW_PRIVATE_REGISTRIES": "true"}
INSECURE = RegistryConfig(insecure=True)
MODELFILE = "FROM smollm2:135m\nSYSTEM You are a pirate. Answer like one.\nPARAMETER temperature 0\n"


@pytest.fixture(scope="module")
def registry(empty_registry):
    return empty_registry


@pytest.fixture(scope="module")
def pusher(tmp_path_factory, shared_home):
    """A home with the default model (hard links) that the tests push from."""
    return link_home(shared_home, tmp_path_factory.mktemp("pusher") / "home")


def store_of(home: Path, **kw) -> Store:
    return Store(home / "models", allow_internal_registries=True, **kw)


def uploads(reg: Registry) -> list[tuple[str, int, int]]:
    """Blob bytes the registry accepted: PUTs and PATCHes of upload sessions."""
    return [r for m in ("PUT", "PATCH") for r in reg.requests(m, "/blobs/uploads/")]


def stored_files(home: Path) -> set[tuple[str, int]]:
    models = home / "models"
    return {(str(p.relative_to(models)), p.stat().st_size) for sub in ("manifests", "blobs", "signatures")
            for p in (models / sub).rglob("*") if p.is_file() and "partial" not in p.parts}


def answer(home: Path, name: str) -> str:
    import slmops
    with slmops.load(name, home=home, pull_missing=False, num_ctx=512) as model:
        return model.generate("Who are you?", options={"num_predict": 8, "temperature": 0}).text


def ok(r) -> None:
    assert r.returncode == 0, (r.stdout, r.stderr)


def registry_manifest(reg: Registry, repo: str, ref: str) -> httpx.Response:
    return httpx.get(f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"})


# -- round trip through the CLI --------------------------------------------------------------------------------
def test_create_push_rm_pull_round_trip_and_a_second_push_or_pull_moves_nothing(registry, pusher, tmp_path):
    name = f"{registry.host}/library/pirate:latest"
    (tmp_path / "Modelfile").write_text(MODELFILE)
    ok(run_cli("create", name, "-f", str(tmp_path / "Modelfile"), home=pusher))
    store = store_of(pusher)
    digest = store.manifests.digest(ModelName.parse(name))
    before = answer(pusher, name)
    assert before.strip()

    first = run_cli("push", "--insecure", name, home=pusher, **ALLOW)
    ok(first)
    lines = first.stderr.splitlines()
    assert lines[0] == "retrieving manifest" and lines[-2:] == ["pushing manifest", "success"], first.stderr
    model_hex = store.manifest(ModelName.parse(name)).layer(mt.MODEL).blob.hex
    assert f"pushing {model_hex[:12]}" in lines
    sent = uploads(registry)
    puts, patches = registry.requests("PUT", "/blobs/uploads/"), registry.requests("PATCH", "/blobs/uploads/")
    assert len(puts) == 6 and all(status == 201 for _, status, _ in puts)  # config + 5 layers, one session each
    assert len(patches) == 98362432 // (16 << 20)  # the 94 MiB model, over 64 MiB: 16 MiB chunks, the rest in the PUT
    got = registry_manifest(registry, "library/pirate", "latest")
    assert got.content == store.manifest_bytes(ModelName.parse(name))  # byte for byte: the same digest
    assert got.headers["docker-content-digest"] == str(digest)

    ok(run_cli("push", "--insecure", name, home=pusher, **ALLOW))
    assert uploads(registry) == sent  # the registry had every blob: nothing was uploaded again

    ok(run_cli("rm", name, home=pusher))
    assert not store.exists(ModelName.parse(name))
    ok(run_cli("pull", "--insecure", name, home=pusher, **ALLOW))
    assert store.manifests.digest(ModelName.parse(name)) == digest
    gets = len(registry.requests("GET"))
    ok(run_cli("pull", "--insecure", name, home=pusher, **ALLOW))
    assert len(registry.requests("GET")) == gets  # a second pull downloads no blob
    assert answer(pusher, name) == before


# -- chunked uploads, the Python API, sealed stores ----------------------------------------------------------------
def test_large_blobs_go_up_in_patch_chunks_and_oras_pulls_the_same_bytes(registry, pusher, tmp_path):
    import oras.client
    store = store_of(pusher)
    name = ModelName.parse(f"{registry.host}/library/chunked:v1")
    store.copy(DEFAULT, name)
    model = store.manifest(name).layer(mt.MODEL)
    seen: list[tuple[str, int, int | None]] = []
    limits = PushLimits(monolithic_max=1024, chunk_size=8 << 20)
    result = push_to_registry(store, Reference.of(name), lambda *a: seen.append(a), INSECURE, limits)
    assert model.blob in result.uploaded and len(result.uploaded) == len(store.manifest(name).all_layers())
    patches = registry.requests("PATCH", "/library/chunked/blobs/uploads/")
    assert len(patches) == model.size // (8 << 20) and all(status == 202 for _, status, _ in patches)
    progress = [c for s, c, t in seen if s == f"pushing {model.blob.hex[:12]}"]
    assert progress == sorted(progress) and progress[-1] == model.size and len(progress) > 3

    out = tmp_path / "oras"
    files = oras.client.OrasClient(insecure=True).pull(target=f"{registry.host}/library/chunked:v1",
                                                       outdir=str(out))
    assert len(files) == len(store.manifest(name).layers)
    pulled = out / str(model.blob)  # oras names a layer without a title annotation by its digest
    assert pulled.stat().st_size == model.size
    assert pulled.read_bytes() == store.blobs.read_bytes(model.blob)


def test_a_sealed_store_pushes_plaintext(registry, tmp_path):
    gguf = tiny_gguf(tmp_path / "tiny.gguf")
    sealed = store_of(tmp_path / "sealed", key=os.urandom(32))
    name = ModelName.parse(f"{registry.host}/library/sealed:v1")
    build.create(sealed, name, parse("FROM ./tiny.gguf\n"), tmp_path)
    model = sealed.manifest(name).layer(mt.MODEL)
    assert sealed.blobs.is_sealed(model.blob) and model.size == len(gguf)
    push_to_registry(sealed, Reference.of(name), lambda *a: None, INSECURE)
    assert httpx.get(f"{registry.url}/v2/library/sealed/blobs/{model.blob}").content == gguf


def test_a_blob_damaged_on_disk_is_never_pushed_under_its_digest(registry, tmp_path):
    gguf = tiny_gguf(tmp_path / "tiny.gguf", seed=7)
    store = store_of(tmp_path / "plain")
    name = ModelName.parse(f"{registry.host}/library/damaged:v1")
    build.create(store, name, parse("FROM ./tiny.gguf\n"), tmp_path)
    model = store.manifest(name).layer(mt.MODEL)
    path = store.blobs.path(model.blob)
    path.unlink()  # a file of its own, whatever create linked
    path.write_bytes(gguf[:-8] + b"damaged!")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        push_to_registry(store, Reference.of(name), lambda *a: None, INSECURE,
                         PushLimits(monolithic_max=1024, chunk_size=4096))
    assert httpx.head(f"{registry.url}/v2/library/damaged/blobs/{model.blob}").status_code == 404
    assert registry_manifest(registry, "library/damaged", "v1").status_code == 404


# -- the official ollama client against slmops serve ---------------------------------------------------------------
def test_ollama_client_pushes_through_slmops_serve(registry, pusher):
    server = Server(pusher, **ALLOW)
    try:
        client = ollama.Client(host=server.url, timeout=120)
        name = f"{registry.host}/team/viaollama:latest"
        client.copy("smollm2:135m", name)
        parts = list(client.push(name, insecure=True, stream=True))
        statuses = [p.status for p in parts]
        assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"], statuses
        model = store_of(pusher).manifest(ModelName.parse(name)).layer(mt.MODEL)
        layer = [p for p in parts if p.status == f"pushing {str(model.blob)[7:19]}"]
        assert layer and layer[-1].total == model.size and layer[-1].completed == model.size
        got = registry_manifest(registry, "team/viaollama", "latest")
        assert got.status_code == 200 and got.content == store_of(pusher).manifest_bytes(ModelName.parse(name))
        with pytest.raises(ollama.ResponseError, match="names no registry"):
            client.push("smollm2:135m", insecure=True)
        with pytest.raises(ollama.ResponseError, match="not found"):
            client.push(f"{registry.host}/team/absent:latest", insecure=True)
    finally:
        server.stop()


# -- signatures -----------------------------------------------------------------------------------------------
def test_signed_push_is_accepted_by_trusted_keys_and_refused_once_the_signature_is_gone(registry, pusher, tmp_path,
                                                                                       shared_home):
    from test_signing import keypair
    priv, pub = keypair(tmp_path, "release")
    stranger, _ = keypair(tmp_path, "stranger")
    name = f"{registry.host}/library/signed:v1"
    ok(run_cli("cp", "smollm2:135m", name, home=pusher))
    ok(run_cli("sign", name, "--key", str(priv), home=pusher))
    ok(run_cli("push", "--insecure", name, home=pusher, **ALLOW))
    digest = store_of(pusher).manifests.digest(ModelName.parse(name))
    sig = registry_manifest(registry, "library/signed", f"sha256-{digest.hex}.sig")
    assert sig.status_code == 200 and json.loads(sig.content)["artifactType"] == BUNDLE_MEDIA_TYPE
    trust = {**ALLOW, "SLMOPS_TRUSTED_KEYS": str(pub)}

    accepted = link_home(shared_home, tmp_path / "accepted")
    ok(run_cli("pull", "--insecure", name, home=accepted, **trust))
    assert store_of(accepted).signature_path(ModelName.parse(name)).read_bytes() == \
        store_of(pusher).signature_path(ModelName.parse(name)).read_bytes()

    refused = link_home(shared_home, tmp_path / "refused")
    files = stored_files(refused)
    ok(run_cli("sign", name, "--key", str(stranger), home=pusher))  # another key's signature over the tag
    ok(run_cli("push", "--insecure", name, home=pusher, **ALLOW))
    r = run_cli("pull", "--insecure", name, home=refused, **trust)
    assert r.returncode == 1 and "not signed by a trusted key" in r.stderr.strip().splitlines()[-1], r.stderr
    assert stored_files(refused) == files

    sig = registry_manifest(registry, "library/signed", f"sha256-{digest.hex}.sig")
    gone = httpx.delete(f"{registry.url}/v2/library/signed/manifests/{sig.headers['docker-content-digest']}")
    assert gone.status_code == 202, gone.text
    r = run_cli("pull", "--insecure", name, home=refused, **trust)
    assert r.returncode == 1 and "is not signed" in r.stderr.strip().splitlines()[-1], r.stderr
    assert stored_files(refused) == files


# -- interop: a bare GGUF pushed by oras -------------------------------------------------------------------------
def test_a_gguf_pushed_by_oras_is_pulled_and_generates(registry, shared_home, model_file, tmp_path, monkeypatch):
    import oras.client
    (tmp_path / "art").mkdir()
    gguf = tmp_path / "art" / "smollm2.gguf"
    gguf.hardlink_to(model_file)
    monkeypatch.chdir(tmp_path / "art")  # oras takes paths under the working directory
    oras.client.OrasClient(insecure=True).push(target=f"{registry.host}/oras/smollm2:q8", files=["smollm2.gguf"])
    home = link_home(shared_home, tmp_path / "home")
    name = f"{registry.host}/oras/smollm2:q8"
    ok(run_cli("pull", "--insecure", name, home=home, **ALLOW))
    manifest = store_of(home).manifest(ModelName.parse(name))
    assert manifest.layer(mt.MODEL).digest == str(store_of(shared_home).manifest(DEFAULT).layer(mt.MODEL).blob)
    assert registry.requests("GET", "/oras/smollm2/blobs/") == []  # the store had the GGUF: not downloaded
    assert answer(home, name).strip()


# -- errors ---------------------------------------------------------------------------------------------------
def test_names_without_a_host_and_absent_models_are_one_line_errors(registry, pusher):
    for args, text in [(("smollm2:135m",), "slmops cp smollm2:135m host[:port]/namespace/smollm2:135m"),
                       ((f"{registry.host}/library/absent:v1",), "not found; nothing to push"),
                       ((f"{registry.host}/library/x@sha256:{'a' * 64}",), "push by tag"),
                       ((f"http://{registry.host}/library/x:v1",), "push with --insecure")]:
        r = run_cli("push", *args, home=pusher, **ALLOW)
        assert r.returncode == 1, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], r.stderr
    ok(run_cli("cp", "smollm2:135m", f"{registry.host}/library/guarded:v1", home=pusher))
    r = run_cli("push", "--insecure", f"{registry.host}/library/guarded:v1", home=pusher)  # no ALLOW
    assert r.returncode == 1 and "SLMOPS_ALLOW_PRIVATE_REGISTRIES=true" in r.stderr.strip().splitlines()[-1]
    assert not registry.requests("HEAD", "/library/guarded/")
