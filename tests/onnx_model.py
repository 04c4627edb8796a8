"""The default model on ONNX Runtime GenAI, for the tests of that backend.

``onnx_home``: a test home beside the shared one (see conftest), with the default model and ``smollm2:135m-onnx``
pulled the way a user pulls it: the catalog's ``cpu-onnx-int4`` variant, exported from the shipped GGUF (about a
minute, once per machine). The shared home stays as other tests expect it: the default model alone.
``onnx_folder``: that model's files as a folder (links into the store), or the folder ``SLMOPS_TEST_ONNX_DIR``
names. Tests that need them skip where ``onnxruntime-genai`` is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import CACHE, link_home
from slmops.types.name import ModelName

ONNX = "smollm2:135m-onnx"


def pulled(shared_home: Path) -> Path:
    pytest.importorskip("onnxruntime_genai")
    from slmops.ops.variants import MachinePolicy
    from slmops.store.store import Store

    home = CACHE / "onnx-home"
    if not (home / "models").is_dir():
        link_home(shared_home, home)
    store = Store(home / "models", variants=MachinePolicy(fallback=("cpu",)))
    if not store.exists(ModelName.parse(ONNX)):
        store.pull(ModelName.parse(ONNX))
    return home


@pytest.fixture(scope="session")
def onnx_home(shared_home: Path) -> Path:
    return pulled(shared_home)


@pytest.fixture(scope="session")
def onnx_folder(shared_home: Path):
    given = os.environ.get("SLMOPS_TEST_ONNX_DIR")
    if given:
        pytest.importorskip("onnxruntime_genai")
        yield Path(given)
        return
    from slmops.engine.client import spec_from_store
    from slmops.store.sealed import plain_folder
    from slmops.store.store import Store

    spec = spec_from_store(Store(pulled(shared_home) / "models"), ModelName.parse(ONNX))
    with plain_folder(spec.files, None) as folder:
        yield folder
