"""Structured pruning through the real CLI and the real default model: blocks measured, dropped, the result
loads and answers, and what it cost is reported."""

import json

import pytest
from conftest import link_home, run_cli

from slmops.ops.shrink import Importance
from slmops.store.gguf_scan import scan_gguf
from slmops.store.store import Store
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

M = "smollm2:135m"


def test_the_least_important_blocks_are_chosen_in_block_order():
    imp = Importance([0.5, 0.1, 0.3, 0.05, 0.2], tokens=100)
    assert imp.lowest(2) == [1, 3]
    assert imp.lowest(4) == [1, 2, 3, 4]
    for n in (0, 5):
        with pytest.raises(InvalidInput, match="drop between 1 and 4"):
            imp.lowest(n)


@pytest.fixture(scope="module")
def shome(shared_home, tmp_path_factory):
    return link_home(shared_home, tmp_path_factory.mktemp("shrink"))


def _blocks(home, name):
    s = Store(home / "models")
    layer = s.manifest(ModelName.parse(name)).layer("application/vnd.ollama.image.model")
    with s.blobs.plain(layer.blob, name) as path:
        return scan_gguf(path).metadata["llama.block_count"]


@pytest.mark.slow
def test_named_blocks_are_dropped_and_the_model_still_answers(shome):
    r = run_cli("shrink", M, "--to", "small:28", "--blocks", "12,14", "--no-report", "--json", home=shome)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dropped"] == [12, 14] and out["blocks"] == 30
    assert out["size_bytes"][1] < out["size_bytes"][0]
    assert _blocks(shome, "small:28") == 28 and _blocks(shome, M) == 30  # the source is untouched
    answer = run_cli("run", "small:28", "What is the capital of France?", home=shome)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    template = run_cli("show", "small:28", "--template", home=shome).stdout
    assert template == run_cli("show", M, "--template", home=shome).stdout


@pytest.mark.slow
def test_measured_blocks_are_the_least_important_and_the_cost_is_reported(shome):
    r = run_cli("shrink", M, "--to", "small:27", "--drop", "3", "--tokens", "128", "--runs", "1", "--json", home=shome, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    dist = out["angular_distance"]
    assert len(dist) == 30 and out["calibration_tokens"] == 128
    assert out["dropped"] == sorted(sorted(range(30), key=dist.__getitem__)[:3])
    assert max(dist[i] for i in out["dropped"]) <= min(d for i, d in enumerate(dist) if i not in out["dropped"])
    source, shrunk = out["report"]
    assert source["model"] == M and shrunk["model"] == "small:27"
    assert shrunk["size_bytes"] < source["size_bytes"]
    # dropping blocks costs perplexity on the held-out text; the report says how much, it never hides it
    assert shrunk["perplexity"] > source["perplexity"] > 1


def test_bad_requests_are_one_line_and_write_nothing(cli_home):
    cases = [
        (("shrink", M, "--to", M, "--drop", "2"), "give a name other than"),
        (("shrink", M, "--to", "x:1"), "--drop N (measured) or --blocks"),
        (("shrink", M, "--to", "x:1", "--drop", "2", "--blocks", "3"), "not both"),
        (("shrink", M, "--to", "x:1", "--blocks", "30"), "blocks 0..29"),
        (("shrink", M, "--to", "x:1", "--blocks", "a,b"), "block numbers separated by commas"),
        (("shrink", "nope:1", "--to", "x:1", "--drop", "2"), 'model "nope:1" not found'),
    ]
    for args, message in cases:
        r = run_cli(*args, "--no-report", home=cli_home)
        assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not Store(cli_home / "models").exists(ModelName.parse("x:1"))


@pytest.mark.slow
def test_distillation_heals_a_pruned_model_on_held_out_text(shome, tmp_path):
    cut = run_cli("shrink", M, "--to", "small:cut", "--blocks", "11,13,15", "--no-report", home=shome)
    assert cut.returncode == 0, cut.stderr
    png = tmp_path / "distill.png"
    r = run_cli("distill", "small:cut", "--teacher", M, "--to", "small:healed", "--steps", "10", "--seq-len", "128",
                "--lr", "1e-4", "--no-report", "--plot", str(png), "--json", home=shome, timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["losses"]) == 10 and all(x > 0 for x in out["losses"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert _blocks(shome, "small:healed") == 27  # as small as the student: same blocks, same type
    s = Store(shome / "models")
    assert s.inspect(ModelName.parse("small:healed")).file_type == s.inspect(ModelName.parse("small:cut")).file_type
    config = s.config(ModelName.parse("small:healed"))
    assert config["distilled_from"] == M and config["student"] == "small:cut" and config["distill"]["steps"] == 10
    ev = run_cli("eval", "small:healed", "--baseline", "small:cut", "--ctx", "256", "--windows", "4", "--no-golden",
                 "--json", home=shome)
    assert ev.returncode == 0, ev.stderr
    # the claim distillation makes: the healed model predicts text it never trained on better than the cut one
    assert json.loads(ev.stdout)["perplexity_increase_percent"] < 0
    # a pruned model healed for 10 steps may never end its turn (a minute of text here): bounded in a Modelfile,
    # as a user would bound it
    (tmp_path / "Modelfile").write_text("FROM small:healed\nPARAMETER num_predict 32\n")
    assert run_cli("create", "small:brief", "-f", str(tmp_path / "Modelfile"), home=shome).returncode == 0
    answer = run_cli("run", "small:brief", "What is the capital of France?", home=shome)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr


def test_distill_refuses_what_it_cannot_do_in_one_line(cli_home):
    cases = [
        (("distill", M, "--teacher", M, "--to", M), "give a name other than"),
        (("distill", "nope:1", "--teacher", M, "--to", "x:1"), 'model "nope:1" not found'),
        (("distill", M, "--teacher", "nope:2", "--to", "x:1"), 'model "nope:2" not found'),
        (("distill", M, "--teacher", M, "--to", "x:1", "--lr", "0"), "the rate above 0"),
    ]
    for args, message in cases:
        r = run_cli(*args, "--no-report", home=cli_home)
        assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not Store(cli_home / "models").exists(ModelName.parse("x:1"))
