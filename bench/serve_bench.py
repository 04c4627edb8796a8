"""Serving benchmark: `slmops serve` against llama.cpp's `llama-server` (and `llama_cpp.server` for S1/S2),
same GGUF, same threads, all on loopback, scenarios run against each server in turn. Prints ratios (ours/peer),
writes JSON and a PNG chart.

    python bench/serve_bench.py --rounds 3                    # needs: bash bench/build_peer.sh, matplotlib
    python bench/serve_bench.py --scenarios none --rounds 5   # S4 and S5 only: a minute or two, not ten

S1 one client, sequential requests: tokens/s      S2 8 concurrent counting clients: aggregate tokens/s, p95 gap
S3 8 clients sharing two ~1k-token system prompts, 3 turns each: mean time to first token
S4 cold start (process start to first token)      S5 peak RSS of the server process tree
S6 four streams decoding while a ~2k-token prompt arrives: their p95 and largest inter-token gap

S4 starts each server told its model at start, as llama-server is (``-m``): slmops with ``SLMOPS_MODEL``. slmops's
cold start with the model named only by the first request (no ``SLMOPS_MODEL``: the runner loads it when that
request arrives) is measured too, in the same rounds, as its own row (``S4_cold_start_model_by_request_s``, its ratio
against llama-server's only way to start). slmops's bytecode is compiled first, as an installed wheel has it.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
N_TOKENS = 96
# llama-server closes idle connections after 5 s; a new connection per request keeps both peers on equal terms
NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)
PROMPTS = [f"Write a story about a {w} who learns to sail." for w in
           ("fox", "robot", "baker", "whale", "child", "painter", "pilot", "gardener")]
# S6's streams must still run when the long prompt arrives: counting goes on to max_tokens, where a story may end
# early (and where it ends can change with a prefix-cache hit), leaving no stream to measure.
# Greedy, with the repeat penalty slmops's /v1 applies as Ollama's does (1.1 over the last 64 tokens; OpenAI's API
# has no field for it, and slmops ignores one). llama-server's default is 1.0: told 1.1, it writes the same texts,
# so both servers generate the same tokens and do the same work (without it, answers differ in length).
GREEDY = {"temperature": 0, "repeat_penalty": 1.1}


def counting(*starts: int) -> list[str]:
    return [", ".join(str(i) for i in range(k, k + 8)) + "," for k in starts]


COUNTING = counting(1, 101, 1001, 5001)
# S2's eight clients count too, so both servers generate max_tokens for every client and do the same work: with
# stories, greedy decoding of a 135M model turns on how eight sequences' attention is computed (one cache shared by
# all sequences in slmops, a stream per slot in llama-server), and the answers ended at different lengths. Counting
# from 1 turns into code and ends after ~40 tokens, so it is not among them.
S2_PROMPTS = counting(101, 1001, 5001, 20, 340, 7000, 90001, 2500)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peer:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, model: str):
        self.name, self.cmd, self.env, self.port, self.model = name, cmd, env, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0

    def start(self, env: dict[str, str] | None = None) -> float:
        """Start (``env`` over the peer's own), then time until the first generated token arrives (S4)."""
        t0 = time.perf_counter()
        log = (HERE / "out" / f"{self.name}.log")
        log.parent.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env, **(env or {})}, stdout=log.open("w"),
                                     stderr=subprocess.STDOUT)
        while True:
            try:
                r = httpx.post(self.url + "/v1/completions", json={"model": self.model, "prompt": "Hello",
                                                                    "max_tokens": 1}, timeout=5)
                if r.status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start")
            time.sleep(0.05)

    def sample_rss(self) -> None:
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
            self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def stream_completion(client: httpx.AsyncClient, peer: Peer, body: dict, chat: bool) -> dict:
    """One streamed request: time to first token, inter-token gaps, tokens received."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", peer.url + path, json={**body, "model": peer.model, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line[6:])
                choice = (data.get("choices") or [{}])[0]
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"ttft": (times[0] - t0) if times else None, "gaps": gaps, "tokens": len(times),
            "elapsed": time.perf_counter() - t0, "times": times}


async def s1(peer: Peer) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=NO_KEEPALIVE) as c:
        t0, toks = time.perf_counter(), 0
        for p in PROMPTS[:4]:
            r = await c.post(peer.url + "/v1/completions", json={"model": peer.model, "prompt": p,
                                                                  "max_tokens": N_TOKENS, **GREEDY})
            toks += r.json()["usage"]["completion_tokens"]
        return {"tokens_per_s": toks / (time.perf_counter() - t0), "tokens": toks}


async def s2(peer: Peer) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=NO_KEEPALIVE) as c:
        t0 = time.perf_counter()
        body = {"max_tokens": N_TOKENS, **GREEDY}
        runs = await asyncio.gather(*[stream_completion(c, peer, {**body, "prompt": p}, False) for p in S2_PROMPTS])
        elapsed = time.perf_counter() - t0
        peer.sample_rss()
        gaps = sorted(g for r in runs for g in r["gaps"])
        return {"tokens_per_s": sum(r["tokens"] for r in runs) / elapsed, "tokens": sum(r["tokens"] for r in runs),
                "p95_inter_token_s": gaps[int(0.95 * (len(gaps) - 1))] if gaps else None}


async def s3(peer: Peer) -> dict:
    systems = [("You are a careful assistant for a shipping company. " * 70),
               ("You are a helpful tutor who explains mathematics step by step. " * 60)]
    async with httpx.AsyncClient(timeout=600, limits=NO_KEEPALIVE) as c:
        async def client(i: int) -> list[float]:
            history = [{"role": "system", "content": systems[i % 2]}]
            ttfts = []
            for turn in range(3):
                history.append({"role": "user", "content": f"Question {turn} from client {i}: what should I do?"})
                r = await stream_completion(c, peer, {"messages": history, "max_tokens": 24, **GREEDY}, True)
                ttfts.append(r["ttft"])
                history.append({"role": "assistant", "content": "Noted."})
            return ttfts
        all_ttfts = await asyncio.gather(*[client(i) for i in range(8)])
        peer.sample_rss()
        return {"mean_ttft_s": statistics.mean(t for ts in all_ttfts for t in ts if t is not None)}


async def s6(peer: Peer) -> dict:
    """Four streams decode; a ~2k-token prompt arrives. Inter-token gaps of the streams while it is prefilled."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 200
    async with httpx.AsyncClient(timeout=600, limits=NO_KEEPALIVE) as c:
        body = {"max_tokens": 400, **GREEDY}
        streams = [asyncio.create_task(stream_completion(c, peer, {**body, "prompt": p}, False))
                   for p in COUNTING]
        await asyncio.sleep(1.5)
        t_send = time.perf_counter()
        arrival = await stream_completion(c, peer, {"prompt": long_prompt, "max_tokens": 1, **GREEDY}, False)
        t_end = arrival["times"][0] if arrival["times"] else time.perf_counter()
        runs = await asyncio.gather(*streams)
    gaps = sorted(b - a for r in runs for a, b in zip(r["times"], r["times"][1:]) if t_send <= b <= t_end + 0.2)
    return {"p95_inter_token_s": gaps[int(0.95 * (len(gaps) - 1))] if gaps else None,
            "max_inter_token_s": gaps[-1] if gaps else None, "prefill_2k_s": t_end - t_send}


