"""The wiring: settings (environment over a deployment config) become the store, engine config, runner engine and
server app, with nothing written to ``os.environ``; every default is defined once. No model, no process."""

import os
import socket
from pathlib import Path

import pytest

from slmops import wiring
from slmops.cli import common
from slmops.cli.serving import listening_socket
from slmops.config.settings import SETTINGS, Settings, default
from slmops.engine.client import EngineConfig, ModelSpec
from slmops.engine.process import SPARE, ProcessEngine
from slmops.ops.hw import CPU, GPU, Hardware
from slmops.ops.placement import ALL_LAYERS
from slmops.security.keys import KeyStore
from slmops.server.app import ServerConfig
from slmops.types.errors import ConfigError

GIB = 1 << 30
DEPLOY = """performance:
  parallel_requests: 2
  kv_cache_type: q8_0
  kv_cache_budget: 512MiB
  keep_alive: 2m
optimization:
  batch_size: 256
  max_context: 2048
api:
  openai_compatible: false
"""


def gpu_machine() -> Hardware:
    return Hardware(cpu=CPU("x", "x86_64", 8, 16, ("avx2",)), ram_total_bytes=64 * GIB, ram_available_bytes=48 * GIB,
                    gpus=(GPU(0, "H100", "nvidia", 80 * GIB, 79 * GIB, "550", "9.0"),), onnx_providers=(),
                    llama_gpu_offload=True)


class FakeRunner:
    """Stands in for a runner process: records the engine config it was started with."""

    started: list[tuple[str, EngineConfig]] = []

    def __init__(self, name: str, config: EngineConfig):
        self.started.append((name, config))
        self.alive, self.shutting_down = True, False

    def call(self, make, timeout=None):  # type: ignore[no-untyped-def]
        return 0


@pytest.fixture
def deploy(tmp_path, monkeypatch):
    monkeypatch.delenv("SLMOPS_CONFIG", raising=False)
    for s in SETTINGS:  # the test's own settings only
        monkeypatch.delenv(s.name, raising=False)
    monkeypatch.setenv("SLMOPS_HOME", str(tmp_path / "home"))
    path = tmp_path / "deploy.yaml"
    path.write_text(DEPLOY)
    return path


def test_config_flag_reaches_a_runner_process_without_the_environment(deploy):
    before = dict(os.environ)
    cfg = wiring.read_settings(config=deploy)
    assert cfg["SLMOPS_CONFIG"] == deploy and cfg.origins["SLMOPS_CONTEXT_LENGTH"] == "config:deploy.yaml"
    placed = wiring.placement(cfg, None, detect=gpu_machine)
    FakeRunner.started = []
    engine = wiring.engine(cfg, wiring.engine_config(cfg, placed), start=FakeRunner)
    assert isinstance(engine, ProcessEngine)
    engine.load(ModelSpec(name="m", model_path=Path("/nowhere")))
    [(name, config)] = FakeRunner.started
    assert name == "m"
    # the file's values, over placement's choices for a GPU; what the file leaves out stays placement's
    assert (config.default_ctx, config.num_parallel, config.num_batch, config.kv_type) == (2048, 2, 256, "q8_0")
    assert config.kv_budget == 512 << 20 and config.num_gpu == ALL_LAYERS and config.num_thread == 8
    assert dict(os.environ) == before


def test_the_cli_flag_is_read_once_and_never_exported(deploy, monkeypatch):
    monkeypatch.setattr(common, "_flags", common._Flags())
    common.settings.cache_clear()
    try:
        assert common.settings()["SLMOPS_CONTEXT_LENGTH"] == default("SLMOPS_CONTEXT_LENGTH")
        common.use_config(deploy)
        assert common.settings() is common.settings()  # cached for the command
        assert common.settings()["SLMOPS_CONTEXT_LENGTH"] == 2048 and common.settings()["SLMOPS_KEEP_ALIVE"] == 120
        assert "SLMOPS_CONFIG" not in os.environ
        common.use_config(None)  # no flag: what was given stays
        assert common.settings()["SLMOPS_CONTEXT_LENGTH"] == 2048
    finally:
        common.settings.cache_clear()


def test_the_environment_wins_over_the_config(deploy):
    cfg = wiring.read_settings({"SLMOPS_CONTEXT_LENGTH": "1024", "SLMOPS_NUM_GPU": "0"}, config=deploy)
    config = wiring.engine_config(cfg, wiring.placement(cfg, None, detect=gpu_machine))
    assert config.default_ctx == 1024 and config.num_gpu == 0  # a setting given at its "unset" default still counts
    assert wiring.engine_config(Settings.from_env({"SLMOPS_NUM_GPU": "-1"}),
                                wiring.placement(cfg, None, detect=gpu_machine)).num_gpu == ALL_LAYERS


