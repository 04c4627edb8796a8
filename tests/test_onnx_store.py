"""Models stored as a folder (ONNX Runtime GenAI): ``FROM ./folder`` makes a blob per file, named by the OCI title
annotation; the runtime gets the folder back as links (to memfds in a sealed store); such a model is pushed to and
pulled from a real registry byte for byte, and `oras` pulls it back into a folder. These tests need no ONNX
Runtime: the folder is a small made-up one (the engine's tests use a real export)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from registry import empty_registry  # noqa: F401

from slmops.engine.client import spec_from_store
from slmops.modelfile import build
from slmops.modelfile.parser import parse
from slmops.ops.hw import Hardware, CPU, offer
from slmops.ops.variants import MachinePolicy
from slmops.store import manifests as mt
from slmops.store.catalog import Catalog
from slmops.store.pulling import plan_of
from slmops.store.registry import RemoteManifest
from slmops.store.sealed import plain_folder
from slmops.store.store import Store
from slmops.types.digest import Digest
from slmops.types.errors import InvalidInput, InvalidModelFile
from slmops.types.name import ModelName

NAME = ModelName.parse("tiny-onnx")
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def genai_config(decoder: str = "model.onnx", ctx: int = 2048) -> dict:
    return {"model": {"type": "llama", "context_length": ctx, "vocab_size": 49152, "eos_token_id": 2,
                      "decoder": {"filename": decoder, "hidden_size": 576, "num_hidden_layers": 30,
                                  "num_attention_heads": 9, "num_key_value_heads": 3}},
            "search": {"max_length": ctx}}


def make_folder(root: Path, **extra: bytes) -> Path:
    folder = root / "model"
    folder.mkdir(parents=True)
    files = {"genai_config.json": json.dumps(genai_config()).encode(), "model.onnx": b"onnx-graph" * 100,
             "model.onnx.data": os.urandom(4096), "tokenizer.json": b'{"model": {}}',
             "chat_template.jinja": TEMPLATE.encode(), **extra}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def create(store: Store, folder: Path, extra: str = "", name: ModelName = NAME):
    mf = parse(f"FROM {folder}\n{extra}")
    return build.create(store, name, mf, folder.parent)


def test_from_a_folder_stores_a_blob_per_file_and_runs_as_that_folder(tmp_path):
    store = Store(tmp_path / "models")
    folder = make_folder(tmp_path)
    manifest = create(store, folder, "PARAMETER temperature 0.2\nSYSTEM Be brief.")
    files = [l for l in manifest.layers if l.media_type == mt.FILE]
    assert [l.annotations[mt.TITLE] for l in files] == sorted(p.name for p in folder.iterdir())
    for layer in files:
        assert store.blobs.read_bytes(layer.blob) == (folder / layer.annotations[mt.TITLE]).read_bytes()
    assert store.read_text(manifest, mt.TEMPLATE) == TEMPLATE  # the folder's template, as a layer
    assert store.config(NAME)["model_format"] == "onnx"

    info = store.inspect(NAME)
    assert (info.architecture, info.context_length, info.file_type) == ("llama", 2048, "onnx")
    assert info.metadata["llama.block_count"] == 30

    spec = spec_from_store(store, NAME)
    assert spec.format == "onnx" and spec.context_length == 2048 and spec.params == {"temperature": 0.2}
    assert set(spec.files) == {p.name for p in folder.iterdir()}
    with plain_folder(spec.files, None) as runnable:
        for p in folder.iterdir():
            assert (runnable / p.name).read_bytes() == p.read_bytes()
            assert (runnable / p.name).resolve() == store.blob_path(Digest.of_bytes(p.read_bytes()))
    assert not runnable.exists()

    # FROM the stored model inherits the files; a GGUF-only operation says what it works on
    derived = build.create(store, ModelName.parse("tiny-onnx-2"), parse("FROM tiny-onnx\nSYSTEM Other."), None)
    assert [l.digest for l in derived.layers if l.media_type == mt.FILE] == [l.digest for l in files]
    with pytest.raises(InvalidInput, match="ONNX Runtime GenAI model; this works on GGUF models only"):
        store.model_path(NAME)
    with pytest.raises(InvalidInput, match="ADAPTER works on GGUF models"):
        build.create(store, ModelName.parse("x"), parse("FROM tiny-onnx\nADAPTER ./a.gguf"), tmp_path)


def test_a_sealed_store_hands_the_runtime_links_to_plaintext_in_memory(tmp_path):
    store = Store(tmp_path / "models", key=os.urandom(32))
    folder = make_folder(tmp_path)
    create(store, folder)
    spec = spec_from_store(store, NAME)
    blob = spec.files["model.onnx.data"]
    assert blob.read_bytes() != (folder / "model.onnx.data").read_bytes()  # sealed at rest
    with plain_folder(spec.files, spec.unseal_key) as runnable:
        link = os.readlink(runnable / "model.onnx.data")
        assert link.startswith("/proc/self/fd/")  # a memfd: the plaintext never reaches a file system
        assert (runnable / "model.onnx.data").read_bytes() == (folder / "model.onnx.data").read_bytes()


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "genai_config.json").unlink(), "has no genai_config.json"),
    (lambda f: (f / "model.onnx").unlink(), "names model.onnx, which the folder does not hold"),
    (lambda f: (f / "genai_config.json").write_text("{"), "is not an ONNX Runtime GenAI config"),
    (lambda f: (f / "sub").mkdir(), "holds sub, which is not a plain file"),
    (lambda f: (f / "link").symlink_to("/etc/passwd"), "holds link, which is not a plain file"),
])
def test_a_folder_that_is_no_model_is_refused_and_stores_nothing(tmp_path, change, message):
    store = Store(tmp_path / "models")
    folder = make_folder(tmp_path)
    change(folder)
    with pytest.raises(InvalidModelFile, match=message):
        create(store, folder)
    assert not store.exists(NAME)
    assert not any((store.root / "blobs").glob("sha256-*"))


def test_a_registry_manifest_with_file_layers_is_kept_as_served_and_bad_names_are_refused():
    def remote(titles: list[str]) -> RemoteManifest:
        digest = "sha256:" + "ab" * 32
        doc = {"config": {"mediaType": mt.CONFIG_MEDIA_TYPE, "digest": digest, "size": 2},
               "layers": [{"mediaType": mt.FILE, "digest": digest, "size": 1, "annotations": {mt.TITLE: t}}
                          for t in titles]}
        return RemoteManifest(json.dumps(doc).encode(), mt.MANIFEST_MEDIA_TYPE, Digest.of_bytes(b"x"), doc)

    plan = plan_of(remote(["genai_config.json", "model.onnx"]), "m")
    assert plan.keep_bytes and set(plan.files) == {"genai_config.json", "model.onnx"}
    for titles, message in ((["../genai_config.json"], "plain names"), (["model.onnx"], "has no genai_config"),
                            (["genai_config.json", "genai_config.json"], "names a file twice")):
        with pytest.raises(InvalidModelFile, match=message):
            plan_of(remote(titles), "m")


def test_onnx_variants_say_which_extra_is_missing_and_need_a_variant_policy(tmp_path, model_file):
    data = json.loads((Path(__file__).parents[1] / "slmops" / "store" / "catalog.json").read_text())
    entry = data["models"]["smollm2:135m-onnx"]
    entry["source"] = {"type": "file", "path": str(model_file)}
    catalog = Catalog(data)
    with pytest.raises(InvalidInput, match="made on pull .*needs a store opened with a variant policy"):
        Store(tmp_path / "a", catalog=catalog).pull(ModelName.parse("smollm2:135m-onnx"))

    hw = Hardware(cpu=CPU("cpu", "x86_64", 2, 2, ("avx2",)), ram_total_bytes=1 << 34, ram_available_bytes=1 << 33,
                  gpus=(), onnx_providers=(), llama_gpu_offload=False, onnx_genai=None)
    policy = MachinePolicy(probe=lambda: offer(hw))
    store = Store(tmp_path / "b", catalog=catalog, variants=policy)
    with pytest.raises(InvalidInput, match=r"cpu-onnx-int4 skipped: ONNX Runtime GenAI is not installed "
                                           r"\(pip install 'slmops\[onnx\]'\)"):
        store.pull(ModelName.parse("smollm2:135m-onnx"))
    assert not store.exists(ModelName.parse("smollm2:135m-onnx"))
    with_genai = Hardware(**{**hw.__dict__, "onnx_genai": "0.18.0"})
    assert "onnx" in offer(with_genai).formats


# -- through a real registry -----------------------------------------------------------------------------------
def test_a_folder_model_goes_to_a_registry_and_back_byte_for_byte_and_oras_gets_the_folder(
        empty_registry, tmp_path, monkeypatch):  # noqa: F811
    registry = empty_registry
    import oras.client
    from slmops.store.registry_auth import RegistryConfig
    from slmops.store.pushing import push_to_registry
    from slmops.types.name import Reference

    store = Store(tmp_path / "models", allow_internal_registries=True)
    folder = make_folder(tmp_path)
    name = ModelName.parse(f"{registry.host}/library/tiny-onnx:int4")
    create(store, folder, name=name)
    digest = store.manifests.digest(name)
    push_to_registry(store, Reference.of(name), lambda *a: None, RegistryConfig(insecure=True))

    other = Store(tmp_path / "other", allow_internal_registries=True)
    other.pull(Reference.of(name), registry=RegistryConfig(insecure=True))
    assert other.manifests.digest(name) == digest  # kept as served: the registry's digest
    spec = spec_from_store(other, name)
    assert spec.format == "onnx"
    with plain_folder(spec.files, None) as runnable:
        assert {p.name: p.read_bytes() for p in runnable.iterdir()} == \
            {p.name: p.read_bytes() for p in folder.iterdir()}

    monkeypatch.chdir(tmp_path)  # oras writes under the working directory
    got = oras.client.OrasClient(insecure=True).pull(target=str(name.display), outdir="oras")
    titled = sorted(Path(f).name for f in got if not Path(f).name.startswith("sha256:"))  # the template layer has none
    assert titled == sorted(p.name for p in folder.iterdir())
    assert (tmp_path / "oras" / "model.onnx.data").read_bytes() == (folder / "model.onnx.data").read_bytes()


@pytest.mark.slow
def test_without_onnxruntime_genai_everything_else_runs_and_an_onnx_model_names_the_extra(tmp_path, cli_home):
    """A venv without the extra: the module is shadowed by one that fails to import, as a missing one does."""
    from conftest import run_cli

    shim = tmp_path / "shim"
    for module in ("onnxruntime_genai", "onnxruntime"):
        (shim / module).mkdir(parents=True)
        (shim / module / "__init__.py").write_text(f"raise ImportError(\"No module named '{module}'\")\n")
    env = {"PYTHONPATH": str(shim)}
    folder = make_folder(tmp_path)
    (tmp_path / "Modelfile").write_text(f"FROM {folder}\n")
    made = run_cli("create", "tiny-onnx", "-f", str(tmp_path / "Modelfile"), home=cli_home, **env)
    assert made.returncode == 0, made.stderr
    gguf = run_cli("run", "smollm2:135m", "Say hi", home=cli_home, **env)
    assert gguf.returncode == 0 and gguf.stdout.strip(), gguf.stderr  # llama.cpp models run as before
    r = run_cli("run", "tiny-onnx", "Say hi", home=cli_home, **env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "pip install 'slmops[onnx]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_folder_model_is_signed_over_every_file_and_a_changed_file_fails_verification(tmp_path):
    from test_signing import keypair

    from slmops.security.signing import TrustPolicy, sign, verify
    from slmops.types.errors import IntegrityError

    store = Store(tmp_path / "models")
    folder = make_folder(tmp_path)
    manifest = create(store, folder)
    priv, pub = keypair(tmp_path, "release")
    sign(store, NAME, priv)
    verify(store, NAME, [pub])
    trusting = Store(tmp_path / "models", trust=TrustPolicy([pub]))
    assert spec_from_store(trusting, NAME).format == "onnx"  # loads under the policy
    data = next(l for l in manifest.layers if l.annotations.get(mt.TITLE) == "model.onnx.data")
    blob = store.blob_path(data.blob)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")  # one byte of the weights changed
    with pytest.raises(IntegrityError):
        spec_from_store(trusting, NAME)
