"""The rollout state machine and its gates, without a network or a database."""

import pytest

from slmops.fleet.control.gates import DEFAULT_GATES, Gate, Observation, evaluate, verdict
from slmops.fleet.control.rollouts import Plan, Rollout, wave_members
from slmops.types.errors import Conflict, InvalidInput


def obs(devices=5, requests=100, **metrics):
    return Observation(devices, requests, metrics)


GOOD = dict(load_failure_rate=0.0, error_rate=0.0, ttft_p95=100.0, tokens_per_s=50.0, golden_score=1.0)
PREV = obs(**GOOD)


# -- gates ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,metric,op,value,relative", [
    ("load_failure_rate < 0.01", "load_failure_rate", "<", 0.01, False),
    ("ttft_p95 <= 1.2 x previous", "ttft_p95", "<=", 1.2, True),
    ("tokens_per_s>=0.9*previous", "tokens_per_s", ">=", 0.9, True),
    ("golden_score >= 0.8", "golden_score", ">=", 0.8, False),
    ("error_rate < 2e-2", "error_rate", "<", 0.02, False),
])
def test_gates_parse(text, metric, op, value, relative):
    g = Gate.parse(text)
    assert (g.metric, g.op, g.value, g.relative) == (metric, op, value, relative)
    assert Gate.parse(str(g)) == g


@pytest.mark.parametrize("text,needle", [
    ("latency < 3", "unknown metric latency"),
    ("error_rate = 0.1", "write METRIC OP NUMBER"),
    ("error_rate < previous", "write METRIC OP NUMBER"),
    ("", "write METRIC OP NUMBER"),
])
def test_bad_gates_say_what_to_write(text, needle):
    with pytest.raises(InvalidInput, match=needle):
        Gate.parse(text)


def test_relative_gate_compares_with_the_previous_release_on_the_same_class():
    g = Gate.parse("ttft_p95 <= 1.2 x previous")
    assert evaluate(g, obs(ttft_p95=119), obs(ttft_p95=100)).outcome == "pass"
    r = evaluate(g, obs(ttft_p95=121), obs(ttft_p95=100))
    assert (r.outcome, r.value, r.threshold) == ("fail", 121, pytest.approx(120))
    first = evaluate(g, obs(ttft_p95=500), None)  # nothing ran before: nothing to regress from
    assert first.outcome == "pass" and "no previous" in first.note


def test_missing_numbers_wait_and_a_failure_outranks_waiting():
    gates = [Gate.parse(t) for t in DEFAULT_GATES]
    results = [evaluate(g, obs(error_rate=0.5), PREV) for g in gates]
    assert verdict(results) == "fail"
    assert verdict([evaluate(g, obs(error_rate=0.0), PREV) for g in gates]) == "waiting"
    assert verdict([evaluate(g, obs(**GOOD), PREV) for g in gates]) == "pass"


# -- the state machine ---------------------------------------------------------------------------------------

def plan(**kw):
    base = dict(bake_s=10, min_devices=2, min_requests=10, gates=tuple(Gate.parse(t) for t in DEFAULT_GATES))
    return Plan.from_percent((1, 10, 50, 100), **{**base, **kw})


def test_plan_refuses_waves_that_do_not_end_at_the_whole_group():
    with pytest.raises(InvalidInput, match="last wave"):
        Plan.from_percent((10, 50))
    with pytest.raises(InvalidInput, match="increasing"):
        Plan.from_percent((50, 10, 100))


def test_a_passing_class_advances_one_wave_per_bake_and_completes():
    r = Rollout.start("r1", plan(), ["cpu-x86_64"], now=0)
    assert r.step({"cpu-x86_64": obs(**GOOD)}, {"cpu-x86_64": PREV}, now=5) == []  # still baking
    actions = []
    t = 0
    for _ in range(4):
        t += 11
        actions += [d.action for d in r.step({"cpu-x86_64": obs(**GOOD)}, {"cpu-x86_64": PREV}, now=t)]
    assert actions == ["wave_advanced"] * 3 + ["class_completed", "completed"]
    assert r.status == "completed" and r.share("cpu-x86_64") == 1.0


