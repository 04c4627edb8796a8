"""The deployment config: the seed's shape, env over config over defaults, one-line errors, a real server."""

import json
import re
import time
from datetime import datetime

import pytest

from conftest import HTTP, Server, link_home, run_cli
from slmops.config.deploy import load_deploy, to_settings
from slmops.types.errors import ConfigError

SEED = """deployment:
  model: smollm2:135m
  hardware:
    preferred: npu
    fallback: [gpu, cpu]
  optimization:
    quantization: dynamic
    batch_size: 256
    max_context: 2048
  api:
    port: 8080
    openai_compatible: false
  performance:
    parallel_requests: 2
    kv_cache_type: q8_0
    kv_cache_budget: 512MiB
    keep_alive: 2m
"""


def test_the_seed_shape_in_yaml_and_json_maps_onto_settings(tmp_path):
    y = tmp_path / "deploy.yaml"
    y.write_text(SEED)
    settings = to_settings(load_deploy(y))
    assert settings == {"SLMOPS_MODEL": "smollm2:135m", "SLMOPS_HARDWARE_PREFERRED": "npu",
                        "SLMOPS_HARDWARE_FALLBACK": "gpu,cpu", "SLMOPS_QUANTIZATION": "dynamic",
                        "SLMOPS_NUM_BATCH": "256", "SLMOPS_CONTEXT_LENGTH": "2048", "SLMOPS_HOST": "127.0.0.1:8080",
                        "SLMOPS_OPENAI_COMPATIBLE": "false", "SLMOPS_NUM_PARALLEL": "2", "SLMOPS_KV_CACHE_TYPE": "q8_0",
                        "SLMOPS_KV_BUDGET": "512MiB", "SLMOPS_KEEP_ALIVE": "2m"}
    j = tmp_path / "deploy.json"
    j.write_text(json.dumps({"api": {"host": "::1", "port": 9000}, "performance": {"keep_alive": 30}}))
    assert to_settings(load_deploy(j)) == {"SLMOPS_HOST": "[::1]:9000", "SLMOPS_KEEP_ALIVE": "30"}


