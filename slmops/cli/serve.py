"""``slmops serve`` and ``slmops ps``: start the HTTP server, or ask a running one what it has loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmops import wiring
from slmops.cli.common import console, err_console, key_store, print_table, settings, store, use_config
from slmops.cli.serving import listening_socket, run_app
from slmops.types.errors import SlmopsError


def serve(
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS "
                                            "(or SLMOPS_TLS_CERT)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key (or SLMOPS_TLS_KEY)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback address without API keys."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Deployment config, YAML or JSON "
                                               "(or SLMOPS_CONFIG); SLMOPS_* variables override it."),
) -> None:
    """Start the server on SLMOPS_HOST (default 127.0.0.1:11434)."""
    use_config(config_file)
    cfg = settings()
    keys = key_store()
    stored = store()
    # The engine first, its runner loading SLMOPS_MODEL while what follows imports the web stack (should the checks
    # refuse, the runner exits with this process); then the socket, where a request sent meanwhile waits its turn.
    started = wiring.serving(cfg, stored)
    where = wiring.listen(cfg, keys, tls_cert, tls_key, insecure)
    sock = listening_socket(where.host, where.port, "set SLMOPS_HOST")
    _log_config(cfg)
    built = wiring.server(cfg, keys, stored, started=started)
    from slmops.server.guards import is_loopback

    placed = built.placement
    err_console.print(f"{placed.summary()} ({'; '.join(placed.reasons)})", markup=False, soft_wrap=True)
    if not is_loopback(where.host) and not keys:
        err_console.print(f"WARNING: serving on {where.host} without API keys (--insecure): anyone who can reach "
                          "this address can use and change your models", markup=False)
    auth = "API keys required" if built.access.auth_on() else "no API keys (loopback)"
    console.print(f"slmops listening on {where.scheme}://{where.host}:{where.port} ({auth})", markup=False)
    run_app(built.app, where.host, where.port, cfg["SLMOPS_DEBUG"], sock, timeout_graceful_shutdown=5,
            ssl_certfile=str(where.tls_cert) if where.tls_cert else None,
            ssl_keyfile=str(where.tls_key) if where.tls_key else None)


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
    import httpx  # only here: `slmops serve` starts faster without it

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
    print_table(rows)
    for m in models:
        if m.get("fallback"):
            console.print(f"{m['name']}: {m['fallback']}", markup=False, soft_wrap=True)
