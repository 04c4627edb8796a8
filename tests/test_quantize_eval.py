"""Quantize with llama.cpp's quantizer and gate on eval, through the real CLI and the real default model."""

import json

import pytest
from conftest import HTTP, Server, link_home, run_cli
from test_encryption import KEY, files_holding, plaintext_markers

from slmops.ops.evaluate import EvalReport, gate
from slmops.ops.quantize import check
from slmops.store.store import Store
from slmops.types.errors import InvalidInput
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
        assert r.status_code == 400 and "already quantized (Q4_1)" in r.json()["error"]
    finally:
        server.stop()


def test_eval_ranks_a_damaged_model_worse_and_the_gate_exits_nonzero(qhome):
    r = run_cli("eval", "small:q2", "--baseline", M, "--max-ppl-increase", "5", "--json", *QUICK, home=qhome)
    assert r.returncode == 1 and "gate failed: perplexity of small:q2 is +" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    report = json.loads(r.stdout)  # the reports come before the verdict
    assert set(report) == {"model", "baseline", "perplexity_increase_percent"}
    assert set(report["model"]) == {"model", "perplexity", "tokens", "windows", "n_ctx", "golden_passed",
                                    "golden_total", "failures", "seconds"}
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


def test_a_sealed_store_gets_a_sealed_quantized_model_and_no_plaintext_on_disk(shared_home, tmp_path):
    home = link_home(shared_home, tmp_path / "sealed")
    assert run_cli("store", "seal", home=home, SLMOPS_STORE_KEY=KEY).returncode == 0
    r = run_cli("quantize", M, "-t", "q4_0", "-o", "sealed:q4", "--allow-requantize", home=home, SLMOPS_STORE_KEY=KEY)
    assert r.returncode == 0 and "wrote sealed:q4: Q4_0" in r.stdout, r.stderr
    blobs = list((home / "models" / "blobs").iterdir())
    assert all(b.read_bytes()[:8] == b"SLMSEAL1" for b in blobs)  # the output went in sealed
    assert files_holding(home, plaintext_markers(shared_home)) == []  # and no plaintext temp was left behind


def test_requantize_policy_without_a_model():
    assert check("F16", "q4_k_m", False) is None and check("ALL_F32", "q8_0", False) is None  # the normal path
    with pytest.raises(InvalidInput, match="--allow-requantize"):
        check("Q8_0", "q4_0", False)
    assert "only rounding is lost" in check("Q4_1", "q8_0", True)
    assert "compounds rounding errors" in check("Q4_1", "q2_k", True)


def test_gate_passes_within_the_limit_and_fails_above_it():
    def report(ppl: float, name: str) -> EvalReport:
        return EvalReport(name, ppl, 100, 1, 256, 9, 9, [], 1.0)
    base = report(20.0, "base")
    assert gate(report(20.9, "cand"), base, 5) is None and gate(report(19.0, "cand"), base, 0) is None
    verdict = gate(report(21.2, "cand"), base, 5)
    assert verdict == "gate failed: perplexity of cand is +6.0% over base (limit +5.0%); keep the baseline"


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
