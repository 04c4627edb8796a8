"""Every ``SLMOPS_*`` variable, declared once with its type, default and help (as Ollama's ``envconfig``).

Configuration is read here, at the edges (CLI start-up, ``serve``); deeper code receives plain values. A bad value
is a :class:`ConfigError` at start-up naming the variable and what it accepts, never a crash later on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from slmops.types.errors import ConfigError


def parse_duration(text: str) -> float:
    """Ollama's keep-alive grammar: seconds as a number, or a Go duration (``5m``, ``1h30m``, ``300ms``).

    Returns seconds; negative means forever.
    """
    text = str(text).strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f'invalid duration "{text}": use seconds or a duration such as 5m, 1h, 30s')
    return sign * sum(float(n) * units[u] for n, u in parts)


API_PORT = 11434  # Ollama's port: clients that know Ollama find us there
FLEET_PORT = 11500


def _host(text: str, default_port: int = API_PORT) -> tuple[str, int]:
    text = text.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            port = int(rest.removeprefix(":"))
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host or "127.0.0.1", port


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _runners(text: str) -> str:
    low = text.strip().lower()
    if low not in ("process", "thread"):
        raise ValueError("expected process or thread")
    return low


def _auth(text: str) -> str:
    low = text.strip().lower()
    if low not in ("auto", "required"):
        raise ValueError("expected auto or required")
    return low


def _choice(*allowed: str, empty: bool = True) -> Callable[[str], str]:
    def parse(text: str) -> str:
        low = text.strip().lower()
        if low not in allowed and not (empty and low == ""):
            raise ValueError(f"expected {' or '.join(allowed)}")
        return low
    return parse


def _accelerators(text: str) -> tuple[str, ...]:
    names = tuple(a.strip().lower() for a in text.split(",") if a.strip())
    bad = [a for a in names if a not in ("npu", "gpu", "cpu")]
    if bad:
        raise ValueError(f"unknown accelerator {bad[0]!r}; use npu, gpu or cpu")
    return names


def _onnx_providers(text: str) -> tuple[str, ...]:
    from slmops.engine.onnx.providers import lookup  # pure: loads no runtime
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    for name in names:
        try:
            lookup(name)
        except ConfigError as err:
            raise ValueError(str(err).removeprefix("unknown ")) from None
    return names


def _quantization(text: str) -> str:
    from slmops.types.quant import FTYPES
    low = text.strip().lower()
    if low not in ("auto", "dynamic", "") and low not in FTYPES:
        raise ValueError(f"expected auto or a type: {', '.join(FTYPES)}")
    return "auto" if low in ("dynamic", "") else low


def parse_size(text: str) -> int:
    """Bytes, as a number or with a unit: 512MiB, 1GiB, 2GB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f'invalid size "{text}": use bytes or a size such as 512MiB or 1GiB')
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit or len(unit) == 1 and unit != "B" else 1000
    return int(float(m.group(1)) * base ** power)


def _gpu_layers(text: str) -> int:
    value = int(text)
    if value < -1:
        raise ValueError("must be -1 (placement decides), 0 or a number of layers")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be a positive duration such as 30m or 1h")
    return value


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(p.strip()).expanduser() for p in text.split(",") if p.strip())


def _store_key(text: str) -> bytes | None:
    from slmops.store.sealed import parse_key
    return parse_key(text) if text.strip() else None


def _origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    default: str
    help: str
    secret: bool = False  # never shown, only whether it is set


