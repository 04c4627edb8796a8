import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEFAULT, local_catalog
from slmops.modelfile import build, parse
from slmops.store import manifests as mt
from slmops.store.store import Store
from slmops.types.errors import IntegrityError, InvalidName, ModelNotFound
from slmops.types.name import ModelName

SMOL_DIGEST = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_real_pull_has_ollama_layout_and_layers(shared_home):
    root = shared_home / "models"
    path = root / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    manifest = json.loads(path.read_text())
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    types = [l["mediaType"] for l in manifest["layers"]]
    assert types[0] == mt.MODEL and mt.TEMPLATE in types and mt.PARAMS in types and mt.LICENSE in types
    assert manifest["layers"][0]["digest"] == f"sha256:{SMOL_DIGEST}"
    for layer in [manifest["config"], *manifest["layers"]]:
        blob = root / "blobs" / layer["digest"].replace(":", "-")
        assert blob.stat().st_size == layer["size"]
    params = json.loads((root / "blobs" / next(l for l in manifest["layers"] if l["mediaType"] == mt.PARAMS)
                         ["digest"].replace(":", "-")).read_text())
    assert params["stop"] == ["<|im_start|>", "<|im_end|>"]


def test_pull_from_local_source_and_list(store):
    store.pull(DEFAULT)
    assert [r.name.display for r in store.list()] == ["smollm2:135m"]
    assert store.model_path(DEFAULT).name == f"sha256-{SMOL_DIGEST}"


def test_digest_mismatch_stores_nothing(store, tmp_path, model_file):
    bad = tmp_path / "bad.gguf"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    catalog = local_catalog(bad)
    s = Store(store.root, catalog=catalog)
    with pytest.raises(IntegrityError, match="digest mismatch.*nothing was stored"):
        s.pull(DEFAULT)
    assert not s.exists(DEFAULT)
    assert list((s.root / "blobs").glob("*")) == []


def test_unknown_model_is_not_found(store):
    with pytest.raises(ModelNotFound, match='model "nope:latest" not found, try pulling it first'):
        store.pull(ModelName.parse("nope"))


def test_copy_dedups_and_remove_collects_only_unused_blobs(store):
    store.pull(DEFAULT)
    other = ModelName.parse("mine/copy:v1")
    store.copy(DEFAULT, other)
    blobs_before = set((store.root / "blobs").iterdir())
    store.remove(DEFAULT)
    assert set((store.root / "blobs").iterdir()) == blobs_before  # still used by the copy
    store.remove(other)
    assert [p for p in (store.root / "blobs").iterdir() if p.name.startswith("sha256-")] == []
    with pytest.raises(ModelNotFound):
        store.remove(other)


def test_identical_weights_are_stored_once(store, tmp_path, model_file):
    store.pull(DEFAULT)
    mf = tmp_path / "Modelfile"
    mf.write_text(f"FROM {model_file}\nSYSTEM You are terse.\n")
    build.create(store, ModelName.parse("terse"), parse(mf.read_text()), tmp_path)
    models = [p for p in (store.root / "blobs").iterdir() if p.stat().st_size > 1_000_000]
    assert len(models) == 1
    m = store.manifest(ModelName.parse("terse"))
    assert store.read_text(m, mt.SYSTEM) == "You are terse."
    assert store.read_text(m, mt.TEMPLATE).startswith("{% for message in messages %}")  # from the GGUF


def test_create_from_model_inherits_and_overrides(store, tmp_path):
    store.pull(DEFAULT)
    text = 'FROM smollm2:135m\nPARAMETER temperature 0.1\nPARAMETER stop "###"\nSYSTEM """Be brief."""\nMESSAGE user hi\n'
    build.create(store, ModelName.parse("brief"), parse(text), tmp_path)
    m = store.manifest(ModelName.parse("brief"))
    assert store.read_json(m, mt.PARAMS) == {"stop": ["###"], "temperature": 0.1}
    assert store.read_json(m, mt.MESSAGES) == [{"role": "user", "content": "hi"}]
    assert m.layer(mt.MODEL).digest == f"sha256:{SMOL_DIGEST}"
    back = build.to_modelfile(store, ModelName.parse("brief"))
    assert back.system == "Be brief." and back.parameters["temperature"] == 0.1


def test_create_from_missing_base_or_file(store, tmp_path):
    with pytest.raises(ModelNotFound):
        build.create(store, ModelName.parse("x"), parse("FROM someone/unknown\n"), tmp_path)
    with pytest.raises(Exception, match="FROM file ./missing.gguf does not exist"):
        build.create(store, ModelName.parse("x"), parse("FROM ./missing.gguf\n"), tmp_path)


@pytest.mark.parametrize("bad", ["../../escape", "a/b/c/d/e", "x:..", "..:tag"])
def test_names_cannot_escape_the_store(store, bad):
    with pytest.raises(InvalidName):
        store.copy(DEFAULT, ModelName.parse(bad))


KILL_SCRIPT = r'''
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import local_catalog, DEFAULT
from slmops.store.store import Store
from slmops.modelfile import build, parse
from slmops.types.name import ModelName
marker = Path({marker!r})
def progress(status, done, total):
    if total and done > total // 3:
        marker.touch()
        time.sleep(60)
store = Store(Path({root!r}), catalog=local_catalog(Path({model!r})))
if {mode!r} == "pull":
    store.pull(DEFAULT, progress)
else:
    build.create(store, ModelName.parse("killed"), parse("FROM {model}\n"), Path("."), progress)
'''


@pytest.mark.parametrize("mode", ["pull", "create"])
def test_kill_mid_write_leaves_no_half_model(tmp_path, model_file, mode):
    root = tmp_path / "models"
    marker = tmp_path / "marker"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), marker=str(marker), root=str(root),
                                model=str(model_file), mode=mode)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the writer never reached the middle of the copy"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(root, catalog=local_catalog(model_file))
    assert store.list() == []
    assert [p.name for p in (root / "blobs").glob("sha256-*")] == []  # no blob under its final name
    temps = list(root.rglob(".tmp-*"))
    assert temps, "the interrupted write should have left only a temp file"
    store.prune()
    assert list(root.rglob(".tmp-*")) == []
    store.pull(DEFAULT)  # and the store works afterwards
    assert store.exists(DEFAULT)


def test_prune_gives_up_partial_pulls_but_not_one_being_written(store):
    import fcntl

    folder = store.blobs.root / "partial"
    folder.mkdir(parents=True)
    left, busy = folder / ("sha256-" + "a" * 64 + ".partial"), folder / ("sha256-" + "b" * 64 + ".partial")
    left.write_bytes(b"half a blob")
    busy.write_bytes(b"being written")
    with open(busy, "a+b") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # what a running pull holds
        store.prune()
    assert not left.exists() and busy.exists()
