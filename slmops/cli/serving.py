"""Starting an HTTP server from the CLI, as ``slmops serve`` and ``slmops fleet serve`` both do: the address is
checked first, so that a port in use is one line naming what to change rather than uvicorn's traceback, and
uvicorn runs with the same settings for both."""

from __future__ import annotations

import errno
import socket
from typing import Any

from slmops.types.errors import ConfigError


def check_port(host: str, port: int, change: str) -> None:
    """Fail with one line when ``host:port`` cannot be bound now; ``change`` says how to pick another address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"address {host}:{port} is already in use; stop the other server or {change}"
                                  ) from None
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; {change}") from None


def run_app(app: Any, host: str, port: int, debug: bool, **options: Any) -> None:
    """Serve ``app`` until interrupted: warnings only (everything with ``debug``); uvloop and httptools when they
    are installed (uvicorn's ``auto``). ``options`` go to ``uvicorn.run`` as they are (TLS files, access log…)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="debug" if debug else "warning", **options)
