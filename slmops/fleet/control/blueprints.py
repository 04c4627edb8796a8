"""Layered configuration: what a device should run, built from the fleet's baseline, its groups and itself.

A layer's config is a partial deployment config (the sections of :class:`slmops.config.deploy.DeployConfig`:
``model``, ``hardware``, ``optimization``, ``api``, ``performance``) plus a top-level ``channel``, the channel whose
release the device runs. A layer accepts exactly what a deployment config file accepts, checked by the same code,
so an operator meets the same one-line messages in both places.

Precedence, lowest first: the ``baseline``, then ``group:<name>`` layers by priority ascending (equal priorities by
name), then ``device:<id>``. Later layers win: mappings merge key by key, anything else (a scalar, a list, null)
replaces what came before, so a layer's ``performance.keep_alive: null`` hands that setting back to the default.
Every leaf of the result remembers the layer it came from, which is what ``fleet devices show`` prints.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from slmops.api.fleet import NAME_RE
from slmops.config.deploy import DeployConfig, check_deploy
from slmops.types.errors import ConfigError, InvalidInput

BASELINE = "baseline"
CHANNEL = "channel"
KEYS = (*DeployConfig.model_fields, CHANNEL)


@dataclass(frozen=True)
class Layer:
    name: str  # baseline | group:<name> | device:<id>
    priority: int
    config: dict[str, Any]


@dataclass(frozen=True)
class Effective:
    config: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)  # leaf dotted key -> layer name

    @property
    def channel(self) -> str | None:
        value = self.config.get(CHANNEL)
        return value if isinstance(value, str) else None


def group_layer(name: str) -> str:
    return f"group:{name}"


def device_layer(device_id: str) -> str:
    return f"device:{device_id}"


def check_layer(config: Any, where: str) -> dict[str, Any]:
    """``config`` as stored: checked, with values normalised as the deployment config reads them (``Q4_K_M`` ->
    ``q4_k_m``) and only the keys it gave. The first problem is an :class:`InvalidInput` ``"<where>: ..."``
    naming the dotted key."""
    if not isinstance(config, Mapping):
        raise InvalidInput(f"{where}: must be a mapping with keys {', '.join(KEYS)}; got {_shown(config)}")
    for key in config:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(KEYS)}"
            raise InvalidInput(f"{where}: unknown key {key}; {hint}")
    sections = {k: v for k, v in config.items() if k != CHANNEL}
    try:
        checked = check_deploy(sections, where).model_dump(exclude_unset=True)
    except ConfigError as err:
        raise InvalidInput(str(err)) from None
    if CHANNEL in config:
        channel = config[CHANNEL]
        if not isinstance(channel, str) or not NAME_RE.match(channel):
            raise InvalidInput(f"{where}: {CHANNEL}: must be a channel name (lowercase letters, digits and ._-, 64 "
                               f"at most) such as stable; got {_shown(channel)}")
        checked[CHANNEL] = channel
    return checked


def order(baseline: Layer | None, groups: Iterable[Layer], device: Layer | None) -> list[Layer]:
    """The layers lowest precedence first, as :func:`merge` takes them."""
    ranked = sorted(groups, key=lambda layer: (layer.priority, layer.name))
    return [x for x in (baseline, *ranked, device) if x is not None]


def merge(layers: Iterable[Layer]) -> Effective:
    """The layers merged in the order given (later wins), with the source layer of every leaf of the result."""
    config: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        _merge_into(config, layer.config, "", layer.name, sources)
    return Effective(config, sources)


def _merge_into(dst: dict[str, Any], src: Mapping[str, Any], prefix: str, name: str, sources: dict[str, str]) -> None:
    for key, value in src.items():
        path = f"{prefix}{key}"
        current = dst.get(key)
        if isinstance(value, Mapping):
            if not isinstance(current, dict):
                sources.pop(path, None)  # a mapping over a leaf: the leaf is gone
                current = dst[key] = {}
            _merge_into(current, value, path + ".", name, sources)
            continue
        if isinstance(current, dict):
            _forget(sources, path + ".")  # a leaf over a mapping: its leaves are gone
        dst[key] = copy.deepcopy(value)
        sources[path] = name


def _forget(sources: dict[str, str], prefix: str) -> None:
    for key in [k for k in sources if k.startswith(prefix)]:
        del sources[key]


def effective_hash(config: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``config`` (sorted keys, no spaces): equal configs, equal ETags."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
