"""Checks every request passes before any handler runs, as raw ASGI middlewares: what its headers alone condemn
(a Host that is not loopback, bytes that are not UTF-8), where it comes from (a web page's origin), and its body
(size, Unicode). Each refusal is an error in its API's shape, built by :mod:`slmops.server.errors`.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket

from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from slmops.server import errors

LOCAL_ORIGINS = r"(https?|app|file|tauri|vscode-webview)://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:\d+)?|" \
                r"(app|file|tauri|vscode-webview)://.*"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_allowed(header: str, extra: tuple[str, ...]) -> bool:
    """Names a browser may legitimately use for a loopback server; anything else is a rebinding attempt."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    if not host or is_loopback(host) or host.endswith(".localhost"):
        return True
    return host in extra or host == socket.gethostname().lower()


class HeaderCheck:
    """What the headers alone condemn. Bound to loopback, answer only loopback names: a page on another site
    cannot rebind its name to us. Header values must be UTF-8: every layer after this one may decode them."""

    def __init__(self, app: ASGIApp, bound_to: str, extra_hosts: tuple[str, ...] = ()):
        self.app = app
        self.extra_hosts = extra_hosts
        self.check_host = is_loopback(bound_to)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                try:
                    value.decode()
                except UnicodeDecodeError:
                    header = name.decode("latin-1")[:40]
                    return await _reject(scope, receive, send, 400, f"header {header} is not valid UTF-8; send "
                                         "its value as UTF-8 text")
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            if self.check_host and not _host_allowed(host, self.extra_hosts):
                return await _reject(scope, receive, send, 403, "host not allowed: this server answers only "
                                     "loopback names (DNS rebinding protection)")
        await self.app(scope, receive, send)


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class OriginCheck(CORSMiddleware):
    """CORS that refuses, not only hides. A browser sends a "simple" cross-site request (a ``text/plain`` POST)
    without asking first, and CORS alone would only keep the answer from the page after the request ran: any web
    page could create, copy, pull or delete models. A request from an origin that is not allowed is a 403 before
    any handler runs (as Ollama does), and a browser's request with a body must be ``application/json`` (which a
    browser cannot send cross-site without the preflight this refuses). Clients that are not browsers send no
    ``Origin``, and keep Ollama's leniency: ``curl -d`` posts JSON with a form type."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers", []))
            origin = headers.get(b"origin")
            if origin is not None:
                shown = origin.decode()
                if not self.is_allowed_origin(shown):
                    return await _reject(scope, receive, send, 403, f'origin "{shown[:100]}" is not allowed; add it '
                                         "to SLMOPS_ORIGINS to let pages from it call this server")
            browser = origin is not None or b"sec-fetch-site" in headers
            if browser and scope["method"] in _BODY_METHODS and not scope.get("path", "").startswith("/api/blobs/"):
                kind = headers.get(b"content-type", b"").decode().split(";")[0].strip().lower()
                if kind != "application/json":
                    return await _reject(scope, receive, send, 415, "a request from a browser must send "
                                         "Content-Type: application/json")
        await super().__call__(scope, receive, send)


# A UTF-16 surrogate escape without its partner, or a surrogate encoded in UTF-8 bytes (which Python's JSON decoder
# passes through): either makes a string that cannot be encoded again, so every later layer would fail on it.
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|"
                             rb"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")


def _has_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _surrogate_in(body: bytes) -> bool:
    """Exact, but parses only bodies the pattern flags (an escaped backslash can make it flag valid text)."""
    if not _LONE_SURROGATE.search(body):
        return False
    try:
        return _has_surrogate(json.loads(body))
    except (ValueError, RecursionError):
        return False  # not JSON: the route's own parsing answers it


class BodyLimit:
    """Request-size limit, as raw ASGI so oversized bodies are refused before buffering; and text that is not
    Unicode (a lone surrogate) is refused here, once, rather than failing wherever it is encoded later."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path.startswith("/api/blobs/"):
            return await self.app(scope, receive, send)
        if headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # Ollama reads every body as JSON whatever its Content-Type (curl -d sends a form type)
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        limit = self.limit
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reject(scope, receive, send, 413, f"request body is larger than {limit} bytes")
        body = bytearray()
        while True:  # JSON bodies are read whole anyway; reading them here lets a chunked one be cut off at the limit
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                return await _reject(scope, receive, send, 413, f"request body is larger than {limit} bytes")
            if not message.get("more_body", False):
                break
        if _surrogate_in(bytes(body)):
            return await _reject(scope, receive, send, 400, "request text holds an unpaired UTF-16 surrogate (such "
                                 "as \\ud800), which is not Unicode; send valid text")
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reject(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    await errors.response(scope.get("path", ""), status, message)(scope, receive, send)
