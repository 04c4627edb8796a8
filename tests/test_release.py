"""`slmops release`, the CI/CD pipeline of a Modelfile, run as the shipped GitHub Actions workflow runs it.

The `slmops release` line is taken from examples/ci/github-actions/model-release.yml itself (its variables filled
in), so the workflow and what is tested here cannot drift apart. End to end, every part real: a docker-registry,
a `slmops fleet serve` process on SQLite that trusts only the release key, an enrolled device in the rollout's
group, and the real default model quantized to Q8_0. A passing run leaves the signed variant in the registry, the
release on the canary channel and a rollout under way; a rerun changes nothing; a release whose golden prompt
cannot pass stops at the gate and sends nothing anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml

from conftest import BIN, link_home, run_cli
from registry import BINARY, DOCKER_MANIFEST, OCI_MANIFEST, Registry
from test_fleet_e2e import ControlPlane
from slmops.client.fleet import FleetClient
from slmops.config.settings import SETTINGS
from slmops.types.errors import NotFound

WORKFLOW = Path(__file__).parents[1] / "examples" / "ci" / "github-actions" / "model-release.yml"
ALLOW = {"SLMOPS_ALLOW_PRIVATE_REGISTRIES": "true", "SLMOPS_CONFIG": ""}
MODELFILE = "FROM smollm2:135m\nPARAMETER num_ctx 2048\n"
PASSES = {"prompt": "What is the capital of France?", "expect": "paris", "max_tokens": 16}
CANNOT_PASS = {"prompt": "What is the capital of France?", "expect": "Zanzibar-7731", "max_tokens": 16}
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def release_step() -> dict[str, Any]:
    return next(s for s in workflow()["jobs"]["release"]["steps"] if "slmops release" in s.get("run", ""))


def release_command() -> str:
    """The workflow's `slmops release` line, continuation lines joined."""
    run = release_step()["run"].replace("\\\n", " ")
    return next(line.strip() for line in run.splitlines() if line.strip().startswith("slmops release"))


def workflow_args(values: dict[str, str]) -> list[str]:
    """The arguments the workflow gives `slmops release`, its variables replaced by ``values``, without the shell's
    redirection of the summary."""
    words = shlex.split(VARIABLE.sub(lambda m: values[m.group(1)], release_command()))
    assert words[:2] == ["slmops", "release"]
    return words[2:words.index(">")] if ">" in words else words[2:]


def test_the_workflow_installs_from_the_repository_and_runs_a_valid_release_line() -> None:
    wf = workflow()
    job = wf["jobs"]["release"]
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "models/assistant/**" in triggers["push"]["paths"]
    setup = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/setup-python"))
    assert setup["with"]["python-version"] == "3.11" and setup["with"]["cache"] == "pip"
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert not re.search(r"pip install\s+['\"]?slmops\b(?!\s*@)", runs), "slmops is not on the package index"
    assert re.search(r"pip install \"slmops @ \$SLMOPS_SOURCE\"", runs) and job["env"]["SLMOPS_SOURCE"].startswith(
        "git+https://")

    # every variable of the release line is set by the job, or is GitHub's own; secrets reach slmops by the names
    # its settings declare
    step_env = release_step()["env"]
    used = set(VARIABLE.findall(release_command()))
    assert used - set(job["env"]) - set(step_env) == {"RUNNER_TEMP"}
    declared = {s.name for s in SETTINGS}
    for name in ("SLMOPS_FLEET_KEY", "SLMOPS_REGISTRY_USERNAME", "SLMOPS_REGISTRY_PASSWORD"):
        assert name in declared and step_env[name].startswith("${{ secrets.")
    assert "SLMOPS_SIGNING_PASSWORD" in release_step()["env"]

    # the line is one the real command accepts: every option exists and every required one is given
    from slmops.cli.main import app
    command = typer.main.get_command(app)
    with command.make_context("slmops", ["release", "--help"], resilient_parsing=True) as ctx:
        release = command.get_command(ctx, "release")
    args = workflow_args({v: f"x{v.lower()}" for v in used} | {"VERSION": "1.0.1", "MODEL": "assistant"})
    parsed = release.make_context("release", args).params
    assert parsed["release"] == "assistant:1.0.1" and parsed["channel"] == "canary" and parsed["variant"] == [
        "cpu=q8_0"] and parsed["as_json"] and parsed["to"] == "xrollout_group"


