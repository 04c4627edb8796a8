"""Runner processes: each loaded model runs in its own process, and a native crash there fails only that model's
requests. A real server, two models, real signals; and a runner started before its config, as `slmops serve`
starts its first."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import ollama
import openai
import psutil
import pytest

from conftest import Server, free_port, link_home

from slmops.engine import messages as msg
from slmops.engine import process, spawn
from slmops.engine.client import EngineConfig

M = "smollm2:135m"
VICTIM = "victim:latest"
# Greedy counting runs to the token limit: a generation certain to be running when the signal lands.
COUNTING = {"prompt": "1, 2, 3, 4, 5,", "raw": True,
            "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 100000, "num_ctx": 2048}}


@pytest.fixture(scope="module")
def srv(shared_home, tmp_path_factory):
    s = Server(link_home(shared_home, tmp_path_factory.mktemp("runners")), SLMOPS_NUM_PARALLEL="2")
    ollama.Client(host=s.url).copy(M, VICTIM)
    yield s
    s.stop()


def runners(srv) -> dict[str, int]:
    """Runner pids by model name, as /api/ps gives them; each is a child process of the server."""
    children = {c.pid for c in psutil.Process(srv.proc.pid).children()}
    out = {m["name"]: m["pid"] for m in httpx.get(srv.url + "/api/ps").json()["models"]}
    assert set(out.values()) <= children
    return out


def stream_until_first_piece(url: str, body: dict, started: threading.Event, result: dict) -> None:
    """Stream a generation; record every line, and signal once the first piece has arrived."""
    lines = []
    with httpx.stream("POST", url + "/api/generate", json=body, timeout=120) as r:
        result["status"] = r.status_code
        for line in r.iter_lines():
            lines.append(json.loads(line))
            started.set()
    result["lines"] = lines


def test_each_model_runs_in_its_own_process(srv):
    c = ollama.Client(host=srv.url)
    c.generate(model=M, prompt="hi", options={"num_predict": 2})
    c.generate(model=VICTIM, prompt="hi", options={"num_predict": 2})
    pids = runners(srv)
    assert set(pids) >= {M, VICTIM} and pids[M] != pids[VICTIM] != srv.proc.pid


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_killed_runner_fails_only_its_requests_and_restarts(srv, sig):
    for model in (M, VICTIM):  # both loaded, each in its runner
        ollama.Client(host=srv.url).generate(model=model, prompt="hi", options={"num_predict": 1})
    before = runners(srv)
    survivor, victim = {}, {}
    started = {M: threading.Event(), VICTIM: threading.Event()}
    bodies = {M: {"model": M, **COUNTING, "options": {**COUNTING["options"], "num_predict": 300}},
              VICTIM: {"model": VICTIM, **COUNTING}}
    threads = [threading.Thread(target=stream_until_first_piece, args=(srv.url, bodies[m], started[m], r))
               for m, r in ((M, survivor), (VICTIM, victim))]
    for t in threads:
        t.start()
    assert started[VICTIM].wait(60) and started[M].wait(60)
    counted = failures(srv, VICTIM)
    psutil.Process(before[VICTIM]).send_signal(sig)
    for t in threads:
        t.join(120)

    last = victim["lines"][-1]
    assert victim["status"] == 200 and len(victim["lines"]) >= 2  # it was streaming, then its runner died
    assert "error" in last and f'runner for model "{VICTIM}" stopped (killed by {sig.name}' in last["error"]
    assert "again" in last["error"]
    # SIGKILL is what the kernel's OOM killer sends: counted as out of memory (a fleet gates on it per class)
    kinds = {k: v - counted.get(k, 0) for k, v in failures(srv, VICTIM).items() if v != counted.get(k, 0)}
    assert kinds == ({"oom": 1} if sig == signal.SIGKILL else {"crash": 1})
    assert ("out of memory" in last["error"]) == (sig == signal.SIGKILL)
    # The other model's stream went on to its full length.
    end = survivor["lines"][-1]
    assert end["done"] and end["done_reason"] == "length" and end["eval_count"] == 300
    assert "".join(x.get("response", "") for x in survivor["lines"]).startswith(" 6, 7, 8")

    # The next request for the crashed model starts a fresh runner and succeeds.
    r = ollama.Client(host=srv.url).generate(model=VICTIM, prompt="Say hi", options={"num_predict": 5})
    assert r.done and r.eval_count >= 1
    after = runners(srv)
    assert after[VICTIM] != before[VICTIM] and after[M] == before[M]


def failures(srv, model: str) -> dict[str, float]:
    """``slmops_model_failures_total`` of ``model`` by kind, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(srv.url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "slmops_model_failures_total" and sample.labels.get("model") == model:
                out[sample.labels["kind"]] = out.get(sample.labels["kind"], 0) + sample.value
    return out


def test_non_streaming_request_gets_a_500_with_the_reason(srv):
    ollama.Client(host=srv.url).generate(model=VICTIM, prompt="hi", options={"num_predict": 1})
    runner = psutil.Process(runners(srv)[VICTIM])
    out: dict = {}

    def call() -> None:
        try:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).completions.create(
                model=VICTIM, prompt="1, 2, 3, 4, 5,", max_tokens=100000, temperature=0)
        except openai.APIStatusError as err:
            out["err"] = err

    t = threading.Thread(target=call)
    t.start()
    # Signal once the runner is decoding this request: it has used CPU time since the request was sent.
    base = sum(runner.cpu_times()[:2])
    while sum(runner.cpu_times()[:2]) - base < 0.5 and t.is_alive():
        time.sleep(0.05)
    runner.send_signal(signal.SIGSEGV)
    t.join(60)
    err = out["err"]
    assert err.status_code == 500 and "killed by SIGSEGV" in str(err)
    assert ollama.Client(host=srv.url).generate(model=VICTIM, prompt="hi", options={"num_predict": 2}).done


