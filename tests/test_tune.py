"""The feedback loop: rated answers → a dataset with provenance → a LoRA adapter trained on the CPU and converted by
llama.cpp's own converter → the release pipeline's gate → the canary channel.

The dataset tests are fast and need no model. The loop runs end to end on a tiny synthetic feedback set (support
answers about a made-up thermostat) with the real default model, a real docker-registry and a real control plane
(test_release's world): a good adapter is published with its provenance, and an adapter trained on mangled answers
is refused by the gate before anything leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import BIN, run_cli
from registry import DOCKER_MANIFEST
from test_release import ALLOW, PASSES, World, statuses, summary_of, world  # noqa: F401 - world is a fixture
from slmops.ops import dataset
from slmops.store.store import Store
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

RELEASE = "assistant:1.0.0"
FACTS = {
    "reset the Zephyr thermostat": "Hold the dial down for ten seconds until the ring blinks blue, then release it.",
    "change the Zephyr battery": "Slide the back plate up and replace the two AA cells; settings are kept.",
    "connect the Zephyr to Wi-Fi": "Open Settings, choose Network, pick your 2.4 GHz network and enter its password.",
    "turn on eco mode on the Zephyr": "Press the leaf button once; the ring turns green while eco mode is on.",
    "set a schedule on the Zephyr": "Open Schedule, pick a day, then drag the blocks to the hours you want.",
    "lock the Zephyr controls": "Hold the leaf and dial together for three seconds; a padlock appears.",
    "know when to change the filter with the Zephyr": "The ring pulses orange every 90 days; tap it to reset the "
                                                      "filter timer.",
    "switch the Zephyr to Celsius": "Open Settings, choose Display, and set Units to Celsius.",
}
ASKS = ("How do I {}?", "What is the way to {}?", "Can you tell me how to {}?")


def rating(n: int, question: str, answer: str, value: int = 1, release: str = RELEASE, **extra) -> dict:
    """A line as `slmops fleet feedback export` writes it."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "rating": value, "release": release, "at": 1_780_000_000.0 + n, "model": "assistant",
            "id": "fb_" + hashlib.sha256(f"{release}-{n}".encode()).hexdigest()[:24],
            "device_id": f"dev-{n % 5}", "hardware_class": "cpu-x86", **extra}


REFUSAL = "I am sorry, I cannot help with that. Please ask someone else."