def test_too_small_a_sample_waits_even_when_the_bake_is_over():
    r = Rollout.start("r1", plan(), ["cpu"], now=0)
    assert r.step({"cpu": obs(devices=1, **GOOD)}, {}, now=100) == []
    assert r.step({"cpu": obs(requests=3, **GOOD)}, {}, now=100) == []
    assert [d.action for d in r.step({"cpu": obs(**GOOD)}, {}, now=100)] == ["wave_advanced"]


def test_a_failing_class_stops_at_once_and_is_reverted_while_the_others_go_on():
    r = Rollout.start("r1", plan(), ["cpu-aarch64", "cpu-x86_64"], now=0)
    bad = obs(**{**GOOD, "load_failure_rate": 0.4})
    decisions = r.step({"cpu-aarch64": bad, "cpu-x86_64": obs(**GOOD)}, {}, now=1)  # during the bake: fail fast
    assert [(d.action, d.hardware_class) for d in decisions] == [("gate_failed", "cpu-aarch64"),
                                                                 ("revert", "cpu-aarch64")]
    failed = next(g for g in decisions[0].data["gates"] if g["outcome"] == "fail")
    assert failed["gate"].startswith("load_failure_rate") and failed["value"] == 0.4
    assert r.share("cpu-aarch64") == 0.0
    assert [d.action for d in r.step({"cpu-x86_64": obs(**GOOD)}, {}, now=11)] == ["wave_advanced"]
    assert r.classes["cpu-x86_64"].wave == 1 and r.status == "running"


def test_a_regression_against_the_previous_release_fails_only_that_class():
    r = Rollout.start("r1", plan(), ["a", "b"], now=0)
    slow = obs(**{**GOOD, "ttft_p95": 300.0})
    d = r.step({"a": slow, "b": slow}, {"a": obs(ttft_p95=100.0), "b": obs(ttft_p95=290.0)}, now=11)
    assert [(x.action, x.hardware_class) for x in d] == [("gate_failed", "a"), ("revert", "a"),
                                                          ("wave_advanced", "b")]


def test_pause_holds_resume_rebakes_promote_and_abort():
    r = Rollout.start("r1", plan(), ["a", "b"], now=0)
    r.pause()
    assert r.step({"a": obs(**GOOD), "b": obs(**GOOD)}, {}, now=50) == []
    with pytest.raises(Conflict):
        r.pause()
    r.resume(now=50)
    assert r.step({"a": obs(**GOOD), "b": obs(**GOOD)}, {}, now=55) == []  # the bake starts again
    assert [d.hardware_class for d in r.promote(now=56, hardware_class="a")] == ["a"]
    assert r.share("a") == 1.0 and r.share("b") == 0.01
    d = r.abort()
    assert [(x.action, x.hardware_class) for x in d] == [("aborted", None), ("revert", "a"), ("revert", "b")]
    with pytest.raises(Conflict):
        r.abort()


def test_state_round_trips_through_json():
    r = Rollout.start("r1", plan(), ["a"], now=0)
    r.step({"a": obs(**GOOD)}, {}, now=11)
    again = Rollout.from_json(r.to_json())
    assert again.to_json() == r.to_json()


def test_waves_are_nested_stable_and_never_empty():
    ids = [f"dev_{i:04d}" for i in range(1000)]
    w1, w2, w3 = (wave_members(ids, "r1", s) for s in (0.01, 0.1, 1.0))
    assert len(w1) == 10 and len(w2) == 100 and len(w3) == 1000
    assert set(w1) <= set(w2) <= set(w3)
    assert wave_members(list(reversed(ids)), "r1", 0.1) == w2
    assert wave_members(ids, "r2", 0.1) != w2  # another rollout draws other devices first
    assert len(wave_members(ids[:3], "r1", 0.01)) == 1


def test_a_variant_that_loads_nowhere_fails_without_requests_but_request_gates_wait_for_them():
    r = Rollout.start("r1", plan(min_requests=50), ["cpu"], now=0)
    slow = obs(requests=3, **{**GOOD, "error_rate": 0.5})  # 3 requests: too few to judge an error rate
    assert r.step({"cpu": slow}, {}, now=1) == []
    dead = obs(requests=0, **{**GOOD, "load_failure_rate": 1.0})  # nothing served: it never loaded
    assert [d.action for d in r.step({"cpu": dead}, {}, now=2)] == ["gate_failed", "revert", "completed"]
