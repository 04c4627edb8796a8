"""The fleet simulator: its stated model and fault grammar without a network, and a rollout to 1,000 simulated
devices against a real ``slmops fleet serve`` (SQLite) and a real ``docker-registry`` holding two signed releases.

The big run asserts correctness only, never speed: the rollout converges; the variant that fails to load and the
one that regresses TTFT are stopped in their class's first wave, and only those classes; every device of a stopped
class ends on the previous release (the one that was offline through the revert too); every replayed, forged and
expired document is refused with its reason and none is activated; the final state of every device agrees four
ways (simulator, its last ``device.running`` ledger entry, the rollout's ledger entries, the control plane's device
list). Its timings are printed for the record.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from registry import BINARY

from slmops.fleet.histogram import BUCKETS
from slmops.fleet.sim import classes, report, runner
from slmops.fleet.sim.devices import Timing
from slmops.fleet.sim.faults import Faults, behaviours
from slmops.types.errors import InvalidInput

BAD = {"npu-aarch64", "cpu-aarch64"}  # the default faults: a load failure and a TTFT regression


# -- the model and the faults, without a network ------------------------------------------------------------------

def test_fault_grammar_and_what_each_device_gets():
    f = Faults.parse("default")
    assert f.load_failure == {"npu-aarch64"} and f.ttft_regression == {"cpu-aarch64": 1.8}
    assert f.bad_classes == BAD and Faults.parse(f.describe()) == f
    assert Faults.parse("none").bad_classes == set()
    assert f.fails_to_load("npu-aarch64", new_release=True) and not f.fails_to_load("npu-aarch64", False)
    assert f.serving("cpu-aarch64", True).ttft_factor == 1.8 and f.serving("cpu-aarch64", False).ttft_factor == 1
    for bad, needle in (("load:gpu-riscv", "unknown class"), ("clock:2", "between 0 and 1"),
                        ("melt:1", "unknown fault"), ("ttft:cpu-x86_64xfast", "not a number"),
                        ("load", "write faults as")):
        with pytest.raises(InvalidInput, match=needle):
            Faults.parse(bad)
    kinds = classes.assign(1000, classes.parse_mix(""))
    got = behaviours(kinds, Faults.parse("clock:0.01,replay:0.02,offline:0.03"), random.Random(0))
    assert sum(1 for b in got if b.clock_offset) == 10 and sum(b.replay for b in got) == 20
    assert sum(1 for b in got if b.offline_at is not None) == 30
    assert all(360 <= abs(b.clock_offset) <= 1800 for b in got if b.clock_offset)  # past the skew, inside the TTL


def test_class_mix_and_windows_follow_the_stated_model():
    kinds = classes.assign(1003, classes.parse_mix("cpu-x86_64=3,cuda-x86_64=1"))
    assert (kinds.count("cpu-x86_64"), kinds.count("cuda-x86_64")) == (752, 251)
    assert set(kinds[:4]) == {"cpu-x86_64", "cuda-x86_64"}  # interleaved: any prefix is mixed
    with pytest.raises(InvalidInput, match="unknown class"):
        classes.parse_mix("tpu-x86_64=1")
    rng = random.Random(1)
    pi = classes.Serving(classes.CLASSES["cpu-aarch64"])
    windows = [classes.window(rng, pi, 1.0, 10.0) for _ in range(200)]
    served = sum(w.requests for w in windows)
    assert abs(served / 2000 - pi.cls.requests_per_s) < 0.3  # Poisson around the stated rate
    assert all(sum(w.ttft.counts) == sum(w.itl.counts) == w.requests for w in windows)
    assert all(len(w.ttft.to_wire()) <= BUCKETS for w in windows)
    total = classes.Histogram()
    for w in windows:
        total.merge(w.ttft.counts)
    p50 = total.quantile(0.5)
    assert p50 is not None and abs(p50 / pi.cls.ttft_ms - 1) < 0.1  # the stated median, within the buckets' width
    slow = classes.window(rng, classes.Serving(pi.cls, ttft_factor=1.8), 1.0, 60.0).ttft.quantile(0.5)
    assert slow is not None and slow > 1.5 * p50


def test_bad_options_are_one_line_before_anything_starts(tmp_path: Path):
    env = {**os.environ, "SLMOPS_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)}
    for args, needle in ((["--faults", "melt:1"], "unknown fault"), (["--bake", "soon"], "--bake 'soon'"),
                         (["--db", "oracle"], "--db 'oracle'"), (["--waves", "1,10,50"], "100%")):
        done = subprocess.run([sys.executable, "-m", "slmops.cli.main", "fleet", "simulate", *args],
                              capture_output=True, text=True, timeout=120, env=env, check=False)
        assert done.returncode != 0 and needle in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not list(tmp_path.glob("slmops-sim-*"))  # nothing was started


# -- 1,000 devices --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thousand(tmp_path_factory) -> dict:
    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    folder = tmp_path_factory.mktemp("fleet-sim")
    scenario = runner.Scenario(devices=1000, bake_s=2.0, timing=Timing(delay_scale=0.3), deadline_s=240, seed=7)
    result = runner.run(scenario, folder=folder).to_json()
    print(report.markdown([result]))  # the timings, for the record (never asserted)
    (folder / "result.json").write_text(json.dumps(result, default=str))
    return result


def test_the_rollout_converges_and_agrees_with_the_ledger(thousand):
    r = thousand
    assert r["crashed_count"] == 0, r["crashed"]
    assert r["converge_s"] is not None, f"did not converge: {r['final']} {r['classes']}"
    final = r["final"]
    assert final["mismatches"] == 0, final["examples"]
    assert final["settled"] and final["assigned"] > 0
    good = set(r["classes"]) - BAD
    for name in good:
        c = r["classes"][name]
        assert (c["status"], c["wave"], c["on_new"]) == ("done", 4, c["devices"]), (name, c)
        assert len(c["advanced_at"]) == 3
    assert r["rollout"]["status"] == "completed"


def test_bad_variants_stop_in_their_first_wave_on_their_class_only(thousand):
    r = thousand
    assert {n for n, c in r["classes"].items() if c["status"] == "failed"} == BAD
    for name in BAD:
        c = r["classes"][name]
        assert c["stopped_in_wave"] == 1 and c["advanced_at"] == [], (name, c)
        assert c["on_previous"] == c["devices"] and c["on_new"] == 0, (name, c)
        failed = {g["gate"].split(" ")[0] for g in c["gates"] if g["outcome"] == "fail"}
        assert failed == ({"load_failure_rate"} if name == "npu-aarch64" else {"ttft_p95"}), c["gates"]
        assert c["back"] == c["affected"] and (c["revert_s"] is not None or not c["affected"])
    first_wave = max(1, -(-r["classes"]["npu-aarch64"]["devices"] // 100))  # 1% of the class, at least one
    assert r["classes"]["cpu-aarch64"]["took_new"] <= first_wave and r["classes"]["npu-aarch64"]["took_new"] == 0
    assert r["final"]["reverted"] == 2 * first_wave  # a device.reverted entry for each device a wave gave it
    assert r["returners"] and all(x["on_previous_s"] is not None for x in r["returners"]), r["returners"]


def test_no_device_activates_a_replayed_forged_or_expired_document(thousand):
    r = thousand
    assert r["violations"] == []
    reasons = {"replayed": "rollback", "forged": "signature", "expired": "expired"}
    for kind, attack in r["attacks"].items():
        assert attack["injected"] > 0 and attack["accepted"] == 0, (kind, attack)
        assert attack["reasons"] == {reasons[kind]: attack["injected"]}, (kind, attack)
    assert r["counts"]["clock_corrected"] >= 10  # 1% of the devices were off by minutes and corrected
    assert r["counts"]["back_online"] == r["counts"]["offline"] > 0
