"""Continuous batching and the shared prefix cache in a real server process."""

import concurrent.futures as cf

import pytest

from conftest import HTTP, Server, link_home
from test_server_http import metric

M = "smollm2:135m"


@pytest.fixture(scope="module")
def batch_server(shared_home, tmp_path_factory):
    with Server(link_home(shared_home, tmp_path_factory.mktemp("batch")), SLMOPS_NUM_PARALLEL="8") as s:
        yield s


def generate(url: str, prompt: str, n: int = 24, raw: bool = False, **extra):
    r = HTTP.post(url + "/api/generate", json={"model": M, "prompt": prompt, "stream": False, "raw": raw,
                                                  "options": {"temperature": 0, "num_predict": n, **extra}},
                   timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_requests_are_decoded_together(batch_server):
    prompts = [f"Write a short poem about the number {i}." for i in range(8)]
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: generate(batch_server.url, p), prompts))
    assert all(r["eval_count"] == 24 and r["done_reason"] == "length" and r["response"] for r in results)
    assert metric(batch_server.url, "slmops_parallel_sequences", f'{{model="{M}"}}') == 8
    assert metric(batch_server.url, "slmops_batch_max_sequences", f'{{model="{M}"}}') >= 4


def test_batched_greedy_matches_alone(batch_server):
    """A request decoded beside others gives the text it gives alone (same prompt, greedy).

    A counting prompt keeps the greedy choice far from a tie: a batch of another size changes the float summation
    order, and an open-ended prompt can then flip a near-tie token, which says nothing about batching."""
    count = "Count from 1 to 40: 1, 2, 3, 4,"
    alone = generate(batch_server.url, count, 24, raw=True)["response"]
    others = [f"Tell me about planet {i}." for i in range(5)]
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(generate, batch_server.url, p, 32) for p in others]
        mine = pool.submit(generate, batch_server.url, count, 24, raw=True)
        together = mine.result()["response"]
        [f.result() for f in futures]
    assert together == alone and "5, 6, 7" in alone


def test_shared_system_prompt_is_reused_across_requests(batch_server):
    system = "You are a meticulous assistant. " * 40  # a long shared system prompt
    before = metric(batch_server.url, "slmops_cached_prompt_tokens_total", f'{{model="{M}"}}')
    for question in ("What is 2+2?", "Name a color.", "Say hello."):
        r = HTTP.post(batch_server.url + "/api/chat", json={
            "model": M, "stream": False, "options": {"num_predict": 4},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})
        assert r.status_code == 200
    after = metric(batch_server.url, "slmops_cached_prompt_tokens_total", f'{{model="{M}"}}')
    assert after - before >= 2 * 200  # the second and third requests skipped the ~250 shared tokens