def test_ps_does_not_list_a_crashed_runner(srv):
    ollama.Client(host=srv.url).generate(model=VICTIM, prompt="hi", options={"num_predict": 1})
    assert VICTIM in {m.model for m in ollama.Client(host=srv.url).ps().models}
    runner = psutil.Process(runners(srv)[VICTIM])
    runner.send_signal(signal.SIGKILL)
    runner.wait(10)
    deadline = time.monotonic() + 10  # the server notices within moments; not a timing assertion
    while VICTIM in {m.model for m in ollama.Client(host=srv.url).ps().models} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert VICTIM not in {m.model for m in ollama.Client(host=srv.url).ps().models}


def test_integers_too_large_for_the_pipe_are_a_400(srv):
    r = httpx.post(srv.url + "/api/detokenize", json={"model": M, "tokens": [2 ** 70]}, timeout=60)
    assert r.status_code == 400 and "too large" in r.json()["error"]
    r = httpx.post(srv.url + "/api/generate", json={"model": M, "prompt": "hi", "context": [-(2 ** 70)]}, timeout=60)
    assert r.status_code == 400 and "too large" in r.json()["error"]


def test_a_runner_booted_ahead_of_its_config_takes_it_over_the_socket():
    spawn.boot()  # what `slmops serve` does first thing
    [(booted, _)] = spawn.booted
    runner = process.RunnerProcess(M, EngineConfig(num_thread=1))
    try:
        assert runner.proc.pid == booted.pid and spawn.booted == []  # taken over, not a second process
        assert runner.call(msg.Status, timeout=60).models == []  # its engine runs on the config sent after it started
    finally:
        runner.shutdown()
    assert runner.proc.returncode == 0
    spawn.boot()
    [(unused, _)] = spawn.booted
    spawn.discard_booted()  # models run in the server after all (SLMOPS_RUNNERS=thread)
    assert unused.returncode is not None and spawn.booted == []


# Run as `slmops serve`, recording what the server process had imported when it started the runner and sent it the
# load of SLMOPS_MODEL, and once the app is built; it stops where the app would start serving.
SERVE_RECORDED = """
import json, sys
from slmops import wiring
from slmops.engine import process, spawn

events = []
def imported():
    return {"fastapi": "fastapi" in sys.modules, "uvicorn": "uvicorn" in sys.modules,
            "commands": sorted(m for m in sys.modules if m.startswith("slmops.cli.") and m != "slmops.cli.main")}

class Recording(process.RunnerProcess):
    def __init__(self, name, config):
        booted = [proc.pid for proc, _ in spawn.booted]
        super().__init__(name, config)
        events.append({"runner": name, "booted_ahead": self.proc.pid in booted, **imported()})

    def send(self, make):
        events.append({"sent": type(make(0)).__name__, **imported()})
        super().send(make)

build = wiring.server
def server(*args, **kwargs):
    build(*args, **kwargs)
    events.append({"app_built": True, "numpy": "numpy" in sys.modules})
    print(json.dumps(events))
    sys.exit(0)

process.RunnerProcess, wiring.server = Recording, server
sys.argv = ["slmops", "serve"]
from slmops.cli.main import main
main()
"""


def test_serve_starts_the_models_runner_before_it_imports_the_web_stack(shared_home, tmp_path):
    env = {**os.environ, "SLMOPS_HOME": str(link_home(shared_home, tmp_path)), "SLMOPS_MODEL": M,
           "SLMOPS_HOST": f"127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-c", SERVE_RECORDED], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    started, load, built = json.loads(done.stdout)
    # the runner booted as the command started, took the served model, and began loading it before the server
    # imported FastAPI, uvicorn or any other command's module
    assert started == {"runner": M, "booted_ahead": True, "fastapi": False, "uvicorn": False,
                       "commands": ["slmops.cli.common", "slmops.cli.serve", "slmops.cli.serving"]}
    assert load == {"sent": "Load", "fastapi": False, "uvicorn": False, "commands": started["commands"]}
    # numpy (~70 ms) is the runner's; the server process builds its app without it, on the cold start's path
    assert built == {"app_built": True, "numpy": False}
