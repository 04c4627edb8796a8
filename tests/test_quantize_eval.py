"""Quantize with llama.cpp's quantizer and gate on eval, through the real CLI and the real default model."""

import json

import pytest

from conftest import HTTP, Server, link_home, run_cli
from slmops.store.store import Store
from slmops.types.name import ModelName

M = "smollm2:135m"
QUICK = ("--ctx", "256", "--windows", "3")  # ~770 tokens of the held-out text: enough to rank models


@pytest.fixture(scope="module")
def qhome(shared_home, tmp_path_factory):
    home = link_home(shared_home, tmp_path_factory.mktemp("quant"))
    before = Store(home / "models").record(ModelName.parse(M)).digest
    for qtype, name in (("q8_0", "small:q8"), ("q2_k", "small:q2")):
        r = run_cli("quantize", M, "--type", qtype, "-o", name, "--allow-requantize", home=home)
        assert r.returncode == 0, r.stderr
        assert f"wrote {name}: {qtype.upper()}" in r.stdout and "warning: requantizing Q4_1" in r.stderr
    assert Store(home / "models").record(ModelName.parse(M)).digest == before  # the source is untouched
    return home


def test_quantize_writes_a_loadable_model_of_the_type_asked(qhome):
    shown = run_cli("show", "small:q8", home=qhome)
    assert "quantization        Q8_0" in shown.stdout
    r = run_cli("run", "small:q8", "The capital of France is", home=qhome)
    assert r.returncode == 0 and r.stdout.strip()
    template = run_cli("show", "small:q8", "--template", home=qhome).stdout
    assert template == run_cli("show", M, "--template", home=qhome).stdout  # template and parameters kept


def test_quantize_refuses_what_it_should_in_one_line(qhome):
    cases = [
        (("quantize", M, "-t", "q4_0", "-o", "x:1"), "already quantized (Q4_1)"),
        (("quantize", M, "-t", "q9", "-o", "x:1", "--allow-requantize"), "unknown quantization type 'q9'"),
        (("quantize", M, "-t", "q4_0", "-o", M, "--allow-requantize"), "give a name other than"),
        (("quantize", "nope:1", "-t", "q4_0", "-o", "x:1"), 'model "nope:1" not found'),
    ]
    for args, message in cases:
        r = run_cli(*args, home=qhome)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not Store(qhome / "models").exists(ModelName.parse("x:1"))


def test_create_quantize_like_ollama(qhome, tmp_path):
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {M}\nSYSTEM Be brief.\n")
    refused = run_cli("create", "brief", "-f", str(modelfile), "-q", "q4_0", home=qhome)
    assert refused.returncode == 1 and "--allow-requantize" in refused.stderr
    assert not Store(qhome / "models").exists(ModelName.parse("brief"))  # nothing half-made
    ok = run_cli("create", "brief", "-f", str(modelfile), "-q", "q4_0", "--allow-requantize", home=qhome)
    assert ok.returncode == 0, ok.stderr
    assert "quantization        Q4_0" in run_cli("show", "brief", home=qhome).stdout
    server = Server(qhome)
    try:  # the API's quantize field: an already-quantized FROM is a 400 there (no flag to allow it)
        r = HTTP.post(server.url + "/api/create", json={"model": "viaapi", "from": M, "quantize": "q4_0",
                                                         "stream": False})
        assert r.status_code == 400 and "already quantized" in r.json()["error"]
    finally:
        server.stop()


def test_eval_ranks_a_damaged_model_worse_and_the_gate_exits_nonzero(qhome):
    r = run_cli("eval", "small:q2", "--baseline", M, "--max-ppl-increase", "5", "--json", *QUICK, home=qhome)
    assert r.returncode == 1 and "gate failed: perplexity of small:q2 is +" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    report = json.loads(r.stdout)  # the reports come before the verdict
    base, q2 = report["baseline"], report["model"]
    assert 5 < base["perplexity"] < 60 and base["tokens"] == 3 * 127  # finite, sane for a 135M model
    assert base["golden_passed"] == base["golden_total"] >= 7
    assert q2["perplexity"] > base["perplexity"] * 1.2  # Q2_K lost quality, and eval sees it
    assert report["perplexity_increase_percent"] == pytest.approx(100 * (q2["perplexity"] / base["perplexity"] - 1))
    loose = run_cli("eval", "small:q8", "--baseline", M, "--max-ppl-increase", "1000", "--no-golden", *QUICK,
                    home=qhome)
    assert loose.returncode == 0 and "perplexity change:" in loose.stdout and "0/0" in loose.stdout
    no_base = run_cli("eval", "small:q8", "--max-ppl-increase", "5", home=qhome)
    assert no_base.returncode == 1 and "add --baseline" in no_base.stderr


def test_bench_measures_models_alternately_with_json_and_a_chart(qhome, tmp_path):
    chart = tmp_path / "bench.png"
    r = run_cli("bench", M, "small:q8", "--runs", "1", "--tokens", "16", "--prompt-tokens", "64", "--parallel", "2",
                "--json", "--plot", str(chart), home=qhome)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [x["model"] for x in results] == [M, "small:q8"] and [x["file_type"] for x in results] == ["Q4_1", "Q8_0"]
    for x in results:
        for key in ("load_s", "prompt_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_parallel",
                    "ttft_ms"):
            assert 0 < x[key] < float("inf"), key
        assert 50e6 < x["peak_rss_bytes"] < 4e9 and x["parallel"] == 2 and x["runs"] == 1
    assert "run 1/1: small:q8" in r.stderr
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run_cli("bench", "small:q8", M, "--runs", "1", "--tokens", "8", "--prompt-tokens", "32",
                    "--parallel", "1", home=qhome)
    assert table.returncode == 0 and "PROMPT tok/s" in table.stdout and f"{M} / small:q8" in table.stdout
    missing = run_cli("bench", "nope:1", home=qhome)
    assert missing.returncode == 1 and 'model "nope:1" not found' in missing.stderr


def test_optimize_keeps_the_fastest_lossless_layout_and_proves_it(qhome):
    r = run_cli("optimize", M, "--type", "q8_0", "--type", "q2_k", "--runs", "1", "--json", home=qhome)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    by_name = {c["name"]: c for c in out["candidates"]}
    assert set(by_name) == {f"{M}-q8_0"}  # q2_k has fewer bits than Q4_1: not a lossless candidate
    q8 = by_name[f"{M}-q8_0"]
    assert q8["lossless"] and abs(q8["ppl_increase"]) < 1.0 and q8["golden"] == out["source"]["golden"]
    s = Store(qhome / "models")
    if out["winner"]:  # speed decides, and speed is measured, so either outcome is legitimate on a noisy machine
        assert out["winner"] == f"{M}-q8_0" and s.exists(ModelName.parse(f"{M}-q8_0"))
        assert "as fast as" in out["why"]
        s.remove(ModelName.parse(f"{M}-q8_0"))
    else:
        assert not s.exists(ModelName.parse(f"{M}-q8_0")) and "nothing written" in out["why"]
    lossy = run_cli("optimize", M, "--type", "q2_k", home=qhome)
    assert lossy.returncode == 1 and "--allow-lossy" in lossy.stderr