SETTINGS: tuple[Setting, ...] = (
    Setting("SLMOPS_HOME", lambda s: Path(s).expanduser(), "~/.slmops", "Root of models, keys and logs."),
    Setting("SLMOPS_HOST", _host, f"127.0.0.1:{API_PORT}", "Address the server binds and the CLI talks to."),
    Setting("SLMOPS_KEEP_ALIVE", parse_duration, "5m", "How long an idle model stays loaded (0 unloads, <0 forever)."),
    Setting("SLMOPS_CONTEXT_LENGTH", _positive_int, "4096", "Default num_ctx when a request sets none."),
    Setting("SLMOPS_NUM_THREADS", _positive_int, "0", "Threads for generation; 0 picks the physical core count."),
    Setting("SLMOPS_MAX_LOADED_MODELS", _at_least_one, "3", "Models kept loaded at once; the least recently used goes."),
    Setting("SLMOPS_NUM_PARALLEL", _positive_int, "0",
            "Sequences each model decodes together (continuous batching); 0 picks from free memory, at most 8."),
    Setting("SLMOPS_RUNNERS", _runners, "process",
            "Where the server runs models: process (one crash-isolated runner per model) or thread (in the server)."),
    Setting("SLMOPS_MAX_QUEUE", _positive_int, "512", "Requests that may wait per model before new ones get 503."),
    Setting("SLMOPS_ORIGINS", _origins, "", "Extra CORS origins (comma-separated) besides the local ones."),
    Setting("SLMOPS_MAX_REQUEST_BYTES", _at_least_one, "16777216", "Largest JSON request body; bigger ones get 413."),
    Setting("SLMOPS_MAX_BLOB_SIZE", parse_size, "64GiB", "Largest blob /api/blobs accepts; bigger uploads get 413."),
    Setting("SLMOPS_DEBUG", _bool, "false", "Show llama.cpp logs and tracebacks."),
    Setting("SLMOPS_AUTH", _auth, "auto",
            "API keys: auto (required once a key exists, or off loopback) or required (always, even on loopback)."),
    Setting("SLMOPS_RATE_LIMIT", _positive_int, "0", "Requests per minute per API key; 0: no limit."),
    Setting("SLMOPS_TOKEN_LIMIT", _positive_int, "0", "Prompt+completion tokens per minute per API key; 0: no limit."),
    Setting("SLMOPS_AUDIT", _bool, "true", "Write the audit log (SLMOPS_HOME/audit/audit.log)."),
    Setting("SLMOPS_AUDIT_KEY", _optional_path, "", "File holding a secret; audit records then carry an HMAC."),
    Setting("SLMOPS_AUDIT_CONTENT", _bool, "false", "Also log prompts and completions in the audit log."),
    Setting("SLMOPS_AUDIT_MAX_BYTES", _at_least_one, "67108864", "Audit file size at which it rotates."),
    Setting("SLMOPS_ALLOW_PRIVATE_REGISTRIES", _bool, "false",
            "Allow pulls from registry hosts on private, loopback or link-local addresses."),
    Setting("SLMOPS_REGISTRY_USERNAME", str, "",
            "User name `slmops pull` offers the registry it names when asked (SLMOPS_HOME/registries.json: per host)."),
    Setting("SLMOPS_REGISTRY_PASSWORD", lambda s: s or None, "", "Password (or token) for SLMOPS_REGISTRY_USERNAME.",
            secret=True),
    Setting("SLMOPS_CA_BUNDLE", _optional_path, "",
            "PEM file of extra CA certificates trusted for registries, besides the system's."),
    Setting("SLMOPS_TRUSTED_KEYS", _paths, "",
            "Public keys (PEM, comma-separated): models must be signed by one to be pulled, created from or loaded."),
    Setting("SLMOPS_API_KEY", str, "", "The key the CLI sends to a server that requires one (slmops ps)."),
    Setting("SLMOPS_TLS_CERT", _optional_path, "", "PEM certificate: serve HTTPS (with SLMOPS_TLS_KEY)."),
    Setting("SLMOPS_TLS_KEY", _optional_path, "", "PEM private key of SLMOPS_TLS_CERT."),
    Setting("SLMOPS_STORE_KEY", _store_key, "",
            "256-bit key (64 hex digits, `openssl rand -hex 32`): new blobs are stored encrypted (AES-256-GCM).",
            secret=True),
    Setting("SLMOPS_STORE_KEY_FILE", _optional_path, "", "File holding SLMOPS_STORE_KEY, instead of the variable."),
    Setting("SLMOPS_CONFIG", _optional_path, "", "Deployment config (YAML or JSON); SLMOPS_* variables override it."),
    Setting("SLMOPS_MODEL", str, "", "Model serve loads at start (pulled first if it is a catalog model)."),
    Setting("SLMOPS_HARDWARE_PREFERRED", _choice("npu", "gpu", "cpu"), "",
            "Accelerator a pull prefers when a model has variants (npu, gpu, cpu)."),
    Setting("SLMOPS_HARDWARE_FALLBACK", _accelerators, "",
            "Accelerators to fall back to, in order (comma-separated); empty: npu, gpu, cpu."),
    Setting("SLMOPS_QUANTIZATION", _quantization, "auto",
            "Variant a pull prefers by quantization type (q8_0, f16 ...); auto: the hardware order decides."),
    Setting("SLMOPS_ONNX_PROVIDERS", _onnx_providers, "",
            "ONNX Runtime execution providers to try, in order (cuda,cpu); empty: NPU, then GPU, then CPU, from those present."),
    Setting("SLMOPS_NUM_BATCH", _positive_int, "0", "Prompt tokens per decode step; 0: placement decides."),
    Setting("SLMOPS_NUM_GPU", _gpu_layers, "-1", "Layers offloaded to the GPU; -1: placement decides (all if one fits)."),
    Setting("SLMOPS_KV_CACHE_TYPE", _choice("f16", "q8_0"), "", "KV cache type, f16 or q8_0; empty: placement decides."),
    Setting("SLMOPS_KV_BUDGET", parse_size, "1GiB", "Memory the KV cache may take when choosing parallel sequences."),
    Setting("SLMOPS_PREFIX_CACHE", parse_size, "64MiB", "Host memory for cached prompt prefixes evicted from the KV cache; 0: none."),
    Setting("SLMOPS_OPENAI_COMPATIBLE", _bool, "true", "Serve the OpenAI-compatible /v1 API beside /api."),
    Setting("SLMOPS_FEEDBACK", _bool, "false", "Collect rated feedback with its prompt and answer text "
            "(/api/feedback; config privacy.feedback); on a fleet device the blueprint decides."),
    Setting("SLMOPS_FLEET_DB", str, "",
            "Fleet control-plane database URL (postgresql+asyncpg://...); empty: SQLite at SLMOPS_HOME/fleet.db."),
    Setting("SLMOPS_FLEET_HOST", lambda s: _host(s, FLEET_PORT), f"127.0.0.1:{FLEET_PORT}",
            "Address `slmops fleet serve` binds and the fleet CLI and agent talk to."),
    Setting("SLMOPS_FLEET_KEY", str, "", "Operator API key the fleet CLI sends to the control plane.", secret=True),
    Setting("SLMOPS_FLEET_TICK", _positive_duration, "1s",
            "How often the control plane judges running rollouts' gates and moves their waves (seconds or 500ms)."),
    Setting("SLMOPS_FLEET_POLL", _positive_duration, "30s",
            "How often devices enrolled with this control plane poll it (told at enrolment; `agent run --poll` "
            "overrides)."),
    Setting("SLMOPS_FLEET_TRUSTED_KEYS", _paths, "",
            "Public keys (PEM, comma-separated) whose signatures the control plane accepts on release variants."),
    Setting("SLMOPS_FLEET_ROOT_KEY", _optional_path, "",
            "The fleet's root signing key (made on the control plane's first start); empty: SLMOPS_HOME/fleet-root.key."),
    Setting("SLMOPS_FLEET_METADATA_TTL", _positive_duration, "1h",
            "How long signed desired state stays valid; the control plane re-issues it when half is left."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def default(name: str) -> Any:
    """The parsed default of a ``SLMOPS_*`` setting: the one definition that code deeper down (dataclass defaults
    such as ``EngineConfig.max_queue``) refers to, rather than repeating the value."""
    setting = _BY_NAME[name]
    return setting.parse(setting.default)


@dataclass(frozen=True)
class Settings:
    """Effective configuration: values plus where each came from (``env`` or ``default``)."""

    values: Mapping[str, Any]
    origins: Mapping[str, str]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, config: Mapping[str, str] | None = None,
                 config_name: str = "config") -> "Settings":
        """Environment first, then a deployment config's values (``config``, named ``config_name`` in origins),
        then defaults."""
        env = os.environ if env is None else env
        config = config or {}
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for s in SETTINGS:
            raw = env.get(s.name)
            if raw not in (None, ""):
                origin, text = "env", raw
            elif s.name in config:
                origin, text = f"config:{config_name}", config[s.name]
            else:
                origin, text = "default", s.default
            try:
                values[s.name] = s.parse(text)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{s.name}={text!r} is invalid: {err}. {s.help}") from None
            origins[s.name] = origin
        return cls(values, origins)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def home(self) -> Path:
        return self.values["SLMOPS_HOME"]

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def describe(self, name: str) -> str:
        return _BY_NAME[name].help
