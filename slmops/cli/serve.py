"""``slmops serve`` and ``slmops ps``: start the HTTP server, or ask a running one what it has loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import httpx
import typer

from slmops.cli.common import (audit_log, console, engine_config, err_console, key_store, placement, settings,
                               store, use_config)
from slmops.cli.serving import check_port, run_app
from slmops.types.errors import ConfigError, SlmopsError


def serve(
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS "
                                            "(or SLMOPS_TLS_CERT)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key (or SLMOPS_TLS_KEY)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback address without API keys."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Deployment config, YAML or JSON "
                                               "(or SLMOPS_CONFIG); SLMOPS_* variables override it."),
) -> None:
    """Start the server on SLMOPS_HOST (default 127.0.0.1:11434)."""
    from slmops.security.limits import RateLimiter
    from slmops.server.access import AccessPolicy
    from slmops.server.app import ServerConfig, create_app, is_loopback
    from slmops.server.runtime import ModelRuntime

    use_config(config_file)
    cfg = settings()
    host, port = cfg["SLMOPS_HOST"]
    keys = key_store()
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
    check_port(host, port, "set SLMOPS_HOST")
    access = AccessPolicy(keys, required=cfg["SLMOPS_AUTH"] == "required",
                          limiter=RateLimiter(cfg["SLMOPS_RATE_LIMIT"], cfg["SLMOPS_TOKEN_LIMIT"]),
                          audit=audit_log(), audit_content=cfg["SLMOPS_AUDIT_CONTENT"])
    _log_config(cfg)
    placed = placement()
    config = engine_config(placed)
    err_console.print(f"{placed.summary()} ({'; '.join(placed.reasons)})", markup=False, soft_wrap=True)
    if cfg["SLMOPS_RUNNERS"] == "process":
        from slmops.engine.process import ProcessEngine
        engine = ProcessEngine(config)
    else:
        from slmops.engine.engine import Engine
        engine = Engine(config)
    s = store()
    runtime = ModelRuntime(s, engine, keep_alive=cfg["SLMOPS_KEEP_ALIVE"])
    server_config = ServerConfig(host=host, origins=cfg["SLMOPS_ORIGINS"], max_request_bytes=cfg["SLMOPS_MAX_REQUEST_BYTES"],
                                 max_blob_bytes=cfg["SLMOPS_MAX_BLOB_SIZE"],
                                 openai=cfg["SLMOPS_OPENAI_COMPATIBLE"], preload=cfg["SLMOPS_MODEL"] or None,
                                 home=cfg.home, feedback=cfg["SLMOPS_FEEDBACK"])
    app = create_app(s, runtime, server_config, access=access)
    if not is_loopback(host) and not keys:
        err_console.print(f"WARNING: serving on {host} without API keys (--insecure): anyone who can reach this "
                          "address can use and change your models", markup=False)
    scheme = "https" if tls_cert else "http"
    auth = "API keys required" if access.auth_on() else "no API keys (loopback)"
    console.print(f"slmops listening on {scheme}://{host}:{port} ({auth})", markup=False)
    run_app(app, host, port, cfg["SLMOPS_DEBUG"], timeout_graceful_shutdown=5,
            ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None)


def _log_config(cfg) -> None:  # type: ignore[no-untyped-def]
    """Which settings the deployment config supplied, and which the environment overrode."""
    path = cfg["SLMOPS_CONFIG"]
    if path is None:
        return
    from slmops.config.deploy import load_deploy, to_settings
    given = to_settings(load_deploy(path))
    overridden = sorted(n for n in given if cfg.origins[n] == "env")
    tail = f"; overridden by env: {', '.join(overridden)}" if overridden else ""
    err_console.print(f"config: {path} ({len(given)} settings{tail})", markup=False, soft_wrap=True)


def base_url() -> str:
    host, port = settings()["SLMOPS_HOST"]
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def ps() -> None:
    """List the models a running server has loaded."""
    url = base_url()
    try:
        key = settings()["SLMOPS_API_KEY"]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{url}/api/ps", timeout=5, headers=headers, verify=False)
        if r.status_code in (401, 403):
            raise SlmopsError(f"the server at {url} refused: {r.json().get('error')}; set SLMOPS_API_KEY")
        models = r.json()["models"]
    except httpx.HTTPError:
        raise SlmopsError(
            f"could not connect to a running slmops server at {url}; start one with `slmops serve`") from None
    rows = [("NAME", "ID", "SIZE", "CONTEXT", "UNTIL")]
    for m in models:
        rows.append((m["name"], m.get("digest", "")[:12], f"{m.get('size', 0) / 1e6:.0f} MB",
                     str(m.get("context_length", "")), m.get("expires_at", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        console.print("    ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), markup=False)
