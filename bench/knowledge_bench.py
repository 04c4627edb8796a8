"""Knowledge files: retrieval quality (recall@k) on a shipped document, and what retrieval costs per request.

The document is ``bench/knowledge/vantor-k7-handbook.md`` (a made-up greenhouse controller, so the model cannot
know it); ``bench/knowledge/questions.json`` holds questions worded unlike the text, each with a phrase of the
chunk that answers it. For each embedding model a knowledge model is built with the real ``slmops create``
(FROM smollm2:135m, FILE the handbook, EMBEDDING the model), then:

- **recall@k**: the share of questions for which one of the k chunks retrieval returns holds the answer's phrase
  (the server's own code: the stored index and :meth:`KnowledgeIndex.search`, queries embedded by the engine).
- **cost** (first embedding model only): a real ``slmops serve``; each question is asked as a chat of the
  knowledge model and of smollm2:135m alone, alternating, ``num_predict`` 1 and temperature 0, so the difference
  is what retrieval adds before the first token: embedding the question, the search, and the prefill of the
  chunks. Reported as medians: extra prompt tokens, extra wall time per request, and the embedding's share
  (an ``/api/embed`` of the question on the embedding model, timed alone).

    python bench/knowledge_bench.py [--home DIR] [--embedding all-minilm:l6-v2 smollm2:135m] [--json out.json]

``--home`` (default ``SLMOPS_HOME``) needs smollm2:135m, and all-minilm:l6-v2 for that embedding model (pulled
from the catalog when missing); knowledge models named ``k7-bench-*`` are created in it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
DOC = HERE / "knowledge" / "vantor-k7-handbook.md"
QUESTIONS = HERE / "knowledge" / "questions.json"
BIN = Path(sys.executable).parent / "slmops"
BASE = "smollm2:135m"


def questions() -> list[dict]:
    return json.loads(QUESTIONS.read_text())["questions"]


def create(home: Path, name: str, embedding: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mf = Path(tmp) / "Modelfile"
        mf.write_text(f"FROM {BASE}\nEMBEDDING {embedding}\nFILE {DOC}\n")
        subprocess.run([str(BIN), "create", name, "-f", str(mf)], check=True, capture_output=True,
                       env={**os.environ, "SLMOPS_HOME": str(home)})


def recall(home: Path, name: str, ks: tuple[int, ...] = (1, 3)) -> dict:
    """recall@k for each k, with the index and search the server uses, queries embedded in this process."""
    from slmops.engine.client import spec_from_store
    from slmops.engine.engine import Engine
    from slmops.store import knowledge
    from slmops.store.store import Store
    from slmops.types.name import ModelName

    store = Store(home / "models")
    index = knowledge.read_index(store, store.manifest(ModelName.parse(name)), name)
    spec = spec_from_store(store, ModelName.parse(index.embedding.model))
    engine = Engine()
    try:
        qs = questions()
        vectors, _, _ = engine.embed(spec, [q["question"] for q in qs])
    finally:
        engine.close()
    hits = {k: 0 for k in ks}
    misses = []
    for q, v in zip(qs, vectors):
        found = [index.chunks[i].text for i, _ in index.search(v, max(ks))]
        for k in ks:
            hits[k] += any(q["answer"] in t for t in found[:k])
        if not any(q["answer"] in t for t in found[:3]):
            misses.append(q["question"])
    return {"chunks": len(index.chunks), "questions": len(qs),
            **{f"recall@{k}": round(hits[k] / len(qs), 3) for k in ks}, "missed@3": misses}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cost(home: Path, name: str, embedding: str, rounds: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(home / "knowledge-bench-server.log", "w")
    server = subprocess.Popen([str(BIN), "serve"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_HOST": f"127.0.0.1:{port}"})
    http = httpx.Client(timeout=300)
    try:
        for _ in range(600):
            try:
                http.get(url + "/health")
                break
            except httpx.HTTPError:
                time.sleep(0.2)

        def chat(model: str, question: str) -> tuple[float, dict]:
            t0 = time.perf_counter()
            r = http.post(url + "/api/chat", json={"model": model, "stream": False,
                                                   "messages": [{"role": "user", "content": question}],
                                                   "options": {"temperature": 0, "num_predict": 1}})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()

        def embed(question: str) -> tuple[float, float]:
            """(client wall seconds, the server's total_duration in seconds) of embedding ``question``."""
            t0 = time.perf_counter()
            r = http.post(url + "/api/embed", json={"model": embedding, "input": question})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["total_duration"] / 1e9

        chat(BASE, "warm up"), chat(name, "warm up"), embed("warm up")
        load_before = os.getloadavg()[0]
        extra_tokens, extra_s, plain_s, with_s, embed_s, embed_server_s, rates = [], [], [], [], [], [], []
        for _ in range(rounds):
            for q in questions():
                t_plain, plain = chat(BASE, q["question"])
                t_with, withk = chat(name, q["question"])
                wall, server_side = embed(q["question"])
                embed_s.append(wall)
                embed_server_s.append(server_side)
                extra_tokens.append(withk["prompt_eval_count"] - plain["prompt_eval_count"])
                rates.append(withk["prompt_eval_count"] / (withk["prompt_eval_duration"] / 1e9))
                plain_s.append(t_plain)
                with_s.append(t_with)
                extra_s.append(t_with - t_plain)
        med = statistics.median
        return {"requests": len(extra_s), "extra_prompt_tokens_median": med(extra_tokens),
                "plain_first_token_s_median": round(med(plain_s), 3),
                "knowledge_first_token_s_median": round(med(with_s), 3),
                "extra_s_median": round(med(extra_s), 3), "query_embedding_s_median": round(med(embed_s), 4),
                "query_embedding_server_s_median": round(med(embed_server_s), 4),
                "prefill_tokens_per_s_median": round(med(rates), 1),
                "cpus": os.cpu_count(), "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", type=Path, default=Path(os.environ.get("SLMOPS_HOME", Path.home() / ".slmops")))
    p.add_argument("--embedding", nargs="+", default=["all-minilm:l6-v2", BASE])
    p.add_argument("--rounds", type=int, default=1, help="passes over the questions for the cost measurement")
    p.add_argument("--no-cost", action="store_true", help="recall only")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    out: dict = {"document": DOC.name, "recall": {}}
    for i, embedding in enumerate(args.embedding):
        name = "k7-bench-" + embedding.replace(":", "-").replace("/", "-").replace(".", "-")
        create(args.home, name, embedding)
        out["recall"][embedding] = recall(args.home, name)
        print(embedding, json.dumps(out["recall"][embedding]), flush=True)
        if i == 0 and not args.no_cost:
            out["cost"] = {"embedding": embedding, **cost(args.home, name, embedding, args.rounds)}
            print("cost", json.dumps(out["cost"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
