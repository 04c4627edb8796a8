"""The control-plane install, for real: `pip install packaging/control` into a fresh virtualenv (no system site
packages) gets no llama.cpp, starts the control plane, and refuses model commands in one line.

The install is built from a copy laid out as a clean clone holds it (the package, and packaging/control with its
link to it), so nothing is written into the working tree and no earlier build's leftovers reach the wheel.
Dependencies come through pip's cache.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from slmops.cli.common import CONTROL_PLANE_ONLY

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]


def serve(bin_dir: Path) -> list[str]:
    """The control plane as an operator starts it (SLMOPS_FLEET_HOST, SLMOPS_FLEET_DB and SLMOPS_HOME apply)."""
    return [str(bin_dir / "slmops"), "fleet", "serve"]


@pytest.fixture(scope="module")
def control_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ of a fresh virtualenv holding only slmops-control and its dependencies."""
    root = tmp_path_factory.mktemp("control")
    clone = root / "clone"
    shutil.copytree(REPO / "slmops", clone / "slmops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "packaging" / "control", clone / "packaging" / "control", symlinks=True,
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          "--quiet", str(clone / "packaging" / "control")],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return venv / "bin"


def environment(home: Path, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLMOPS_", "PYTHON", "VIRTUAL_ENV"))}
    return {**keep, "SLMOPS_HOME": str(home), **extra}


def test_no_engine_libraries(control_bin: Path, tmp_path: Path) -> None:
    def python(code: str) -> subprocess.CompletedProcess[str]:  # run outside the repository: the installed copy
        return subprocess.run([str(control_bin / "python"), "-c", code], capture_output=True, text=True, timeout=60,
                              env=environment(tmp_path / "home"), cwd=tmp_path)

    for name in ("llama_cpp", "gguf", "numpy"):
        p = python(f"import {name}")
        assert p.returncode == 1 and f"No module named '{name}'" in p.stderr, name
    p = python("import slmops.fleet.control.app; print(slmops.__file__)")
    assert p.returncode == 0 and p.stdout.startswith(str(control_bin.parent)), p.stdout + p.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_control_plane_starts(control_bin: Path, tmp_path: Path) -> None:
    port = free_port()
    env = environment(tmp_path / "home", SLMOPS_FLEET_HOST=f"127.0.0.1:{port}")
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(serve(control_bin), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        status = None
        deadline = time.monotonic() + 120  # a bound on a hang, not a measurement
        while status is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.2)
        log.seek(0)
        assert status == 200, log.read()[-3000:]
        assert (tmp_path / "home" / "fleet.db").is_file()  # migrated at start-up, in SLMOPS_HOME
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_model_commands_refused_in_one_line(control_bin: Path, tmp_path: Path) -> None:
    env = environment(tmp_path / "home")
    for args in (("run", "smollm2:135m"), ("pull", "smollm2:135m"), ("serve",)):
        p = subprocess.run([str(control_bin / "slmops"), *args], capture_output=True, text=True, timeout=120,
                           env=env, cwd=tmp_path)
        assert (p.returncode, p.stderr, p.stdout) == (1, f"Error: {CONTROL_PLANE_ONLY}\n", ""), args
    assert not (tmp_path / "home" / "models").exists()  # nothing was pulled first
    p = subprocess.run([str(control_bin / "slmops"), "fleet", "--help"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 0 and "fleet" in p.stdout, p.stderr