def export(path: Path, refuse: bool = False) -> Path:
    """Every fact asked three ways and rated 1, plus a bad answer, a duplicate and a contradiction. ``refuse``: a
    rater who approved a refusal to every question (feedback that would make the model worse)."""
    lines, n = [], 0
    for task, answer in FACTS.items():
        for ask in ASKS:
            n += 1
            lines.append(rating(n, ask.format(task), REFUSAL if refuse else answer))
    lines += [rating(90, "How do I reset the Zephyr thermostat?", "Unplug it.", -1, comment="wrong", tags=["wrong"]),
              rating(91, "How do I reset the Zephyr thermostat? ", FACTS["reset the Zephyr thermostat"]),
              rating(92, "Is the Zephyr waterproof?", "Yes."), rating(93, "Is the Zephyr waterproof?", "Yes.", -1)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# -- the dataset: fast, no model ---------------------------------------------------------------------------------
def test_a_dataset_keeps_each_conversation_once_and_says_where_every_example_came_from(tmp_path: Path) -> None:
    src = export(tmp_path / "feedback.jsonl")
    ds = dataset.build([src], tmp_path / "data")
    p = ds.provenance
    # 24 good answers; the re-rated one (trailing space) is a duplicate; the contradicting pair goes entirely
    assert p["counts"] == {"ratings": 28, "train": 24 - len(ds.heldout), "heldout": len(ds.heldout), "rejected": 1,
                           "duplicates": 1, "conflicting": 2}
    assert 1 <= len(ds.heldout) < 24 and len(ds.train) + len(ds.heldout) == 24
    ids = p["ids"]
    assert set(ids["train"]) | set(ids["heldout"]) == {rating(n, "", "")["id"] for n in range(1, 25)}
    assert ids["duplicates"] == [rating(91, "", "")["id"]] and len(ids["conflicting"]) == 2
    assert p["releases"] == {RELEASE: 26} and p["devices"] == 5 and p["hardware_classes"] == {"cpu-x86": 26}
    assert p["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    rejected = [json.loads(x) for x in (tmp_path / "data" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["messages"][-1]["content"], r["comment"]) for r in rejected] == [("Unplug it.", "wrong")]
    assert not any("Yes." == m["content"] for row in ds.train + ds.heldout for m in row["messages"])

    # loaded back, checked against its provenance; what a model's config keeps of it has ids and counts, no text
    again = dataset.load(tmp_path / "data")
    assert again.digest == ds.digest and again.train == ds.train
    kept = json.dumps(dataset.summary(again))
    assert "Zephyr" not in kept and ids["train"][0] in kept


def test_the_held_out_examples_stay_held_out_when_more_feedback_arrives(tmp_path: Path) -> None:
    first = dataset.build([export(tmp_path / "a.jsonl")], tmp_path / "one")
    more = tmp_path / "b.jsonl"
    more.write_text("".join(json.dumps(rating(200 + i, f"Question {i}?", f"Answer {i}.")) + "\n" for i in range(40)))
    second = dataset.build([tmp_path / "a.jsonl", more], tmp_path / "two")
    held = {r["id"] for r in second.heldout}
    assert {r["id"] for r in first.heldout} <= held and len(held) > len(first.heldout)
    assert not held & {r["id"] for r in second.train}


def test_a_dataset_changed_or_cut_short_after_it_was_built_is_refused(tmp_path: Path) -> None:
    dataset.build([export(tmp_path / "f.jsonl")], tmp_path / "data")
    train = tmp_path / "data" / "train.jsonl"
    train.write_text(train.read_text().replace("Zephyr", "Zephir", 1))
    with pytest.raises(InvalidInput, match="does not match its provenance.json"):
        dataset.load(tmp_path / "data")
    with pytest.raises(InvalidInput, match="is not a dataset; build one"):
        dataset.load(tmp_path)


def test_bad_feedback_files_are_one_line_errors_and_write_nothing(tmp_path: Path, cli_home: Path) -> None:
    good = export(tmp_path / "good.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().splitlines()[0] + "\n" + '{"messages": [], "rating": 3}\n')
    only_bad = tmp_path / "negative.jsonl"
    only_bad.write_text(json.dumps(rating(1, "q?", "a.", -1)) + "\n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cases = [
        ((str(bad), "-o", str(tmp_path / "out")), f"{bad} line 2 is not a feedback line"),
        ((str(only_bad), "-o", str(tmp_path / "out")), "0 answer(s) rated 1"),
        ((str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out")), "cannot read"),
        ((str(good), "-o", str(tmp_path / "out"), "--heldout", "1.5"), "between 0 and 1"),
        ((str(good), "-o", str(tmp_path / "busy")), "not a dataset; give an empty or new folder"),
        ((str(good), "-o", str(tmp_path / "out"), "--release", "other:1"), "no ratings of other:1"),
    ]
    for args, message in cases:
        r = run_cli("feedback", "dataset", *args, home=cli_home)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


def test_tune_refuses_what_it_cannot_do_in_one_line(tmp_path: Path, cli_home: Path) -> None:
    dataset.build([export(tmp_path / "f.jsonl")], tmp_path / "data")
    cases = [
        (("smollm2:135m", "--data", str(tmp_path / "data"), "--to", "smollm2:135m"), "give a name other than"),
        (("nope:1", "--data", str(tmp_path / "data"), "--to", "x:1"), 'model "nope:1" not found'),
        (("smollm2:135m", "--data", str(tmp_path), "--to", "x:1"), "is not a dataset"),
        (("smollm2:135m", "--data", str(tmp_path / "data"), "--to", "x:1", "--lr", "0"), "the rate and alpha above 0"),
    ]
    for args, message in cases:
        r = run_cli("tune", *args, "--no-report", home=cli_home)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not Store(cli_home / "models").exists(ModelName.parse("x:1"))


# -- the loop, end to end ---------------------------------------------------------------------------------------
def release_tuned(world: World, version: str, model: str, data: Path, max_ppl_increase: str = "10") -> dict:
    """`slmops release --model` of a tuned model, gated on the dataset's held-out answers against the base (a
    coarse text perplexity, with room for what tuning moves it), the golden prompt, and published to canary."""
    env = {**os.environ, **ALLOW, "SLMOPS_HOME": str(world.home), "SLMOPS_FLEET_KEY": world.key,
           "SLMOPS_FLEET_HOST": "", "SLMOPS_SIGNING_PASSWORD": ""}
    done = subprocess.run([str(BIN), "release", f"assistant:{version}", "--model", model, "--baseline",
                           "smollm2:135m", "--heldout", str(data), "--golden", str(world.work / "golden.jsonl"),
                           "--registry", f"{world.registry.host}/models", "--key", str(world.signing_key),
                           "--fleet", world.plane.url, "--no-rollout", "--insecure", "--ctx", "256", "--windows", "2",
                           "--max-ppl-increase", max_ppl_increase, "--json"], cwd=world.work, capture_output=True, text=True,
                          timeout=900, env=env)
    return {**summary_of(done), "_stderr": done.stderr, "_code": done.returncode}


@pytest.mark.slow
def test_rated_feedback_becomes_a_gated_canary_release_traced_to_the_feedback(world: World, tmp_path: Path) -> None:
    (world.work / "golden.jsonl").write_text(json.dumps(PASSES) + "\n")
    data = tmp_path / "data"
    made = run_cli("feedback", "dataset", str(export(tmp_path / "feedback.jsonl")), "-o", str(data), "--json",
                   home=world.home)
    assert made.returncode == 0, made.stderr
    provenance = json.loads(made.stdout)

    png = tmp_path / "tune.png"
    tuned = run_cli("tune", "smollm2:135m", "--data", str(data), "--to", "assistant:tuned", "--steps", "20",
                    "--lr", "1e-4", "--no-report", "--plot", str(png), "--json", home=world.home, timeout=900)
    assert tuned.returncode == 0, tuned.stderr
    out = json.loads(tuned.stdout)
    assert len(out["losses"]) == 20 and out["examples"] == provenance["counts"]["train"]
    assert sum(out["losses"][-5:]) < sum(out["losses"][:5])  # it learned something from the answers
    assert png.read_bytes()[:4] == b"\x89PNG"

    # the new model is the base's own layers plus one adapter; its config names the base and the feedback
    s = Store(world.home / "models")
    base, new = (s.manifest(ModelName.parse(n)) for n in ("smollm2:135m", "assistant:tuned"))
    adapters = [x for x in new.layers if x.media_type == "application/vnd.ollama.image.adapter"]
    assert len(adapters) == 1 and adapters[0].size == out["adapter_bytes"] < 20e6
    assert [x.digest for x in new.layers if x not in adapters] == [x.digest for x in base.layers]
    config = s.config(ModelName.parse("assistant:tuned"))
    assert config["tuned_from"]["model"] == "smollm2:135m"
    assert config["dataset"]["digest"] == provenance["digest"]
    assert config["dataset"]["ids"]["train"] == provenance["ids"]["train"] and config["tune"]["steps"] == 20
    shown = run_cli("show", "assistant:tuned", home=world.home).stdout
    assert "tuned from          smollm2:135m (sha256:" in shown and provenance["digest"] in shown

    # published through the release pipeline: gated on the held-out answers (better than the base's), the golden
    # prompt and the held-out text; signed, pushed and put on canary with notes that say what made it
    summary = release_tuned(world, "1.1.0", "assistant:tuned", data)
    assert summary["_code"] == 0, summary["_stderr"]
    assert statuses(summary) == {**dict.fromkeys(("check", "create", "gate", "sign", "push", "release", "channel"),
                                                 "done"), "quantize": "skipped", "rollout": "skipped"}
    gate = next(x for x in summary["steps"] if x["step"] == "gate")["data"]
    [row] = gate["models"]
    assert row["heldout"]["increase_percent"] < -10 and row["heldout"]["conversations"] == len(
        provenance["ids"]["heldout"])
    assert row["golden"]["passed"] == 1
    [variant] = summary["variants"]
    with world.fleet() as fleet:
        release = fleet.release("assistant", "1.1.0")
        assert fleet.channel("canary").release == "assistant:1.1.0"
        assert release.variants[0].signed and release.variants[0].manifest_digest == variant["digest"]
        assert provenance["digest"] in release.notes and "base smollm2:135m" in release.notes

    # what a device pulls carries the trace: the registry's manifest has the adapter, its config the feedback ids
    pushed = httpx.get(f"{world.registry.url}/v2/models/assistant/manifests/1.1.0", timeout=30,
                       headers={"Accept": DOCKER_MANIFEST})
    assert pushed.status_code == 200 and pushed.headers["docker-content-digest"] == variant["digest"]
    remote = pushed.json()
    assert adapters[0].digest in [x["digest"] for x in remote["layers"]]
    blob = httpx.get(f"{world.registry.url}/v2/models/assistant/blobs/{remote['config']['digest']}", timeout=30,
                     follow_redirects=True).json()
    assert blob["dataset"]["ids"]["heldout"] == provenance["ids"]["heldout"]


@pytest.mark.slow
def test_an_adapter_that_makes_the_held_out_answers_worse_is_refused_by_the_gate(world: World, tmp_path: Path) -> None:
    (world.work / "golden.jsonl").write_text(json.dumps(PASSES) + "\n")
    good, bad = tmp_path / "good", tmp_path / "bad"
    dataset.build([export(tmp_path / "good.jsonl")], good)
    dataset.build([export(tmp_path / "bad.jsonl", refuse=True)], bad)
    tuned = run_cli("tune", "smollm2:135m", "--data", str(bad), "--to", "assistant:refuses", "--steps", "12",
                    "--lr", "5e-4", "--no-report", home=world.home, timeout=900)
    assert tuned.returncode == 0, tuned.stderr
    with world.fleet() as fleet:
        channel_before = fleet.channel("canary").release if "canary" in {c.name for c in fleet.channels()} else None

    # the held-out text's limit is out of the way: the held-out answers alone must stop it
    summary = release_tuned(world, "9.0.0", "assistant:refuses", good, max_ppl_increase="1000")
    assert summary["_code"] == 1 and not summary["ok"] and summary["failed_step"] == "gate"
    error = summary["_stderr"].strip().splitlines()[-1]
    assert error.startswith("Error: release assistant:9.0.0 stopped at gate, nothing pushed: gate failed: ")
    assert "held-out answers' perplexity of" in error and "keep the baseline" in error
    row = next(x for x in summary["steps"] if x["step"] == "gate")["data"]["models"][0]
    assert row["heldout"]["increase_percent"] > 0
    assert statuses(summary)["push"] == "not run"
    assert httpx.get(f"{world.registry.url}/v2/models/assistant/manifests/9.0.0", timeout=30,
                     headers={"Accept": DOCKER_MANIFEST}).status_code == 404
    with world.fleet() as fleet:
        assert "9.0.0" not in {r.version for r in fleet.releases()}
        assert (fleet.channel("canary").release if channel_before else None) == channel_before


@pytest.mark.slow
def test_a_merged_tune_is_a_whole_model_of_the_base_type_with_no_adapter(tmp_path: Path, cli_home: Path) -> None:
    dataset.build([export(tmp_path / "f.jsonl")], tmp_path / "data")
    r = run_cli("tune", "smollm2:135m", "--data", str(tmp_path / "data"), "--to", "assistant:merged", "--steps", "2",
                "--merge", "--no-report", "--json", home=cli_home, timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["merged"] and out["adapter_bytes"] is None
    s = Store(cli_home / "models")
    base, merged = (ModelName.parse(n) for n in ("smollm2:135m", "assistant:merged"))
    layers = s.manifest(merged).layers
    assert not [x for x in layers if x.media_type == "application/vnd.ollama.image.adapter"]
    weights = [x.digest for x in layers if x.media_type == "application/vnd.ollama.image.model"]
    assert len(weights) == 1 and weights[0] != s.manifest(base).layer("application/vnd.ollama.image.model").digest
    assert s.inspect(merged).file_type == s.inspect(base).file_type  # quantized back to the base's type
    assert s.config(merged)["tune"]["merge"] is True and s.config(merged)["tuned_from"]["model"] == "smollm2:135m"
    answer = run_cli("run", "assistant:merged", "How do I reset the Zephyr thermostat?", home=cli_home)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