# -- end to end ----------------------------------------------------------------------------------------------------

@dataclass
class World:
    registry: Registry
    plane: ControlPlane
    key: str  # an operator's, as a CI job holds
    device: str
    signing_key: Path
    work: Path  # the checkout: models/assistant/{Modelfile,golden.jsonl}
    home: Path  # the job's SLMOPS_HOME, the default model already in it

    def fleet(self) -> FleetClient:
        return FleetClient(self.plane.url, self.key)

    def release(self, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """`slmops release` as the workflow runs it, plus ``extra`` (a loopback registry speaks plain HTTP)."""
        values = {"MODEL": "assistant", "VERSION": version, "REGISTRY": f"{self.registry.host}/models",
                  "FLEET_URL": self.plane.url, "ROLLOUT_GROUP": "edge", "RUNNER_TEMP": str(self.signing_key.parent)}
        env = {**os.environ, **ALLOW, "SLMOPS_HOME": str(self.home), "SLMOPS_FLEET_KEY": self.key,
               "SLMOPS_FLEET_HOST": "", "SLMOPS_SIGNING_PASSWORD": ""}
        return subprocess.run([str(BIN), "release", *workflow_args(values), "--insecure", *extra], cwd=self.work,
                              capture_output=True, text=True, timeout=600, env=env)

    def manifest(self, tag: str, accept: str = DOCKER_MANIFEST) -> httpx.Response:
        return httpx.get(f"{self.registry.url}/v2/models/assistant/manifests/{tag}", headers={"Accept": accept},
                         timeout=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_home):
    from test_signing import keypair

    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    tmp = tmp_path_factory.mktemp("release")
    secrets = tmp / "runner-temp"
    secrets.mkdir()
    signing_key, public = keypair(secrets, "release")
    registry = Registry(tmp / "registry")
    (tmp / "plane").mkdir()
    plane = ControlPlane(tmp / "plane", SLMOPS_FLEET_TRUSTED_KEYS=str(public))  # every signature checked
    try:
        made = run_cli("fleet", "keys", "create", "ci", "--role", "operator", home=tmp / "plane",
                       SLMOPS_FLEET_HOST=plane.env["SLMOPS_FLEET_HOST"], SLMOPS_FLEET_DB="")
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        admin = run_cli("fleet", "keys", "create", "root", "--role", "admin", home=tmp / "plane",
                        SLMOPS_FLEET_HOST=plane.env["SLMOPS_FLEET_HOST"], SLMOPS_FLEET_DB="").stdout.strip()
        with FleetClient(plane.url, admin) as fleet:
            token = fleet.create_token("10m", {"site": "lab"}).token
            fleet.put_group("edge", {"site": "lab"})
        enrolled = run_cli("agent", "enrol", "--token", token, "--control", plane.url, "--name", "bench-1",
                           home=tmp / "device", **ALLOW)
        assert enrolled.returncode == 0, enrolled.stderr
        device = json.loads((tmp / "device" / "fleet" / "device.json").read_text())["device_id"]
        work = tmp / "checkout"
        (work / "models" / "assistant").mkdir(parents=True)
        (work / "models" / "assistant" / "Modelfile").write_text(MODELFILE)
        yield World(registry, plane, key, device, signing_key, work, link_home(shared_home, tmp / "job"))
    finally:
        plane.stop()
        registry.stop()


def golden(world: World, *cases: dict[str, Any]) -> None:
    (world.work / "models" / "assistant" / "golden.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))


def summary_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        return json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"no JSON summary on stdout ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def statuses(summary: dict[str, Any]) -> dict[str, str]:
    return {s["step"]: s["status"] for s in summary["steps"]}


@pytest.mark.slow
def test_a_release_reaches_the_registry_the_canary_channel_and_a_rollout(world: World) -> None:
    golden(world, PASSES)
    done = world.release("1.0.7")
    assert done.returncode == 0, done.stderr
    summary = summary_of(done)
    assert summary["ok"] and summary["release"] == "assistant:1.0.7"
    assert statuses(summary) == dict.fromkeys(
        ("check", "create", "quantize", "gate", "sign", "push", "release", "channel", "rollout"), "done")
    # each step says what it did, as it ends, on stderr (stdout is the summary)
    assert [line.split()[0] for line in done.stderr.splitlines() if line.split()[:1] and line.split()[1:2] == [
        "done"]] == ["check", "create", "quantize", "gate", "sign", "push", "release", "channel", "rollout"]
    [variant] = summary["variants"]
    assert variant["hardware"] == "cpu" and variant["reference"] == f"{world.registry.host}/models/assistant:1.0.7-q8_0"
    digest = variant["digest"]
    gate = next(s for s in summary["steps"] if s["step"] == "gate")["data"]
    [row] = gate["models"]
    assert row["eval"]["perplexity"] > 0 and row["golden"]["passed"] == row["golden"]["total"] == 1

    # the registry: the Q8_0 variant under the version's tag, and its signature beside it; the model as created
    # was not a variant of its own, so it was not pushed
    pushed = world.manifest("1.0.7-q8_0")
    assert pushed.status_code == 200 and pushed.headers["docker-content-digest"] == digest
    signature = world.manifest(f"sha256-{digest.removeprefix('sha256:')}.sig", OCI_MANIFEST)
    assert signature.status_code == 200 and signature.json()["artifactType"].startswith("application/vnd.dev.sigstore")
    assert world.manifest("1.0.7").status_code == 404

    # the control plane (trusting only the release key): the release pinned to the pushed digest and signed, on
    # canary, with its golden prompt, and a rollout to the group that has reached the device
    with world.fleet() as fleet:
        release = fleet.release("assistant", "1.0.7")
        assert [(v.hardware, v.manifest_digest, v.signed) for v in release.variants] == [("cpu", digest, True)]
        assert release.variants[0].reference == f"{world.registry.host}/models/assistant:1.0.7-q8_0@{digest}"
        assert [g.expect for g in release.golden] == ["paris"]
        assert fleet.channel("canary").release == "assistant:1.0.7"
        [rollout] = fleet.rollouts(group="edge")
        assert rollout.id == summary["rollout"] and rollout.release == "assistant:1.0.7"
        assert rollout.status == "running" and [(c.devices["total"], c.devices["targeted"]) for c in rollout.classes] \
            == [(1, 1)]  # the enrolled device is in wave 1
        assert fleet.device(world.device).groups == ["edge"]

    # a rerun (a job retried) redoes nothing: what was made, gated and signed is found, the push sends no blob,
    # and the release, the channel and the rollout are left as they are
    again = world.release("1.0.7")
    assert again.returncode == 0, again.stderr
    rerun = summary_of(again)
    assert statuses(rerun) == {"check": "done", "create": "skipped", "quantize": "skipped", "gate": "skipped",
                               "sign": "skipped", "push": "done", "release": "skipped", "channel": "skipped",
                               "rollout": "skipped"}
    push = next(s for s in rerun["steps"] if s["step"] == "push")["data"]["pushed"]
    assert [(p["digest"], p["uploaded_blobs"]) for p in push] == [(digest, 0)]
    assert rerun["rollout"] == summary["rollout"]
    with world.fleet() as fleet:
        assert len(fleet.rollouts(group="edge")) == 1


@pytest.mark.slow
def test_a_golden_prompt_that_cannot_pass_stops_the_release_before_anything_leaves(world: World) -> None:
    golden(world, PASSES, CANNOT_PASS)
    with world.fleet() as fleet:
        before = {c.name: c.release for c in fleet.channels()}
    tags_before = httpx.get(f"{world.registry.url}/v2/models/assistant/tags/list", timeout=30)
    # a coarse perplexity, quick, with room for its noise (Q8_0 measures +2% on two windows of 256): the golden
    # prompt decides
    done = world.release("2.0.0", "--ctx", "256", "--windows", "2", "--max-ppl-increase", "5")

    assert done.returncode == 1
    [error] = done.stderr.strip().splitlines()[-1:]
    assert error.startswith("Error: release assistant:2.0.0 stopped at gate, nothing pushed: gate failed: ")
    assert "Zanzibar-7731" in error and "1/2 golden prompts" in error and "Traceback" not in done.stderr
    summary = summary_of(done)
    assert not summary["ok"] and summary["failed_step"] == "gate" and summary["rollout"] is None
    assert statuses(summary) == {"check": "done", "create": "done", "quantize": "done", "gate": "failed",
                                 "sign": "not run", "push": "not run", "release": "not run", "channel": "not run",
                                 "rollout": "not run"}
    gate = next(s for s in summary["steps"] if s["step"] == "gate")["data"]
    assert gate["models"][0]["golden"]["failed"][0]["prompt"] == CANNOT_PASS["prompt"]

    # nothing reached the registry or the control plane
    assert world.manifest("2.0.0-q8_0").status_code == 404
    tags = httpx.get(f"{world.registry.url}/v2/models/assistant/tags/list", timeout=30)
    assert tags.status_code == tags_before.status_code and tags.text == tags_before.text
    with world.fleet() as fleet:
        with pytest.raises(NotFound):
            fleet.release("assistant", "2.0.0")
        assert {c.name: c.release for c in fleet.channels()} == before


@pytest.mark.slow
def test_a_dry_run_checks_the_inputs_and_the_control_plane_and_changes_nothing(world: World) -> None:
    golden(world, PASSES)
    done = world.release("3.0.0", "--dry-run")
    assert done.returncode == 0, done.stderr
    summary = summary_of(done)
    assert summary["ok"] and summary["dry_run"]
    assert statuses(summary) == {"check": "done", **dict.fromkeys(
        ("create", "quantize", "gate", "sign", "push", "release", "channel", "rollout"), "planned")}
    planned = {s["step"]: s["detail"] for s in summary["steps"]}
    assert planned["rollout"] == "start a rollout of assistant:3.0.0 to group edge"
    assert planned["release"].endswith(f"cpu={world.registry.host}/models/assistant:3.0.0-q8_0")
    assert not (world.home / "models" / "manifests" / world.registry.host / "models" / "assistant" / "3.0.0").exists()
    assert world.manifest("3.0.0-q8_0").status_code == 404
    with world.fleet() as fleet, pytest.raises(NotFound):
        fleet.release("assistant", "3.0.0")

    # a wrong operator key is found by the check, before anything is made
    refused = subprocess.run([str(BIN), "release", *workflow_args({
        "MODEL": "assistant", "VERSION": "3.0.0", "REGISTRY": f"{world.registry.host}/models",
        "FLEET_URL": world.plane.url, "ROLLOUT_GROUP": "edge", "RUNNER_TEMP": str(world.signing_key.parent)}),
        "--insecure"], cwd=world.work, capture_output=True, text=True, timeout=120,
        env={**os.environ, **ALLOW, "SLMOPS_HOME": str(world.home), "SLMOPS_FLEET_KEY": "slm_0000_wrong"})
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("Error: release assistant:3.0.0 stopped at check, "
                                                               "nothing pushed: ")
    assert [line.split()[:2] for line in refused.stderr.splitlines()[:-1]] == [["check", "failed"]]
    assert not (world.home / "models" / "manifests" / world.registry.host / "models" / "assistant" / "3.0.0").exists()


def test_input_mistakes_are_one_line_errors_before_anything_runs(tmp_path: Path) -> None:
    base = ["release", "assistant:1.0.0", "--registry", "127.0.0.1:5000/models", "--key", str(tmp_path / "k.pem")]
    cases = {
        (): "Error: name the group a rollout starts in with --to GROUP, or pass --no-rollout",
        ("--no-rollout", "--variant", "cpu"): "Error: --variant 'cpu': write it as HARDWARE=TYPE (cpu=q8_0, "
                                              "cuda=f16, *=as-is)",
        ("--no-rollout", "--variant", "cpu=q9_9"): "Error: ",
        ("--no-rollout", "--variant", "cpu=q8_0", "--variant", "cpu=f16"): "Error: a hardware key is given twice",
        ("--to", "edge", "--waves", "a,b"): "Error: --waves 'a,b': write cumulative percents such as 1,10,50,100",
    }
    for extra, expected in cases.items():
        done = run_cli(*base, *extra, home=tmp_path / "home")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith(expected), (extra, done.stderr)
    assert not (tmp_path / "home" / "models").exists()
