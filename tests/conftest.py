"""Shared fixtures. The real default model is pulled once per machine into a cache (pip's cache makes even that
quick) and reused read-only; tests that change a store get their own, fed from that cache through a file source.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from procs import ServerProcess, answered

from slmops.store.catalog import Catalog
from slmops.store.sources import default_sources
from slmops.store.store import Store
from slmops.types.name import ModelName

DEFAULT = ModelName.parse("smollm2:135m")
# Generous timeouts: a request may have to load a model first, and CI machines are busy.
HTTP = httpx.Client(timeout=120)
CACHE = Path(os.environ.get("SLMOPS_TEST_CACHE", Path.home() / ".cache" / "slmops-tests"))
BIN = Path(sys.executable).parent / "slmops"


def cached_home(name: str, model: ModelName) -> Path:
    """An SLMOPS_HOME under the machine's test cache holding ``model``, pulled through the real catalog source the
    first time only."""
    home = CACHE / name
    store = Store(home / "models")
    if not store.exists(model):
        store.pull(model)
    return home


@pytest.fixture(scope="session")
def shared_home() -> Path:
    """An SLMOPS_HOME holding the real default model, pulled through the real catalog source once per machine."""
    return cached_home("home", DEFAULT)


@pytest.fixture(scope="session")
def shared_store(shared_home: Path) -> Store:
    return Store(shared_home / "models")


@pytest.fixture(scope="session")
def model_file(shared_store: Store) -> Path:
    return shared_store.model_path(DEFAULT)


def local_catalog(model_file: Path) -> Catalog:
    """The built-in catalog with the default model's source pointed at a local copy (same pinned digest)."""
    data = json.loads((Path(__file__).parents[1] / "slmops" / "store" / "catalog.json").read_text())
    entry = data["models"]["smollm2:135m"]
    entry["source"] = {"type": "file", "path": str(model_file)}
    return Catalog(data)


@pytest.fixture
def home(tmp_path: Path, model_file: Path) -> Path:
    """A fresh, empty SLMOPS_HOME whose catalog pulls the default model from the local cache."""
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def store(home: Path, model_file: Path) -> Store:
    return Store(home / "models", catalog=local_catalog(model_file), sources=default_sources())


def run_cli(*args: str, home: Path, input: str | None = None, timeout: float = 240, **env: str):
    e = {**os.environ, "SLMOPS_HOME": str(home), **env}
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, input=input, timeout=timeout, env=e)


@pytest.fixture
def cli_home(tmp_path: Path, shared_home: Path) -> Path:
    """An SLMOPS_HOME with the default model already in it (blobs hard-linked from the cache, no copy)."""
    return link_home(shared_home, tmp_path / "clihome")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_home(src_home: Path, dst_home: Path) -> Path:
    """A new SLMOPS_HOME holding the models of ``src_home``; blobs are hard links, not copies."""
    src, dst = src_home / "models", dst_home / "models"
    shutil.copytree(src / "manifests", dst / "manifests")
    (dst / "blobs").mkdir(parents=True)
    for blob in (src / "blobs").iterdir():
        if blob.name.startswith("sha256-"):
            os.link(blob, dst / "blobs" / blob.name)
    return dst_home


class Server(ServerProcess):
    """A real `slmops serve` process on a free loopback port, up (answering /health) once constructed."""

    def __init__(self, home: Path, args: tuple[str, ...] = (), verify: Any = True, **env: str):
        self.port = free_port()
        scheme = "https" if env.get("SLMOPS_TLS_CERT") or "--tls-cert" in args else "http"
        self.home = home
        e = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_HOST": f"127.0.0.1:{self.port}", **env}
        super().__init__([BIN, "serve", *args], home / "server.log", f"{scheme}://127.0.0.1:{self.port}", env=e)
        self.wait_ready(ready=answered, verify=verify)


@pytest.fixture(scope="session")
def server(shared_home: Path, tmp_path_factory) -> Server:
    home = link_home(shared_home, tmp_path_factory.mktemp("serverhome"))
    s = Server(home)
    yield s
    s.stop()