SCENARIOS = {"S1": s1, "S2": s2, "S3": s3, "S6": s6}
MODEL = "smollm2:135m"
# S4's second row: slmops started without SLMOPS_MODEL, its model named only by the first request
BY_REQUEST = "S4_cold_start_model_by_request_s"


def slmops_peer(name: str, home: str, threads: int, parallel: int, runners: str) -> Peer:
    """``slmops serve`` told its model at start (``SLMOPS_MODEL``), as llama-server is told with ``-m``."""
    port = free_port()
    return Peer(name, [str(Path(sys.executable).parent / "slmops"), "serve"],
                {"SLMOPS_HOME": home, "SLMOPS_HOST": f"127.0.0.1:{port}", "SLMOPS_NUM_PARALLEL": str(parallel),
                 "SLMOPS_NUM_THREADS": str(threads), "SLMOPS_RUNNERS": runners, "SLMOPS_MODEL": MODEL}, port, MODEL)


def peers(model_path: str, threads: int, parallel: int, home: str, with_python: bool) -> list[Peer]:
    llama_server = subprocess.run(["bash", str(HERE / "build_peer.sh")], capture_output=True, text=True,
                                  check=True).stdout.strip()
    p2, p3 = free_port(), free_port()
    out = [
        slmops_peer("slmops", home, threads, parallel, "process"),
        Peer("llama-server", [str(HERE / llama_server), "-m", model_path, "-t", str(threads), "-np", str(parallel),
                              "-c", str(4096 * parallel), "--threads-http", str(4 * parallel), "--port", str(p2),
                              "--host", "127.0.0.1"], {}, p2, "m"),
    ]
    if with_python:
        out.append(Peer("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", model_path,
                                             "--n_threads", str(threads), "--port", str(p3), "--n_ctx", "4096",
                                             "--interrupt_requests", "False"],
                        {}, p3, "m"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 2)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--scenarios", default="S1,S2,S3,S6", help="comma-separated; none: S4 and S5 only")
    ap.add_argument("--python-server", action="store_true", help="also run llama_cpp.server for S1/S2")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--report-only", action="store_true", help="redraw the table and chart from the last JSON")
    ap.add_argument("--runners", action="store_true",
                    help="the cost of runner processes: slmops with SLMOPS_RUNNERS=process against =thread")
    args = ap.parse_args()
    if args.report_only:
        return report(json.loads((Path(args.out) / "serve_bench.json").read_text()), Path(args.out))
    sys.path.insert(0, str(ROOT))
    import slmops
    # slmops's bytecode, as an installed wheel has it: a source tree run without it (PYTHONDONTWRITEBYTECODE set)
    # compiles every module again at each start, in the server and in each runner, which S4 would count
    compileall.compile_dir(Path(slmops.__file__).parent, quiet=1)
    home = os.environ.get("SLMOPS_HOME", str(Path.home() / ".slmops"))
    store = slmops.open_store(home)
    name = slmops.ModelName.parse(MODEL)
    if not store.exists(name):
        store.pull(name)
    model_path = str(store.model_path(name))
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(False),
                                 "threads": args.threads, "parallel": args.parallel}, "runs": {}}
    if args.runners:
        all_peers = [slmops_peer("slmops", home, args.threads, args.parallel, "process"),
                     slmops_peer("slmops-thread", home, args.threads, args.parallel, "thread")]
        args.out = str(Path(args.out) / "runners")
    else:
        all_peers = peers(model_path, args.threads, args.parallel, home, args.python_server)
    wanted = [] if args.scenarios.lower() == "none" else args.scenarios.split(",")
    for rnd in range(args.rounds):  # peers alternate within each round, so drift hits both alike
        for peer in all_peers:
            r = results["runs"].setdefault(peer.name, {})
            if "SLMOPS_MODEL" in peer.env:  # slmops: first the cold start with the model named by the request
                try:
                    r.setdefault(BY_REQUEST, []).append(peer.start({"SLMOPS_MODEL": ""}))
                finally:
                    peer.stop()
            cold = peer.start()
            r.setdefault("S4_cold_start_s", []).append(cold)
            try:
                peer.sample_rss()
                for sc in wanted:
                    if peer.name == "llama_cpp.server" and sc in ("S3", "S6"):
                        continue
                    out = asyncio.run(SCENARIOS[sc](peer))
                    for k, v in out.items():
                        r.setdefault(f"{sc}_{k}", []).append(v)
                r.setdefault("S5_peak_rss_mb", []).append(peer.peak_rss / 1e6)
            finally:
                peer.stop()
            print(f"round {rnd + 1} {peer.name}: done", flush=True)
    report(results, Path(args.out))


