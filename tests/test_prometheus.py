"""Monitoring for real: the shipped Prometheus config and rules pass Debian's ``promtool`` (syntax, and unit tests
that make each alert fire and stay quiet), a real ``prometheus`` scrapes a real ``slmops serve`` and a real
``slmops fleet serve`` and answers PromQL over what they counted, and every metric name the rules and the Grafana
dashboard use is one the servers expose. The control plane's own metrics follow real rollout decisions, and
``/ready`` turns 503 when its database goes away.

Debian's ``prometheus`` package (which ``.ci/run`` installs) brings both binaries; without them the tests that
need them are skipped, saying so. The model server is started without a model: its HTTP counters and latency
histogram are what Prometheus is asked about, and the model metrics' names are declared without one.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fleet_app import BASE_URL, run, serving
from fleet_db import fleet_db_url, postgres  # noqa: F401
from procs import ServerProcess
from prometheus_client.parser import text_string_to_metric_families
from test_fleet_rollout_api import ARM, X86, fleet, healthy, report_round

from slmops.fleet.control.app import ControlPlane
from slmops.fleet.control.db import Database
from slmops.fleet.sim import services

REPO = Path(__file__).parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS, PROMTOOL = Path("/usr/bin/prometheus"), Path("/usr/bin/promtool")
BIN = Path(sys.executable).parent / "slmops"
needs_promtool = pytest.mark.skipif(not PROMTOOL.exists(), reason="Debian's prometheus package is not installed "
                                    "(no /usr/bin/promtool): apt-get install -y prometheus")
needs_prometheus = pytest.mark.skipif(not PROMETHEUS.exists(), reason="Debian's prometheus package is not "
                                      "installed (no /usr/bin/prometheus): apt-get install -y prometheus")
NAME = re.compile(r"\bslmops[_:][a-z0-9_:]*")  # a metric or recorded series (not `slmops-serve`, a job)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=120, cwd=DEPLOY)


# -- the shipped files -----------------------------------------------------------------------------------------

@needs_promtool
def test_shipped_rules_and_config_pass_promtool() -> None:
    rules = sorted(str(p.relative_to(DEPLOY)) for p in (DEPLOY / "prometheus" / "rules").glob("*.yml"))
    assert rules == ["prometheus/rules/fleet.yml", "prometheus/rules/serving.yml"]
    checked = promtool("check", "rules", *rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = promtool("check", "config", "prometheus/prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "2 rule files found" in config.stdout  # the config loads both rule files
    tested = promtool("test", "rules", "prometheus/rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The alert unit tests mean something: with a threshold moved, the same tests fail."""
    folder = tmp_path / "prometheus"
    (folder / "rules").mkdir(parents=True)
    for name in ("serving.yml", "fleet.yml"):
        text = (DEPLOY / "prometheus" / "rules" / name).read_text()
        (folder / "rules" / name).write_text(text.replace("slmops_fleet:devices_seen:ratio{job=~\"slmops-control.*\"} "
                                                          "< 0.9", "slmops_fleet:devices_seen:ratio{job=~\"slmops-"
                                                          "control.*\"} < 0.4"))
    (folder / "rules_test.yml").write_text((DEPLOY / "prometheus" / "rules_test.yml").read_text())
    moved = subprocess.run([str(PROMTOOL), "test", "rules", "rules_test.yml"], capture_output=True, text=True,
                           timeout=120, cwd=folder)
    assert moved.returncode != 0 and "SlmopsFleetDevicesSilent" in moved.stdout + moved.stderr


def rule_names() -> tuple[set[str], set[str]]:
    """The series the rules record, and every slmops name their expressions read."""
    recorded, read = set(), set()
    for path in (DEPLOY / "prometheus" / "rules").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    recorded.add(rule["record"])
                read |= set(NAME.findall(rule["expr"]))
    return recorded, read - recorded


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "slmops.json").read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    assert dash["uid"] and dash["schemaVersion"] >= 36 and exprs
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    return exprs


_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}


