"""Starting an HTTP server from the CLI, as ``slmops serve`` and ``slmops fleet serve`` both do: the address is
checked first, so that a port in use is one line naming what to change rather than uvicorn's traceback, and
uvicorn runs with the same settings for both."""

from __future__ import annotations

import errno
import socket
from typing import Any

from slmops.types.errors import ConfigError


def listening_socket(host: str, port: int, change: str) -> socket.socket:
    """A socket listening on ``host:port`` now, or one line naming what to change (``change``) when it cannot be.
    Connections made before the server runs wait in its backlog and are answered once it does, instead of being
    refused while it starts (``slmops serve`` listens before it has loaded its model and imported the web stack)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen(2048)  # uvicorn's own backlog
    except OSError as err:
        s.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"address {host}:{port} is already in use; stop the other server or {change}"
                              ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; {change}") from None
    return s


def check_port(host: str, port: int, change: str) -> None:
    """Fail with one line when ``host:port`` cannot be bound now; ``change`` says how to pick another address."""
    listening_socket(host, port, change).close()


def run_app(app: Any, host: str, port: int, debug: bool, sock: socket.socket | None = None, **options: Any) -> None:
    """Serve ``app`` until interrupted: warnings only (everything with ``debug``); uvloop and httptools when they
    are installed (uvicorn's ``auto``), no WebSockets. ``sock``: a :func:`listening_socket` to serve on (else
    uvicorn binds ``host:port`` itself). ``options`` go to uvicorn's ``Config`` as they are (TLS files, access
    log…)."""
    import uvicorn

    # neither server has a WebSocket route: uvicorn need not import a WebSocket implementation as it starts
    options = {"log_level": "debug" if debug else "warning", "ws": "none", **options}
    if sock is None:
        uvicorn.run(app, host=host, port=port, **options)
        return
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
    try:  # as uvicorn.run does, with the socket given
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if not server.started:
        raise SystemExit(3)  # uvicorn's exit status when the app fails to start