def report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    med = {p: {k: statistics.median(v) for k, v in r.items() if all(x is not None for x in v)}
           for p, r in results["runs"].items()}
    results["medians"] = med
    ours = med["slmops"]
    base = "llama-server" if "llama-server" in med else next(p for p in med if p != "slmops")
    lines = [f"| metric | slmops | {' | '.join(p for p in med if p != 'slmops')} | ratio vs {base} |",
             "|---|---|" + "---|" * (len(med) - 1) + "---|"]
    for key in ours:
        peer_vals = [med[p].get(key) for p in med if p != "slmops"]
        ls = med.get(base, {}).get(key, med.get(base, {}).get("S4_cold_start_s") if key == BY_REQUEST else None)
        ratio = f"{ours[key] / ls:.2f}" if ls else ""
        lines.append(f"| {key} | {ours[key]:.3f} | " + " | ".join(f"{v:.3f}" if v is not None else "-"
                                                              for v in peer_vals) + f" | {ratio} |")
    table = "\n".join(lines)
    print(table)
    (out / "serve_bench.json").write_text(json.dumps(results, indent=2))
    (out / "serve_bench.md").write_text(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        base_key = {BY_REQUEST: "S4_cold_start_s"}
        keys = [k for k in ours if med.get(base, {}).get(base_key.get(k, k))]
        ratios = [ours[k] / med[base][base_key.get(k, k)] for k in keys]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        better = [(r >= 1) if k.endswith("tokens_per_s") else (r <= 1) for k, r in zip(keys, ratios)]
        ax.barh(keys, ratios, color=["#3a7" if b else "#c54" for b in better])
        ax.axvline(1.0, color="black", lw=1)
        ax.set_xlabel(f"slmops / {base} (green: slmops better; tokens/s higher is better, the rest lower)")
        fig.tight_layout()
        fig.savefig(out / "serve_bench.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)


if __name__ == "__main__":
    main()