def test_the_whole_server_from_settings(deploy, tmp_path):
    cfg = wiring.read_settings(config=deploy)
    FakeRunner.started = []
    built = wiring.server(cfg, KeyStore(tmp_path / "keys.json"), detect=gpu_machine, start=FakeRunner)
    state = built.app.state
    assert state.config.openai is False and state.config.home == cfg.home
    assert state.runtime.admission.default_keep_alive == 120 and state.store.root == cfg.home / "models"
    assert state.runtime.engine.config.num_parallel == 2 and built.placement.device == "gpu"
    assert not built.access.auth_on() and built.access.audit is not None
    # one runner process started ahead (it boots while the server imports), ready for whichever model comes first
    assert [name for name, _ in FakeRunner.started] == [SPARE]


def test_the_server_runs_on_the_engine_serve_started_first(deploy, tmp_path):
    cfg = wiring.read_settings(config=deploy)
    FakeRunner.started = []
    started = wiring.serving(cfg, wiring.open_store(cfg), detect=gpu_machine, start=FakeRunner)
    assert [name for name, _ in FakeRunner.started] == [SPARE] and started.placement.device == "gpu"
    built = wiring.server(cfg, KeyStore(tmp_path / "keys.json"), started=started)
    assert built.app.state.runtime.engine is started.engine and built.placement is started.placement
    assert len(FakeRunner.started) == 1  # no second engine, no second runner


def test_serve_listens_before_its_app_runs_and_names_a_port_in_use():
    with listening_socket("127.0.0.1", 0, "set SLMOPS_HOST") as sock:
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=f"address 127.0.0.1:{port} is already in use; stop the other server "
                                              "or set SLMOPS_HOST"):
            listening_socket("127.0.0.1", port, "set SLMOPS_HOST")
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # a client early: it waits, not refused
            conn, _ = sock.accept()
            conn.close()


def test_store_policies_come_from_the_settings(tmp_path):
    key = "ab" * 32
    s = wiring.open_store(Settings.from_env({"SLMOPS_HOME": str(tmp_path), "SLMOPS_STORE_KEY": key,
                                             "SLMOPS_ALLOW_PRIVATE_REGISTRIES": "true"}))
    assert s.root == tmp_path / "models" and s.allow_internal_registries and s.blobs.key == bytes.fromhex(key)
    assert wiring.open_store(Settings.from_env({"SLMOPS_HOME": str(tmp_path)}), tmp_path / "other").root == \
        tmp_path / "other" / "models"
    (tmp_path / "key").write_text(key)
    both = Settings.from_env({"SLMOPS_STORE_KEY": key, "SLMOPS_STORE_KEY_FILE": str(tmp_path / "key")})
    with pytest.raises(ConfigError, match="both set"):
        wiring.open_store(both)


def test_listen_refuses_unsafe_addresses_and_half_tls(tmp_path):
    keys = KeyStore(tmp_path / "keys.json")
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0"):
        wiring.listen(Settings.from_env({"SLMOPS_HOST": "0.0.0.0:1"}), keys)
    assert wiring.listen(Settings.from_env({"SLMOPS_HOST": "0.0.0.0:1"}), keys, insecure=True).port == 1
    with pytest.raises(ConfigError, match="needs both"):
        wiring.listen(Settings.from_env({}), keys, tls_cert=tmp_path / "cert.pem")


def test_each_default_is_the_settings_table_s():
    engine, server = EngineConfig(), ServerConfig()
    assert (engine.default_ctx, engine.max_queue, engine.kv_budget, engine.prefix_cache, engine.num_parallel) == (
        default("SLMOPS_CONTEXT_LENGTH"), default("SLMOPS_MAX_QUEUE"), default("SLMOPS_KV_BUDGET"),
        default("SLMOPS_PREFIX_CACHE"), default("SLMOPS_NUM_PARALLEL"))
    assert (server.host, server.max_request_bytes, server.max_blob_bytes, server.openai, server.feedback) == (
        default("SLMOPS_HOST")[0], default("SLMOPS_MAX_REQUEST_BYTES"), default("SLMOPS_MAX_BLOB_SIZE"),
        default("SLMOPS_OPENAI_COMPATIBLE"), default("SLMOPS_FEEDBACK"))
    # the Python API without any SLMOPS_* set: the engine's own defaults, but for how many models it may hold
    from dataclasses import replace
    assert replace(wiring.engine_config(Settings.from_env({}), None), max_loaded=1) == EngineConfig()
