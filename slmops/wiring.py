"""The wiring: from one :class:`Settings`, the pieces the CLI, the server and the Python API run on.

    settings ─▶ store ─▶ placement ─▶ engine config ─▶ engine ─▶ runtime ─▶ server app

Every ``SLMOPS_*`` value the running system uses is read here and handed down as a plain value: nothing deeper reads
the environment, and nothing here writes it. A runner process gets what it needs in its :class:`EngineConfig`, so a
deployment config given with ``--config`` reaches it without being put in ``os.environ``.

Side effects are arguments: the environment (``env``), the hardware probe (``detect``) and the runner factory
(``start``). Importing this module loads neither llama.cpp nor the web stack; each builder imports what it builds.
The CLI (:mod:`slmops.cli.common`, :mod:`slmops.cli.serve`) adds argument parsing and printing; the Python API
(:mod:`slmops.local`) adds its own arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from slmops.config.settings import Settings, default
from slmops.store.store import Store
from slmops.types.errors import ConfigError, SlmopsError
from slmops.types.name import ModelName

if TYPE_CHECKING:
    from fastapi import FastAPI

    from slmops.engine.client import EngineClient, EngineConfig, ModelSpec
    from slmops.engine.process import RunnerProcess
    from slmops.ops.hw import Hardware
    from slmops.ops.placement import Placement
    from slmops.security.audit import AuditLog
    from slmops.security.keys import KeyStore
    from slmops.server.access import AccessPolicy
    from slmops.server.app import ServerConfig
    from slmops.server.runtime import ModelRuntime


# -- settings and store ----------------------------------------------------------------------------------------
def read_settings(env: Mapping[str, str] | None = None, config: Path | None = None) -> Settings:
    """``SLMOPS_*`` from ``env`` (default: this process's environment) over the deployment config named by
    ``config`` (``--config FILE``), else by ``SLMOPS_CONFIG``."""
    env = dict(os.environ if env is None else env)
    if config is not None:
        env["SLMOPS_CONFIG"] = str(config)  # a copy: the flag shows in `slmops env` as the variable would
    base = Settings.from_env(env)
    path = base["SLMOPS_CONFIG"]
    if path is None:
        return base
    from slmops.config.deploy import load_deploy, to_settings
    return Settings.from_env(env, config=to_settings(load_deploy(path)), config_name=path.name)


def open_store(cfg: Settings, home: str | Path | None = None) -> Store:
    """The store under ``home`` (default: ``SLMOPS_HOME``), with the registry, signature, encryption and variant
    policies of the settings (``SLMOPS_ALLOW_PRIVATE_REGISTRIES``, ``SLMOPS_TRUSTED_KEYS``, ``SLMOPS_STORE_KEY``,
    ``SLMOPS_HARDWARE_*``, ``SLMOPS_QUANTIZATION``)."""
    root = Path(home).expanduser() if home else cfg.home
    trust = None
    if cfg["SLMOPS_TRUSTED_KEYS"]:
        from slmops.security.signing import TrustPolicy
        trust = TrustPolicy(list(cfg["SLMOPS_TRUSTED_KEYS"]))
    from slmops.ops.variants import MachinePolicy
    variants = MachinePolicy(cfg["SLMOPS_HARDWARE_PREFERRED"] or None, cfg["SLMOPS_HARDWARE_FALLBACK"],
                             quantization=cfg["SLMOPS_QUANTIZATION"])
    return Store(root / "models", allow_internal_registries=cfg["SLMOPS_ALLOW_PRIVATE_REGISTRIES"], trust=trust,
                 key=store_key(cfg), variants=variants)


def store_key(cfg: Settings) -> bytes | None:
    """``SLMOPS_STORE_KEY``, or the key in ``SLMOPS_STORE_KEY_FILE``; both set is a mistake worth stopping on."""
    from slmops.store.sealed import parse_key

    key, file = cfg["SLMOPS_STORE_KEY"], cfg["SLMOPS_STORE_KEY_FILE"]
    if file is None:
        return key
    if key is not None:
        raise ConfigError("SLMOPS_STORE_KEY and SLMOPS_STORE_KEY_FILE are both set; keep one")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"SLMOPS_STORE_KEY_FILE: cannot read the key file ({getattr(err, 'strerror', err)}); "
                          "fix the path") from None
    return parse_key(text, "SLMOPS_STORE_KEY_FILE")


# -- engine ----------------------------------------------------------------------------------------------------
def placement(cfg: Settings, store: Store | None, detect: "Callable[[], Hardware] | None" = None) -> "Placement":
    """Placement for this machine (``detect``: the hardware probe); when the served model (``SLMOPS_MODEL``) is
    already in ``store``, its size and the KV budget let placement check that they fit in GPU memory before
    choosing the GPU."""
    from slmops.ops.placement import place
    if detect is None:
        from functools import partial

        from slmops.ops.hw import detect as probe
        detect = partial(probe, runtimes=False)
    return place(detect(), model_bytes=_stored_size(store, cfg["SLMOPS_MODEL"]), kv_bytes=cfg["SLMOPS_KV_BUDGET"])


def _served_spec(store: Store, model: str) -> "ModelSpec | None":
    """The model the server loads at start (``SLMOPS_MODEL``), when it is stored already."""
    from slmops.engine.client import spec_from_store
    if not model:
        return None
    try:
        return spec_from_store(store, ModelName.parse(model))
    except SlmopsError:  # not pulled yet (the server pulls it), or not a valid name (the server says so)
        return None


def _stored_size(store: Store | None, model: str) -> int | None:
    if store is None or not model:
        return None
    try:
        return store.record(ModelName.parse(model)).size
    except SlmopsError:  # not pulled yet, or not a valid name (serve reports that itself)
        return None


# EngineConfig fields placement chooses, and the settings that override its choice when they leave their default.
_PLACED = {"num_thread": "SLMOPS_NUM_THREADS", "num_parallel": "SLMOPS_NUM_PARALLEL", "num_batch": "SLMOPS_NUM_BATCH",
           "num_gpu": "SLMOPS_NUM_GPU", "kv_type": "SLMOPS_KV_CACHE_TYPE"}


def engine_config(cfg: Settings, placed: "Placement | None") -> "EngineConfig":
    """Engine settings for the server's runners and the CLI's in-process engine alike: placement's choices for
    this machine, except where a ``SLMOPS_*`` setting (or the deployment config) says otherwise. Without a
    placement (the Python API), what placement would choose keeps the engine's defaults unless a setting is given."""
    from slmops.engine.client import EngineConfig
    fields = placed.as_config_fields() if placed is not None else {}
    for field_name, setting in _PLACED.items():
        if cfg[setting] != default(setting):
            fields[field_name] = cfg[setting]
    return EngineConfig(default_ctx=cfg["SLMOPS_CONTEXT_LENGTH"], max_loaded=cfg["SLMOPS_MAX_LOADED_MODELS"],
                        verbose=cfg["SLMOPS_DEBUG"], max_queue=cfg["SLMOPS_MAX_QUEUE"],
                        kv_budget=cfg["SLMOPS_KV_BUDGET"], prefix_cache=cfg["SLMOPS_PREFIX_CACHE"],
                        onnx_providers=cfg["SLMOPS_ONNX_PROVIDERS"], **fields)


def engine(cfg: Settings, config: "EngineConfig",
           start: "Callable[[str, EngineConfig], RunnerProcess] | None" = None) -> "EngineClient":
    """The server's engine, as ``SLMOPS_RUNNERS`` says: one runner process per model (``start`` makes one; each
    gets ``config``, nothing from the environment, and the first takes over the runner ``slmops serve`` booted
    ahead, if any), or models in this process (``thread``: a runner booted ahead is stopped)."""
    from slmops.engine import process
    if cfg["SLMOPS_RUNNERS"] == "process":
        return process.ProcessEngine(config, start or process.RunnerProcess)
    from slmops.engine.spawn import discard_booted
    discard_booted()
    from slmops.engine.engine import Engine  # llama.cpp loads here
    return Engine(config)


# -- server ----------------------------------------------------------------------------------------------------
def key_store(cfg: Settings) -> "KeyStore":
    from slmops.security.keys import KeyStore
    return KeyStore(cfg.home / "keys.json")


def audit_log(cfg: Settings) -> "AuditLog | None":
    """The audit log as configured, or None with ``SLMOPS_AUDIT=false``."""
    from slmops.security.audit import AuditLog
    if not cfg["SLMOPS_AUDIT"]:
        return None
    key = None
    if cfg["SLMOPS_AUDIT_KEY"] is not None:
        try:
            key = cfg["SLMOPS_AUDIT_KEY"].read_bytes().strip()
        except OSError as err:
            raise ConfigError(f"SLMOPS_AUDIT_KEY: cannot read the key file ({err.strerror}); fix the path") from None
        if len(key) < 16:
            raise ConfigError("SLMOPS_AUDIT_KEY: the key file must hold at least 16 bytes of secret")
    return AuditLog(cfg.home / "audit" / "audit.log", key, cfg["SLMOPS_AUDIT_MAX_BYTES"])


def access_policy(cfg: Settings, keys: "KeyStore") -> "AccessPolicy":
    """API keys, rate limits and the audit log, as the settings say."""
    from slmops.security.limits import RateLimiter
    from slmops.server.access import AccessPolicy
    return AccessPolicy(keys, required=cfg["SLMOPS_AUTH"] == "required",
                        limiter=RateLimiter(cfg["SLMOPS_RATE_LIMIT"], cfg["SLMOPS_TOKEN_LIMIT"]),
                        audit=audit_log(cfg), audit_content=cfg["SLMOPS_AUDIT_CONTENT"])


def server_config(cfg: Settings) -> "ServerConfig":
    from slmops.server.app import ServerConfig
    return ServerConfig(host=cfg["SLMOPS_HOST"][0], origins=cfg["SLMOPS_ORIGINS"],
                        max_request_bytes=cfg["SLMOPS_MAX_REQUEST_BYTES"], max_blob_bytes=cfg["SLMOPS_MAX_BLOB_SIZE"],
                        openai=cfg["SLMOPS_OPENAI_COMPATIBLE"], preload=cfg["SLMOPS_MODEL"] or None, home=cfg.home,
                        feedback=cfg["SLMOPS_FEEDBACK"], ca_bundle=cfg["SLMOPS_CA_BUNDLE"])


def runtime(cfg: Settings, store: Store, engine: "EngineClient") -> "ModelRuntime":
    """The server's model runtime over ``engine``, with the slot table in ``SLMOPS_HOME`` and its own metrics."""
    from slmops.server.runtime import ModelRuntime
    from slmops.server.slots import SlotTable
    return ModelRuntime(store, engine, keep_alive=cfg["SLMOPS_KEEP_ALIVE"],
                        slots=SlotTable.load(cfg.home / "slots.json"))


@dataclass(frozen=True)
class Listen:
    """Where and how the server listens."""

    host: str
    port: int
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


def listen(cfg: Settings, keys: "KeyStore", tls_cert: Path | None = None, tls_key: Path | None = None,
           insecure: bool = False) -> Listen:
    """The server's address and TLS files (flags over ``SLMOPS_TLS_*``), refused with one line when serving there
    would be unsafe (a non-loopback address without API keys, unless ``insecure``) or the TLS files are wrong."""
    from slmops.server.guards import is_loopback
    host, port = cfg["SLMOPS_HOST"]
    if not is_loopback(host) and not keys and not insecure:
        raise ConfigError(f"refusing to serve on {host} without API keys: anyone who can reach it could use and "
                          "change your models. Create one with `slmops keys create --name NAME --role user`, or "
                          "pass --insecure")
    tls_cert, tls_key = tls_cert or cfg["SLMOPS_TLS_CERT"], tls_key or cfg["SLMOPS_TLS_KEY"]
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key (or SLMOPS_TLS_CERT and SLMOPS_TLS_KEY)")
    for p in (tls_cert, tls_key):
        if p is not None and not p.is_file():
            raise ConfigError(f"TLS file {p} does not exist or is not a file")
    return Listen(host, port, tls_cert, tls_key)


@dataclass
class Server:
    """``slmops serve``'s application and what its start-up reports."""

    app: "FastAPI"
    access: "AccessPolicy"
    placement: "Placement"


@dataclass
class Serving:
    """The server's engine, started: where it places models, and the engine with its first runner."""

    placement: "Placement"
    engine: "EngineClient"


def serving(cfg: Settings, store: Store, detect: "Callable[[], Hardware] | None" = None,
            start: "Callable[[str, EngineConfig], RunnerProcess] | None" = None) -> Serving:
    """Placement and the server's engine, its first runner started and, when ``SLMOPS_MODEL`` is stored, loading
    it: ``slmops serve`` calls this before it imports the web stack, so the load runs while the server imports."""
    placed = placement(cfg, store, detect)
    models = engine(cfg, engine_config(cfg, placed), start)
    models.prestart(_served_spec(store, cfg["SLMOPS_MODEL"]))
    return Serving(placed, models)


def server(cfg: Settings, keys: "KeyStore", store: Store | None = None,
           detect: "Callable[[], Hardware] | None" = None,
           start: "Callable[[str, EngineConfig], RunnerProcess] | None" = None,
           started: Serving | None = None) -> Server:
    """The whole server from the settings: store, placement and engine (or ``started``, from :func:`serving`),
    runtime, access policy and app, with OpenTelemetry traces when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""
    store = store or open_store(cfg)
    started = started or serving(cfg, store, detect, start)
    from slmops.server.app import create_app
    from slmops.server.tracing import from_env as tracing
    access = access_policy(cfg, keys)
    app = create_app(store, runtime(cfg, store, started.engine), server_config(cfg), access=access,
                     tracing=tracing(os.environ))  # OTEL_* are OpenTelemetry's own; its SDK reads the rest itself
    return Server(app, access, started.placement)
