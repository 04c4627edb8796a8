"""The control plane and the CLI import without the full install's libraries, and the control-plane distribution
(packaging/control) stays in step with the root one. Fast: the libraries are hidden in a subprocess
(``sys.modules[name] = None`` makes ``import name`` fail and ``find_spec(name)`` answer None, as when the library
is not installed); tests/test_fleet_packaging.py (slow) checks a real install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from slmops.cli.common import CONTROL_PLANE_ONLY, FULL_ONLY_MODULES

REPO = Path(__file__).parents[1]

# What the control plane, `slmops fleet …` and the operators' commands import.
LIGHT = ("slmops", "slmops.fleet.control.app", "slmops.fleet.control.db", "slmops.fleet.control.models",
         "slmops.api.fleet", "slmops.client.fleet", "slmops.cli.main", "slmops.cli.fleet", "slmops.cli.fleet_releases",
         "slmops.store.registry", "slmops.store.registry_auth", "slmops.security.keys", "slmops.security.audit",
         "slmops.security.signing", "slmops.config.settings", "slmops.config.deploy")

# Distributions only the full install has, by the name they are imported as.
FULL_ONLY = {"llama-cpp-python": "llama_cpp", "gguf": "gguf", "numpy": "numpy", "jinja2": "jinja2",
             "jsonschema": "jsonschema", "psutil": "psutil", "pypdf": "pypdf"}

HIDE = f"import sys\nfor name in {FULL_ONLY_MODULES!r}:\n    sys.modules[name] = None\n"


def hidden(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLMOPS_HOME": str(tmp_path / "home"), "SLMOPS_CONFIG": ""}
    return subprocess.run([sys.executable, "-c", HIDE + code], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)


def test_light_modules_import_without_the_engine(tmp_path: Path) -> None:
    p = hidden(f"""
import importlib, json, pkgutil
import slmops.fleet
names = list({LIGHT!r}) + [m.name for m in pkgutil.walk_packages(slmops.fleet.__path__, "slmops.fleet.")
                           if ".migrations" not in m.name]
failed = {{}}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as err:
        failed[name] = repr(err)
from slmops.fleet.control.app import ControlPlane, create_app
from slmops.fleet.control.db import Database
create_app(ControlPlane(Database("sqlite+aiosqlite:///fleet.db")))  # imports the routers
engine = sorted(n for n in sys.modules if n == "slmops.engine" or n.startswith("slmops.engine."))
print(json.dumps({{"failed": failed, "engine": engine, "count": len(names)}}))
""", tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert (out["failed"], out["engine"]) == ({}, [])
    assert out["count"] > len(LIGHT) + 5  # the walk found the fleet's modules


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return hidden(f"sys.argv = ['slmops', *{args!r}]\nfrom slmops.cli.main import main\nmain()", tmp_path)


def test_cli_without_the_engine(tmp_path: Path) -> None:
    for args in (("--help",), ("fleet", "--help"), ("version",)):
        p = cli(tmp_path, *args)
        assert p.returncode == 0, (args, p.stderr)
    for args in (("run", "smollm2:135m", "hi"), ("pull", "smollm2:135m"), ("list",), ("serve",), ("hw",),
                 ("eval", "smollm2:135m")):
        p = cli(tmp_path, *args)
        assert (p.returncode, p.stderr, p.stdout) == (1, f"Error: {CONTROL_PLANE_ONLY}\n", ""), args
    assert not (tmp_path / "home" / "models").exists()  # refused before the store was opened: nothing pulled


def test_control_distribution_matches_the_root_one() -> None:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())
    control = tomllib.loads((REPO / "packaging" / "control" / "pyproject.toml").read_text())
    pins = {d.split("==")[0].lower(): d for d in root["project"]["dependencies"]}
    light = {d.split("==")[0].lower(): d for d in control["project"]["dependencies"]}
    assert control["project"]["name"] == "slmops-control"
    assert control["project"]["version"] == root["project"]["version"]
    assert {name: pins.get(name) for name in light} == light  # the same pins, nothing else the root lacks
    assert {FULL_ONLY.get(name, name) for name in pins.keys() - light.keys()} == set(FULL_ONLY_MODULES)
    assert control["project"]["scripts"] == root["project"]["scripts"]
    assert control["tool"]["setuptools"] == root["tool"]["setuptools"]
    assert control["build-system"] == root["build-system"]
    assert (REPO / "packaging" / "control" / "slmops").resolve() == (REPO / "slmops").resolve()
