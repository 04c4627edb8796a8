"""``slmops serve`` and ``slmops ps``: start the HTTP server, or ask a running one what it has loaded."""

from __future__ import annotations

import socket

import httpx

from slmops.cli.common import console, settings, store
from slmops.types.errors import ConfigError, SlmopsError


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == 98:
                raise ConfigError(
                    f"address {host}:{port} is already in use; stop the other server or set SLMOPS_HOST") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; check SLMOPS_HOST") from None


def serve() -> None:
    """Start the server on SLMOPS_HOST (default 127.0.0.1:11434)."""
    import uvicorn

    from slmops.engine.client import EngineConfig
    from slmops.server.app import ServerConfig, create_app
    from slmops.server.runtime import ModelRuntime

    cfg = settings()
    host, port = cfg["SLMOPS_HOST"]
    _check_port(host, port)
    config = EngineConfig(default_ctx=cfg["SLMOPS_CONTEXT_LENGTH"], num_thread=cfg["SLMOPS_NUM_THREADS"],
                          max_loaded=cfg["SLMOPS_MAX_LOADED_MODELS"], verbose=cfg["SLMOPS_DEBUG"],
                          num_parallel=cfg["SLMOPS_NUM_PARALLEL"], max_queue=cfg["SLMOPS_MAX_QUEUE"])
    if cfg["SLMOPS_RUNNERS"] == "process":
        from slmops.engine.process import ProcessEngine
        engine = ProcessEngine(config)
    else:
        from slmops.engine.engine import Engine
        engine = Engine(config)
    s = store()
    runtime = ModelRuntime(s, engine, keep_alive=cfg["SLMOPS_KEEP_ALIVE"])
    server_config = ServerConfig(host=host, origins=cfg["SLMOPS_ORIGINS"], max_request_bytes=cfg["SLMOPS_MAX_REQUEST_BYTES"])
    app = create_app(s, runtime, server_config)
    console.print(f"slmops listening on http://{host}:{port}", markup=False)
    uvicorn.run(app, host=host, port=port, log_level="debug" if cfg["SLMOPS_DEBUG"] else "warning",
                timeout_graceful_shutdown=5)


def base_url() -> str:
    host, port = settings()["SLMOPS_HOST"]
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def ps() -> None:
    """List the models a running server has loaded."""
    url = base_url()
    try:
        models = httpx.get(f"{url}/api/ps", timeout=5).json()["models"]
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
