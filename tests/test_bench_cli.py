"""``slmops bench`` through the real CLI and the real default model: JSON, table, chart, one-line refusals.

No timing thresholds: the machine is noisy. What is asserted is that every number is measured (positive, finite),
that medians are medians of the runs, and that models alternate.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

from conftest import run_cli

M = "smollm2:135m"
QUICK = ("--tokens", "16", "--prompt-tokens", "64", "--parallel", "2")
MEASURED = ("load_s", "prompt_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_parallel", "ttft_ms",
            "peak_rss_bytes", "size_bytes")


def test_json_holds_medians_of_runs_each_in_a_fresh_runner(cli_home):
    r = run_cli("bench", M, "--runs", "2", *QUICK, "--json", home=cli_home)
    assert r.returncode == 0, r.stderr
    [x] = json.loads(r.stdout)
    assert (x["model"], x["runs"], x["parallel"], x["file_type"]) == (M, 2, 2, "Q4_1")
    for key in MEASURED:
        assert 0 < x[key] and math.isfinite(x[key]), key
    assert 50e6 < x["peak_rss_bytes"] < 4e9  # the runner's own peak, not this CLI's
    raw = x["raw"]
    assert all(len(v) == 2 for v in raw.values())
    for key in ("prompt_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_parallel", "ttft_ms"):
        assert x[key] == statistics.median(raw[key]), key
    # load is the model load in the runner; the cold start adds the runner process starting
    assert all(0 < load < cold for load, cold in zip(raw["load_s"], raw["cold_start_s"]))
    assert r.stderr.index("run 1/2: smollm2:135m") < r.stderr.index("run 2/2: smollm2:135m")


def test_two_models_alternate_with_a_chart_and_a_ratio_row(cli_home, tmp_path):
    assert run_cli("cp", M, "other:1", home=cli_home).returncode == 0
    chart = tmp_path / "charts" / "bench.png"
    r = run_cli("bench", M, "other:1", "--runs", "1", *QUICK, "--json", "--plot", str(chart), home=cli_home)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [x["model"] for x in results] == [M, "other:1"]
    assert all(0 < x["decode_tokens_per_s"] < math.inf for x in results)
    assert r.stderr.index(f"run 1/1: {M}") < r.stderr.index("run 1/1: other:1")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in chart.parent.iterdir() if p != chart]  # no temp file left beside it
    table = run_cli("bench", "other:1", M, "--runs", "1", "--tokens", "4", "--prompt-tokens", "32",
                    "--parallel", "1", home=cli_home)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "PROMPT tok/s" in lines[0] and "PEAK RSS" in lines[0]
    assert lines[1].startswith("other:1") and lines[2].startswith(M)
    assert f"{M} / other:1" in lines[3]  # each model against the first


def one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "run 1/" not in r.stderr  # refused before measuring


def test_refusals_come_before_any_work_in_one_line(cli_home):
    one_line_error(run_cli("bench", M, "nope:1", home=cli_home), 'model "nope:1" not found')
    one_line_error(run_cli("bench", M, "--tokens", "1", home=cli_home), "--tokens 2 or more")
    # an install without the bench extra: matplotlib cannot be imported
    code = ("import sys; sys.modules['matplotlib'] = None; from slmops.cli.main import main; "
            f"sys.argv = ['slmops', 'bench', '{M}', '--plot', 'x.png']; main()")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SLMOPS_HOME": str(cli_home)})
    one_line_error(r, "pip install 'slmops[bench]'")
