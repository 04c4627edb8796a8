"""Layered blueprints: precedence, provenance, and a layer checked exactly as a deployment config file is."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from slmops.config.deploy import load_deploy
from slmops.fleet.control.blueprints import (
    Effective,
    Layer,
    check_layer,
    device_layer,
    effective_hash,
    group_layer,
    merge,
    order,
)
from slmops.types.errors import ConfigError, InvalidInput

WHERE = "blueprint group:edge-eu"
BASE = Layer("baseline", 0, {"model": "smollm2:135m", "channel": "stable",
                             "performance": {"parallel_requests": 2, "keep_alive": "10m"},
                             "hardware": {"preferred": "gpu", "fallback": ["npu", "cpu"]}})
EDGE = Layer(group_layer("edge-eu"), 10, {"performance": {"keep_alive": "1h"}, "hardware": {"fallback": ["cpu"]}})
LYON = Layer(group_layer("lyon"), 20, {"performance": {"parallel_requests": 1}, "channel": "canary"})
TIE = Layer(group_layer("a-first"), 20, {"performance": {"parallel_requests": 3}})
DEVICE = Layer(device_layer("dev_0123456789ab"), -100, {"optimization": {"max_context": 2048},
                                                          "performance": {"parallel_requests": 4}})


def test_precedence_baseline_then_groups_by_priority_then_device():
    layers = order(BASE, [LYON, EDGE, TIE], DEVICE)
    assert [x.name for x in layers] == ["baseline", "group:edge-eu", "group:a-first", "group:lyon",
                                        "device:dev_0123456789ab"]
    eff = merge(layers)
    assert eff.config == {
        "model": "smollm2:135m", "channel": "canary",
        "performance": {"parallel_requests": 4, "keep_alive": "1h"},
        "hardware": {"preferred": "gpu", "fallback": ["cpu"]},
        "optimization": {"max_context": 2048},
    }
    assert eff.sources == {
        "model": "baseline", "channel": "group:lyon", "performance.parallel_requests": "device:dev_0123456789ab",
        "performance.keep_alive": "group:edge-eu", "hardware.preferred": "baseline",
        "hardware.fallback": "group:edge-eu", "optimization.max_context": "device:dev_0123456789ab",
    }
    assert eff.channel == "canary"


def test_equal_priorities_are_ordered_by_name_and_the_later_name_wins():
    eff = merge(order(None, [LYON, TIE], None))
    assert eff.config["performance"]["parallel_requests"] == 1 and eff.sources["channel"] == "group:lyon"
    assert merge(order(None, [TIE, LYON], None)) == eff  # the order groups arrive in does not matter


def test_missing_layers_and_no_layers():
    assert order(None, [], None) == []
    assert merge([]) == Effective({}, {})
    assert merge(order(None, [], DEVICE)).sources["optimization.max_context"] == DEVICE.name
    assert merge([]).channel is None


def test_a_list_is_replaced_whole_and_null_hands_a_setting_back_to_the_default():
    reset = Layer(device_layer("dev_0123456789ab"), 0, {"performance": {"keep_alive": None}})
    eff = merge([BASE, EDGE, reset])
    assert eff.config["hardware"]["fallback"] == ["cpu"]
    assert eff.config["performance"] == {"parallel_requests": 2, "keep_alive": None}
    assert eff.sources["performance.keep_alive"] == reset.name


def test_merge_does_not_alias_or_change_the_layers():
    before = json.dumps(BASE.config, sort_keys=True)
    eff = merge([BASE])
    eff.config["hardware"]["fallback"].append("gpu")
    eff.config["performance"]["keep_alive"] = "1s"
    assert json.dumps(BASE.config, sort_keys=True) == before


def test_effective_hash_is_canonical():
    a = merge(order(BASE, [EDGE, LYON], DEVICE)).config
    b = json.loads(json.dumps(a), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert list(a) != list(b) and effective_hash(a) == effective_hash(b)
    assert len(effective_hash(a)) == 64
    assert effective_hash(a) != effective_hash({**a, "channel": "stable"})


# -- checking a layer ------------------------------------------------------------------------------------------

def test_a_valid_layer_is_kept_partial_and_normalised_as_the_deploy_file_reads_it():
    layer = {"channel": "edge.beta-2", "optimization": {"quantization": "Q4_K_M"}, "api": {"host": "[::1]"},
             "performance": {"kv_cache_budget": "1GiB", "keep_alive": -1}}
    assert check_layer(layer, WHERE) == {"channel": "edge.beta-2", "optimization": {"quantization": "q4_k_m"},
                                         "api": {"host": "::1"},
                                         "performance": {"kv_cache_budget": "1GiB", "keep_alive": -1}}
    assert check_layer({}, WHERE) == {}
    for layer in (BASE, EDGE, LYON, TIE, DEVICE):
        assert check_layer(layer.config, WHERE) == layer.config


@pytest.mark.parametrize(("layer", "message"), [
    ({"performance": {"parallel_requests": "4"}},
     "performance.parallel_requests: must be an integer from 1 to 64; got '4'"),
    ({"performance": {"parallel_requests": 65}}, "performance.parallel_requests: must be an integer from 1 to 64; got 65"),
    ({"performance": {"parallel_requests": True}}, "performance.parallel_requests: must be an integer"),
    ({"optimization": {"max_context": 8}}, "optimization.max_context: must be an integer of at least 16 (tokens); got 8"),
    ({"api": {"port": 70000}}, "api.port: must be an integer from 1 to 65535; got 70000"),
    ({"api": {"host": "0.0.0.0:8080"}}, "api.host: must be a host name or IP address, without a port"),
    ({"performance": {"keep_alive": "soon"}}, "performance.keep_alive: must be a duration"),
    ({"performance": {"kv_cache_budget": "lots"}}, "performance.kv_cache_budget: must be a size"),
    ({"hardware": {"fallback": ["gpu", "tpu"]}}, "hardware.fallback[1]: must be a list of npu, gpu, cpu; got 'tpu'"),
    ({"hardware": {"fallback": "cpu"}}, "hardware.fallback: must be a list of npu, gpu, cpu; got 'cpu'"),
    ({"optimization": {"quantization": "q5_fancy"}}, "optimization.quantization: must be auto, dynamic or a"),
    ({"model": "Not A Name!"}, "model: must be a model name such as smollm2:135m"),
    ({"performance": None}, "performance: must be a mapping with keys parallel_requests"),
    ({"performance": {"keep_alivee": "1h"}}, "unknown key performance.keep_alivee; did you mean performance.keep_alive?"),
    ({"optimisation": {}}, "unknown key optimisation; did you mean optimization?"),
    ({"chanel": "stable"}, "unknown key chanel; did you mean channel?"),
    ({"zzz": 1}, "unknown key zzz; known keys: model, hardware, optimization, api, performance, privacy, channel"),
    ({"channel": "Stable"}, ("channel: must be a channel name (lowercase letters, digits and ._-, 64 at most) "
                             "such as stable; got 'Stable'")),
    ({"channel": ""}, "channel: must be a channel name"),
    ({"channel": "a" * 65}, "channel: must be a channel name"),
    ({"channel": 1}, "channel: must be a channel name"),
    ({"channel": None}, "channel: must be a channel name"),
    ({"deployment": {"model": "smollm2:135m"}}, "unknown key deployment"),
])
def test_every_kind_of_invalid_layer_names_the_dotted_key(layer, message):
    with pytest.raises(InvalidInput) as err:
        check_layer(layer, WHERE)
    text = str(err.value)
    assert text.startswith(f"{WHERE}: ") and message in text and "\n" not in text


@pytest.mark.parametrize("layer", [None, [], "model: x", 3])
def test_a_layer_must_be_a_mapping(layer):
    with pytest.raises(InvalidInput, match=f"^{WHERE}: must be a mapping with keys model, .*channel; got"):
        check_layer(layer, WHERE)


@pytest.mark.parametrize("layer", [
    {"performance": {"parallel_requests": "4"}}, {"api": {"port": 0}}, {"hardware": {"preferred": "tpu"}},
    {"optimization": {"batch_size": 1.5}}, {"performance": {"keep_alive": True}}, {"model": "smollm2:135m"},
    {"api": {"host": "::1", "port": 8080, "openai_compatible": False}}, {"performance": {"kv_cache_type": "q4_0"}},
])
def test_a_layer_accepts_exactly_what_a_deployment_file_accepts(tmp_path, layer):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(layer))
    try:
        file_ok, file_message = load_deploy(path), ""
    except ConfigError as err:
        file_ok, file_message = None, str(err).removeprefix("deploy.yaml: ")
    try:
        check_layer(layer, WHERE)
        layer_message = ""
    except InvalidInput as err:
        layer_message = str(err).removeprefix(f"{WHERE}: ")
    assert (file_ok is not None) == (layer_message == "") and layer_message == file_message


# -- properties of merge -----------------------------------------------------------------------------------------

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["a", "b", "1h"]),
                  st.lists(st.sampled_from(["cpu", "gpu"]), max_size=2))
_tree = st.recursive(_leaf, lambda inner: st.dictionaries(st.sampled_from(["x", "y", "z"]), inner, max_size=3),
                     max_leaves=8)
_config = st.dictionaries(st.sampled_from(["model", "performance", "hardware", "channel"]), _tree, max_size=4)
_layers = st.lists(_config, max_size=5).map(lambda cs: [Layer(f"layer{i}", i, c) for i, c in enumerate(cs)])


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@given(_layers)
def test_sources_name_exactly_the_leaves_and_a_layer_that_set_them(layers):
    eff = merge(layers)
    leaves = _leaves(eff.config)
    assert set(eff.sources) == set(leaves)
    by_name = {x.name: _leaves(x.config) for x in layers}
    for key, name in eff.sources.items():
        assert by_name[name].get(key, object()) == leaves[key]  # the named layer has that key with that value
        later = [x.name for x in layers[[x.name for x in layers].index(name) + 1:]]
        assert all(key not in by_name[n] for n in later)  # and no later layer set it


@given(_layers, st.integers(0, 5))
def test_layering_is_associative(layers, split):
    """Merging a prefix first, then the rest on top, is the same as merging all at once."""
    split = min(split, len(layers))
    whole = merge(layers)
    head = merge(layers[:split])
    rest = merge([Layer("head", 0, head.config), *layers[split:]])
    assert rest.config == whole.config
    assert {k: whole.sources[k] for k in rest.sources if rest.sources[k] == "head"} == \
        {k: head.sources[k] for k in rest.sources if rest.sources[k] == "head"}
    assert {k: v for k, v in rest.sources.items() if v != "head"} == \
        {k: v for k, v in whole.sources.items() if v not in {x.name for x in layers[:split]}}


@given(_layers)
def test_effective_hash_depends_only_on_the_config(layers):
    eff = merge(layers)
    assert effective_hash(eff.config) == effective_hash(json.loads(json.dumps(eff.config)))