@pytest.mark.parametrize("text, message", [
    ("optimisation:\n  batch_size: 4\n", "bad.yaml: unknown key optimisation; did you mean optimization?"),
    ("api:\n  prot: 80\n", "bad.yaml: unknown key api.prot; did you mean api.port?"),
    ("deployment:\n  api: {prot: 80}\n", "bad.yaml: unknown key deployment.api.prot; did you mean deployment.api.port?"),
    ("performance:\n  batch_processing: true\n", "bad.yaml: unknown key performance.batch_processing; known keys: "),
    ("api:\n  port: eighty\n", "bad.yaml: api.port: must be an integer from 1 to 65535; got 'eighty'"),
    ("optimization:\n  batch_size: true\n", "bad.yaml: optimization.batch_size: must be a positive integer"),
    ("performance:\n  parallel_requests: -2\n", "bad.yaml: performance.parallel_requests: must be an integer from 1"),
    ("performance:\n  keep_alive: soon\n", "bad.yaml: performance.keep_alive: must be a duration such as 10m"),
    ("performance:\n  keep_alive: yes\n", "bad.yaml: performance.keep_alive: must be a duration"),
    ("performance:\n  kv_cache_budget: lots\n", "bad.yaml: performance.kv_cache_budget: must be a size in bytes"),
    ("hardware:\n  preferred: tpu\n", "bad.yaml: hardware.preferred: must be one of npu, gpu, cpu; got 'tpu'"),
    ("hardware:\n  fallback: [gpu, tpu]\n", "bad.yaml: hardware.fallback[1]: must be a list of npu, gpu, cpu"),
    ("hardware: gpu\n", "bad.yaml: hardware: must be a mapping with keys preferred, fallback; got 'gpu'"),
    ("optimization:\n  quantization: q9\n", "bad.yaml: optimization.quantization: must be auto, dynamic or a"),
    ("model: ../../etc\n", "bad.yaml: model: must be a model name such as smollm2:135m"),
    ("api:\n  host: 0.0.0.0:80\n", "bad.yaml: api.host: must be a host name or IP address, without a port"),
    ("api:\n  port: 0\n  host: 3\n", ("bad.yaml: api.host: must be a host name or IP address, without a port "
                                      "(that goes in api.port); got 3 (and 1 more)")),
    ("api:\n  port: [1\n", "bad.yaml: invalid YAML at line 3"),
    ("api:\n  port: 1\napi:\n  port: 2\n", "bad.yaml: line 3: key api appears twice; keep one"),
    ("- a\n- b\n", "bad.yaml: the top level must be a mapping"),
])
def test_each_mistake_is_one_line_naming_file_and_field(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_deploy(bad)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_unreadable_files_and_bad_json_are_one_line_too(tmp_path):
    for path, message in ((tmp_path / "nope.yaml", "nope.yaml: cannot read the deployment config (No such file"),
                          (tmp_path, f"{tmp_path.name}: cannot read the deployment config")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_deploy(path)
    j = tmp_path / "d.json"
    j.write_text('{"api": {"port": 1, "port": 2}}')
    with pytest.raises(ConfigError, match="d.json: invalid JSON .key port appears twice"):
        load_deploy(j)
    j.write_text('{"api": {"port": 1,}}')
    with pytest.raises(ConfigError, match="d.json: invalid JSON .* line 1 column 20"):
        load_deploy(j)


def test_env_overrides_config_and_env_says_where_each_value_came_from(tmp_path, cli_home):
    y = tmp_path / "deploy.yaml"
    y.write_text(SEED)
    r = run_cli("env", "--config", str(y), home=cli_home, SLMOPS_KEEP_ALIVE="1m")
    assert r.returncode == 0, r.stderr
    lines = {line.split("=", 1)[0]: line for line in r.stdout.splitlines()}
    assert "=60.0  (env)" in lines["SLMOPS_KEEP_ALIVE"]
    assert "=2048  (config:deploy.yaml)" in lines["SLMOPS_CONTEXT_LENGTH"]
    assert "=gpu,cpu  (config:deploy.yaml)" in lines["SLMOPS_HARDWARE_FALLBACK"]
    assert "(default)" in lines["SLMOPS_AUTH"]
    missing = run_cli("env", home=cli_home, SLMOPS_CONFIG=str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "nope.yaml: cannot read the deployment config" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("performance:\n  parallel_requests: 0\n")
    refused = run_cli("serve", "--config", str(bad), home=cli_home, timeout=60)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "bad.yaml: performance.parallel_requests" in refused.stderr


def test_a_server_started_with_a_config_applies_it(shared_home, tmp_path):
    y = tmp_path / "deploy.yaml"
    y.write_text(SEED)
    home = link_home(shared_home, tmp_path / "h")
    server = Server(home, args=("--config", str(y)))  # SLMOPS_HOST from the test's env wins over api.port
    try:
        deadline = time.time() + 60
        models = []
        while time.time() < deadline and not models:  # the model is loaded at start, before any request
            models = HTTP.get(server.url + "/api/ps").json()["models"]
            time.sleep(0.2)
        assert [m["name"] for m in models] == ["smollm2:135m"]
        expires = datetime.fromisoformat(models[0]["expires_at"])
        left = (expires - datetime.now(expires.tzinfo)).total_seconds()
        assert 60 < left <= 120  # keep_alive: 2m
        assert models[0]["context_length"] == 2048  # max_context
        assert HTTP.get(server.url + "/v1/models").status_code == 404  # openai_compatible: false
        log = (home / "server.log").read_text()
        assert "config: " in log and "overridden by env: SLMOPS_HOST" in log and "placement: cpu" in log
    finally:
        server.stop()
