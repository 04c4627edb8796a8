"""The server runtime's roles, one at a time, on fakes of their real interfaces (no HTTP, no model): keep-alive
timers, what a caller may decide, the loaded-model table, observed generation streams, name resolution through the
slot table, and the store's one read of what a model needs to run. Fast."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry import tiny_gguf
from slot_server import FakeEngine, stored
from slmops.engine.client import ModelSpec, Request, spec_from_store
from slmops.engine.outputs import Stats
from slmops.server import access
from slmops.server.admission import Admission
from slmops.server.inference import Inference
from slmops.server.keepalive import Expiry, keep_alive_seconds
from slmops.server.loaded import LoadedModels
from slmops.server.metrics import Metrics
from slmops.server.resolver import Resolver
from slmops.server.runtime import ModelRuntime
from slmops.server.slots import SlotTable
from slmops.store.store import Store
from slmops.types.errors import Forbidden, InvalidInput, ModelNotFound, NotFound
from slmops.types.name import ModelName

A = "slot/smol-a:1"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> bytes:
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def as_user() -> Iterator[access.RequestContext]:
    """A request context for a key with the user role (inference, no manage right)."""
    ctx = access.RequestContext("r1", "POST", "/api/generate", "127.0.0.1", key="k", role="user")
    token = access.CURRENT.set(ctx)
    yield ctx
    access.CURRENT.reset(token)


def spec(tmp_path: Path, name: str = "m:1", **params: Any) -> ModelSpec:
    return ModelSpec(name=name, model_path=tmp_path / "absent.gguf", params=params)


# -- keep-alive ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [(None, 300), ("", 300), ("5m", 300), (10, 10), (2.5, 2.5), (0, 0),
                                            (-1, -1), ("1h", 3600)])
def test_keep_alive_reads_durations_and_seconds(value: Any, seconds: float) -> None:
    assert keep_alive_seconds(value, 300) == seconds


@pytest.mark.parametrize("value", [True, "soon", float("nan"), float("inf")])
def test_keep_alive_refuses_what_is_not_a_finite_duration(value: Any) -> None:
    with pytest.raises(InvalidInput):
        keep_alive_seconds(value, 300)


def test_expiry_times_each_model_by_its_clock() -> None:
    now = [100.0]
    expiry = Expiry(lambda: now[0])
    expiry.renew("a", 5)
    expiry.renew("b", -1)  # for ever
    expiry.renew("c", 0)
    assert (expiry.at("a"), expiry.at("b"), expiry.at("never-used")) == (105, math.inf, math.inf)
    assert expiry.due() == ["c"]
    now[0] = 105
    assert sorted(expiry.due()) == ["a", "c"]
    expiry.forget("a")
    assert expiry.due() == ["c"] and expiry.at("a") == math.inf


# -- what a caller may decide ----------------------------------------------------------------------------------------
def test_without_a_request_context_the_caller_decides(tmp_path: Path) -> None:
    admission = Admission(default_keep_alive=300, default_ctx=2048)
    assert admission.keep_alive_for("1h") == 3600 and admission.keep_alive_for(0) == 0
    assert admission.options_for(spec(tmp_path), {"num_ctx": 8192, "num_gpu": 0}) == {"num_ctx": 8192, "num_gpu": 0}


def test_a_caller_without_the_manage_right_cannot_change_a_shared_model(tmp_path: Path, as_user) -> None:
    admission = Admission(default_keep_alive=300, default_ctx=2048)
    assert admission.keep_alive_for("1h") == 300  # the server's, whatever it asks
    with pytest.raises(Forbidden, match="may not unload models"):
        admission.keep_alive_for(0)
    asked = {"num_ctx": 8192, "num_gpu": 0, "temperature": 0.5, "no_such_option": 1}
    assert admission.options_for(spec(tmp_path), asked) == {"num_ctx": 2048, "temperature": 0.5}
    assert admission.options_for(spec(tmp_path, num_ctx=4096), asked)["num_ctx"] == 4096  # the Modelfile's ceiling
    assert admission.request_for(spec(tmp_path), Request(prompt="hi", options=asked)).options == {
        "num_ctx": 2048, "temperature": 0.5}


# -- the loaded-model table ------------------------------------------------------------------------------------------
def test_a_model_stays_while_used_and_goes_when_its_keep_alive_runs_out(tmp_path: Path) -> None:
    async def go() -> None:
        now, engine = [0.0], FakeEngine()
        models, m = LoadedModels(engine, Expiry(lambda: now[0])), spec(tmp_path)
        await models.call(m, engine.load, 5)
        (info,) = models.loaded()
        assert (info.name, info.expires_at, info.context_length, info.size) == ("m:1", 5, 2048, 0)
        now[0] = 6
        with models.using("m:1", 5):
            assert models.in_flight() == 1
            await models.reap_once()
            assert engine.loaded(), "a model in use is never reaped"
        assert models.in_flight() == 0 and models.loaded()[0].expires_at == 11  # its end renewed the keep-alive
        await models.reap_once()
        assert engine.loaded()
        now[0] = 11
        await models.reap_once()
        assert engine.loaded() == [] and models.loaded() == []
        await models.stop()
    asyncio.run(go())


def test_keep_alive_zero_unloads_once_the_last_use_ends(tmp_path: Path) -> None:
    async def go() -> None:
        engine = FakeEngine()
        models, m = LoadedModels(engine, Expiry()), spec(tmp_path)
        with models.using("m:1", 0):
            await models.call(m, engine.load, 0)  # it ends while another use holds the model: the model stays
            assert [i.name for i in models.loaded()] == ["m:1"]
        assert models.loaded() == []  # gone from /api/ps at once
        await models.on_engine(lambda: None)  # the unload queued on the engine thread has run
        assert engine.loaded() == []
        await models.call(m, engine.load, -1)
        assert models.loaded()[0].expires_at == math.inf
        assert await models.unload("m:1") is True and engine.loaded() == []
        await models.stop()
    asyncio.run(go())


# -- observed generations --------------------------------------------------------------------------------------------
class Seen:
    """An Observer that keeps what it is told."""

    def __init__(self) -> None:
        self.generations: list[tuple[str, Stats, float | None]] = []
        self.cancelled: list[str] = []

    def generation(self, model: str, stats: Stats, ttft_s: float | None) -> None:
        self.generations.append((model, stats, ttft_s))

    def cancellation(self, model: str) -> None:
        self.cancelled.append(model)


def test_a_stream_is_observed_and_charged_to_its_request(tmp_path: Path, as_user) -> None:
    async def go() -> None:
        engine, seen = FakeEngine(), Seen()
        models = LoadedModels(engine, Expiry())
        inference = Inference(engine, models, Admission(300, 2048), seen)
        as_user.content = {}
        pieces = [o async for o in inference.stream(spec(tmp_path), Request(prompt="hi"), 300)]
        assert "".join(p.text for p in pieces) == "[m:1] done" and models.in_flight() == 0
        ((model, stats, ttft),) = seen.generations
        assert model == "m:1" and stats.eval_count == 2 and ttft is not None and seen.cancelled == []
        assert (as_user.prompt_tokens, as_user.completion_tokens) == (1, 2)
        assert as_user.content == {"completions": ["[m:1] done"]} and as_user.complete

        engine.hold["m:1"] = threading.Event()  # a client that leaves after the first piece
        stream = inference.stream(spec(tmp_path), Request(prompt="hi"), 300)
        assert (await stream.__anext__()).text == "[m:1]" and models.in_flight() == 1
        await stream.aclose()
        engine.hold["m:1"].set()
        assert seen.cancelled == ["m:1"] and len(seen.generations) == 1 and not as_user.complete
        assert as_user.completion_tokens == 3 and models.in_flight() == 0
        await models.stop()
        inference.close()
    asyncio.run(go())


def test_the_runtime_reports_generations_to_the_metrics_it_was_built_with(tmp_path: Path, gguf: bytes) -> None:
    store, metrics = stored(tmp_path, gguf, A), Metrics()
    runtime = ModelRuntime(store, FakeEngine(), keep_alive=300, metrics=metrics)  # type: ignore[arg-type]
    assert runtime.metrics is metrics and runtime.inference.observer is metrics

    async def go() -> None:
        runtime.start()
        _, m = runtime.resolver.resolve(A)
        assert [o.text async for o in runtime.inference.stream(m, Request(prompt="hi"), 300)][-1] == " done"
        await runtime.stop()
    asyncio.run(go())
    assert metrics.registry.get_sample_value("slmops_completion_tokens_total", {"model": A}) == 2


# -- names -----------------------------------------------------------------------------------------------------------
def test_a_served_name_resolves_through_the_slot_table(tmp_path: Path, gguf: bytes, as_user) -> None:
    store = stored(tmp_path, gguf, A)
    table = SlotTable(tmp_path / "slots.json")
    resolver = Resolver(store, table)
    model, m = resolver.resolve(A)
    assert model.display == A and m.name == A and m.context_length == 64
    table.put(ModelName.parse("smol"), ModelName.parse(A), "smol:1")
    model, m = resolver.resolve("smol")
    assert model.display == A and m.name == A and as_user.model == "smol:latest"  # the name asked for
    assert resolver.stored_as("smol") == A and resolver.stored_as("other:1") == "other:1"
    assert resolver.shown_as(A) == "smol:latest" and resolver.shown_as("other:1") == "other:1"
    with pytest.raises(ModelNotFound):
        resolver.resolve("absent")
    with pytest.raises(InvalidInput, match="model is required"):
        resolver.resolve("")
    table.put(ModelName.parse("gone"), ModelName.parse("slot/smol-b:9"), None)
    with pytest.raises(NotFound, match="DELETE /api/slots/gone:latest"):
        resolver.resolve("gone")


# -- the store's one read --------------------------------------------------------------------------------------------
def test_what_a_model_needs_to_run_comes_from_one_read_of_its_manifest(tmp_path: Path, gguf: bytes,
                                                                       monkeypatch) -> None:
    store, name = stored(tmp_path, gguf, A), ModelName.parse(A)
    reads: list[ModelName] = []
    get = store.manifests.get
    monkeypatch.setattr(store.manifests, "get", lambda n: reads.append(n) or get(n))
    m = spec_from_store(store, name)
    assert reads == [name]
    assert m.model_path == store.model_path(name) and m.context_length == store.inspect(name).context_length == 64
    assert (m.template, m.system, m.params, m.messages, m.adapters) == (None, None, {}, [], [])
    runnable = store.runnable(name)
    assert runnable.model_path == m.model_path and runnable.info.architecture == "llama"
    with pytest.raises(ModelNotFound):
        Store(tmp_path / "empty").runnable(name)