def exposed(text: str) -> set[str]:
    """Every series name a /metrics text declares (a labelled metric without values yet still has HELP/TYPE)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in _SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


# -- real processes ------------------------------------------------------------------------------------------

class Prometheus(ServerProcess):
    """Debian's prometheus on a free loopback port, its TSDB in ``folder``, scraping ``targets`` every second."""

    def __init__(self, folder: Path, targets: dict[str, str]):
        folder.mkdir(parents=True, exist_ok=True)
        port = services.free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in targets.items()]}
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        super().__init__([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
                          f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                          "--log.level=warn"], folder / "prometheus.log", f"http://127.0.0.1:{port}")
        self.wait_ready("/-/ready", within=60)

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value ``promql`` gives now, or None while it gives none."""
        result = self.query(promql)
        assert len(result) <= 1, (promql, result)
        return float(result[0]["value"][1]) if result else None

    def eventually(self, promql: str, holds: Any, what: str, within: float = 60.0) -> float:
        """Poll until ``holds(value)``: Prometheus scrapes every second, so the numbers arrive on their own time
        (a deadline for a hang, not a speed check)."""
        deadline = time.monotonic() + within
        while True:
            value = self.value(promql)
            if value is not None and holds(value):
                return value
            assert time.monotonic() < deadline, f"{what}: {promql} = {value}; prometheus log: {self.tail()}"
            time.sleep(0.25)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real ``slmops serve`` with an empty store (no model: its HTTP metrics are what is scraped). Shared by the
    module's tests, which count only requests to routes no other test of it calls."""
    home = tmp_path_factory.mktemp("servehome")
    port = services.free_port()
    env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_HOST": f"127.0.0.1:{port}", "SLMOPS_CONFIG": "",
           "SLMOPS_MODEL": ""}
    server = ServerProcess([BIN, "serve"], home / "server.log", f"http://127.0.0.1:{port}", env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real ``slmops fleet serve`` on SQLite."""
    folder = tmp_path_factory.mktemp("control")
    plane = services.ControlPlane(folder, f"sqlite+aiosqlite:///{folder / 'fleet.db'}", 1.0, None)
    try:
        plane.wait_ready("/ready")
        yield plane
    finally:
        plane.stop()


def host_port(url: str) -> str:
    return url.split("://", 1)[1]


@needs_prometheus
def test_prometheus_scrapes_the_model_server_and_the_control_plane(tmp_path: Path, model_server: Any,
                                                                     control_plane: Any) -> None:
    prom = Prometheus(tmp_path / "prometheus", {"slmops-serve": host_port(model_server.url),
                                                "slmops-control": host_port(control_plane.url)})
    try:
        for job in ("slmops-serve", "slmops-control"):
            prom.eventually(f'up{{job="{job}"}}', lambda v: v == 1, f"{job} is scraped")

        # a request counter that moved, as Prometheus saw it: 5 requests, then 7 more
        served = 'sum(slmops_requests_total{job="slmops-serve", route="/api/version", status="200"})'
        fleet_ok = 'sum(slmops_fleet_requests_total{job="slmops-control", route="/health", status="200"})'
        refused = 'sum(slmops_fleet_requests_total{job="slmops-control", route="/fleet/v1/devices", status="401"})'
        with httpx.Client(timeout=30) as c:
            for _ in range(5):
                assert c.get(f"{model_server.url}/api/version").status_code == 200
                assert c.get(f"{control_plane.url}/health").status_code == 200
            assert c.get(f"{control_plane.url}/fleet/v1/devices").status_code == 401  # no operator key
            prom.eventually(served, lambda v: v == 5, "the model server's first requests")
            prom.eventually(fleet_ok, lambda v: v == 5, "the control plane's first requests")
            prom.eventually(refused, lambda v: v == 1, "the refused request, under its route and status")
            for _ in range(7):
                assert c.get(f"{model_server.url}/api/version").status_code == 200
                assert c.get(f"{control_plane.url}/health").status_code == 200
        prom.eventually(served, lambda v: v == 12, "the model server's counter moved")
        prom.eventually(fleet_ok, lambda v: v == 12, "the control plane's counter moved")
        assert prom.eventually(f"sum(increase({served[4:-1]}[5m]))", lambda v: v > 0, "increase over 5m") > 0

        # a latency quantile from each histogram: finite, positive, within the buckets' range
        for metric, job, route in (("slmops_request_duration_seconds", "slmops-serve", "/api/version"),
                                   ("slmops_fleet_request_duration_seconds", "slmops-control", "/health")):
            q = (f'histogram_quantile(0.95, sum by (le) (rate({metric}_bucket{{job="{job}", '
                 f'route="{route}"}}[1m])))')
            p95 = prom.eventually(q, lambda v: not math.isnan(v), f"p95 of {metric}")
            assert 0 < p95 <= 10, (metric, p95)

        # the fleet's state, read from the database at each scrape
        assert prom.eventually('slmops_fleet_database_up{job="slmops-control"}', lambda v: v == 1, "database") == 1
        assert prom.value('slmops_fleet_rollouts{job="slmops-control", status="running"}') == 0
    finally:
        prom.stop()


def test_rules_and_dashboard_use_only_exposed_metrics(model_server: Any, control_plane: Any) -> None:
    names = set()
    for url in (model_server.url, control_plane.url):
        r = httpx.get(f"{url}/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        names |= exposed(r.text)
    for needed in ("slmops_requests_total", "slmops_time_to_first_token_seconds_bucket",
                   "slmops_fleet_requests_total", "slmops_fleet_gate_failures_total", "slmops_fleet_devices"):
        assert needed in names  # the scrape is what it should be, so an unknown name below means something
    recorded, read = rule_names()
    assert recorded and read
    assert read - names == set(), "rules read metrics no server exposes"
    used = {n for e in dashboard_exprs() for n in NAME.findall(e)}
    assert used - names - recorded == set(), "the dashboard reads metrics nothing exposes or records"
    assert {"slmops_fleet_gate_failures_total", "slmops_time_to_first_token_seconds_bucket"} <= used


# -- the control plane's metrics follow its decisions ------------------------------------------------------------

def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_rollout_decisions_and_fleet_state_are_counted(fleet_db_url: str) -> None:  # noqa: F811
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            for cls, n in ((X86, 4), (ARM, 2)):
                for d in await f.enrol(n, cls):
                    d.hardware_class = cls  # type: ignore[attr-defined]
            f.clock.now += 5
            await report_round(f, healthy())
            r = await f.ops.post("/rollouts", json={"release": "smol:2.0.0", "group": "lyon", "waves": [25, 100],
                                                    "bake": "30s"})
            assert r.status_code == 201, r.text

            def arm_fails(d: Any, release: str | None) -> Any:
                if d.hardware_class == ARM and release == "smol:2.0.0":
                    return "smol:1.0.0", [{"release": "smol:2.0.0", "load_failures": 1}], False
                return healthy()(d, release)

            f.clock.now += 1
            await report_round(f, arm_fails)
            async with httpx.AsyncClient(transport=f.transport, base_url=BASE_URL) as c:
                before = samples((await c.get("/metrics")).text)
                assert value(before, "slmops_fleet_gate_failures_total", hardware_class=ARM,
                             gate="load_failure_rate") == 0
                assert [(d.action, d.hardware_class) for d in await f.tick(1)] == [("gate_failed", ARM),
                                                                                  ("revert", ARM)]
                f.clock.now += 30
                await report_round(f, healthy())
                assert [(d.action, d.hardware_class) for d in await f.tick(1)] == [("wave_advanced", X86)]
                after = samples((await c.get("/metrics")).text)
        assert value(after, "slmops_fleet_gate_failures_total", hardware_class=ARM, gate="load_failure_rate") == 1
        assert value(after, "slmops_fleet_reverts_total", hardware_class=ARM, reason="gate_failed") == 1
        assert value(after, "slmops_fleet_reverted_devices_total", hardware_class=ARM, reason="gate_failed") == 1
        assert value(after, "slmops_fleet_wave_advances_total", hardware_class=X86) == 1
        assert value(after, "slmops_fleet_wave_advances_total", hardware_class=ARM) == 0
        assert value(after, "slmops_fleet_rollouts", status="running") == 1
        assert sum(v for (n, labels), v in after.items() if n == "slmops_fleet_devices"
                   and dict(labels)["hardware_class"] == X86) == 4
        assert value(after, "slmops_fleet_devices_seen", hardware_class=ARM) == 2
        polls = value(after, "slmops_fleet_requests_total", route="/fleet/v1/device/desired", method="GET",
                      status="200") + value(after, "slmops_fleet_requests_total",
                                            route="/fleet/v1/device/desired", method="GET", status="304")
        assert polls >= 6 * 3  # every device polled in each of three rounds, through the fast path
        assert value(after, "slmops_fleet_database_up") == 1

    run(scenario())


# -- readiness -----------------------------------------------------------------------------------------------------

def test_ready_follows_the_database(postgres: Any) -> None:  # noqa: F811
    name = f"ready_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    url = postgres.create_database(name)

    async def scenario() -> None:
        async with serving(ControlPlane(Database(url), rollout_tick_s=0)) as transport:
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
                assert (await c.get("/ready")).json() == {"status": "ready"}
                postgres.sql(f'DROP DATABASE "{name}" WITH (FORCE)')
                r = await c.get("/ready")
                assert r.status_code == 503 and r.json()["status"] == "not ready"
                assert (await c.get("/health")).status_code == 200  # alive: not a reason to restart it
                m = samples((await c.get("/metrics")).text)
                assert value(m, "slmops_fleet_database_up") == 0  # the scrape itself still answers

    try:
        run(scenario())
    finally:
        postgres.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
