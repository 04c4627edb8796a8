"""Who may call what, how often, and the record of it: API-key authentication, role checks from the one route
table (:mod:`slmops.security.roles`), per-key rate limits, and one audit record per request.

Two steps. The middleware (raw ASGI, outside body reading) authenticates: without a valid key a request is
refused before its body is read, and rate limits apply. The role check needs the matched route, so it is an
app-wide dependency (:func:`authorize`) that runs once routing is done and before the body is validated. Handlers
and the runtime add what only they know (the model, token counts, content when content logging is on) to the
request's :class:`RequestContext`, found through a context variable; the record is written when the response
has been sent, streamed ones included, so it carries the final status and token counts.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops.security import roles
from slmops.security.audit import AuditLog
from slmops.security.keys import KeyStore
from slmops.security.limits import RateLimiter, retry_after
from slmops.server import errors
from slmops.types.errors import Forbidden

log = logging.getLogger("slmops.server")


@dataclass
class AccessPolicy:
    keys: KeyStore
    required: bool = False  # SLMOPS_AUTH=required: keys even on loopback
    limiter: RateLimiter = field(default_factory=RateLimiter)
    audit: AuditLog | None = None
    audit_content: bool = False

    def auth_on(self) -> bool:
        return self.required or bool(self.keys)


@dataclass
class RequestContext:
    request_id: str
    method: str
    route: str
    client: str
    key: str = "-"
    role: str = "local"  # auth off: local use, every right
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    content: dict[str, Any] | None = None  # only with SLMOPS_AUDIT_CONTENT=1
    limit_id: str = ""  # whose rate-limit buckets this request draws on
    tokens_per_minute: int = 0  # the key's own token limit (0: the server's)

    def can(self, permission: str) -> bool:
        return self.role == "local" or roles.allowed(self.role, permission)


CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("slmops_request", default=None)


def current() -> RequestContext | None:
    return CURRENT.get()


def require(permission: str, what: str) -> None:
    """For rights that depend on the body, not the route (an explicit load or unload needs ``manage``)."""
    ctx = CURRENT.get()
    if ctx is not None and not ctx.can(permission):
        raise Forbidden(f'role "{ctx.role}" may not {what}; use a key with the operator or admin role')


async def authorize(request: Request) -> None:
    """The role check, once the route is known: its permission comes from the one table."""
    ctx = CURRENT.get()
    route = request.scope.get("route")
    if ctx is None or route is None:
        return
    ctx.route = route.path
    needed = roles.permission(request.method, route.path)
    if not ctx.can(needed):
        raise Forbidden(f'role "{ctx.role}" may not call {request.method} {route.path}; use a key with a role '
                        "that allows it")


class Access:
    def __init__(self, app: ASGIApp, policy: AccessPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope.get("path", "")
        needed = roles.PUBLIC if path in roles.PUBLIC_PATHS else None
        client = (scope.get("client") or ("-", 0))[0]
        ctx = RequestContext(uuid.uuid4().hex[:16], method, path, client)
        token = CURRENT.set(ctx)
        reply = {"status": 0, "length": -1, "sent": 0, "audited": False}
        t0 = time.perf_counter()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply["status"] = message["status"]
                headers = message.setdefault("headers", [])
                length = dict(headers).get(b"content-length")
                reply["length"] = int(length) if length is not None else -1
                headers.append((b"x-request-id", ctx.request_id.encode()))
            elif message["type"] == "http.response.body" and not reply["audited"]:
                reply["sent"] += len(message.get("body", b""))
                # Audited before the last byte leaves: a client that holds its reply finds the record. With a
                # Content-Length, the last byte may come before the message that ends the body.
                if not message.get("more_body", False) or reply["sent"] >= reply["length"] >= 0:
                    reply["audited"] = True
                    self._finish(ctx, reply["status"], t0, needed)
            await send(message)

        try:
            refusal = self._check(scope, ctx, needed)
            if refusal is not None:
                return await refusal(scope, receive, sending)
            if self.policy.audit_content and method == "POST":
                receive = self._capturing(receive, ctx)
            await self.app(scope, receive, sending)
        finally:
            CURRENT.reset(token)

    def _check(self, scope: Scope, ctx: RequestContext, needed: str | None):
        path = scope.get("path", "")
        if self.policy.auth_on() and needed != roles.PUBLIC:
            auth = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
            scheme, _, presented = auth.partition(" ")
            key = self.policy.keys.authenticate(presented) if scheme.lower() == "bearer" else None
            if key is None:
                return errors.response(path, 401, "a valid API key is required: send Authorization: Bearer <key> "
                                         "(create one with `slmops keys create`)",
                                       headers=[(b"www-authenticate", b'Bearer realm="slmops"')])
            ctx.key, ctx.role = key.name, key.role
            ctx.limit_id, ctx.tokens_per_minute = key.id, key.tokens_per_minute
            wait = self.policy.limiter.admit(key.id, key.requests_per_minute, key.tokens_per_minute)
        elif needed == roles.PUBLIC:
            return None
        else:
            ctx.limit_id = f"client:{ctx.client}"
            wait = self.policy.limiter.admit(ctx.limit_id)
        if wait:
            return errors.response(path, 429, f"rate limit reached for this key; retry in {retry_after(wait)} s",
                                   headers=[(b"retry-after", retry_after(wait).encode())])
        return None

    def _capturing(self, receive: Receive, ctx: RequestContext) -> Receive:
        body = bytearray()

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    ctx.content = {"request": body.decode("utf-8", "replace")}
            return message
        return wrapped

    def _finish(self, ctx: RequestContext, status: int, t0: float, needed: str | None) -> None:
        if ctx.limit_id:
            self.policy.limiter.spend_tokens(ctx.limit_id, ctx.prompt_tokens + ctx.completion_tokens,
                                             ctx.tokens_per_minute)
        if self.policy.audit is None or needed == roles.PUBLIC:
            return
        record: dict[str, Any] = {
            "key": ctx.key, "role": ctx.role, "client": ctx.client, "method": ctx.method, "route": ctx.route,
            "model": ctx.model, "status": status, "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens, "request_id": ctx.request_id,
            "duration_ms": round((time.perf_counter() - t0) * 1000, 1)}
        if ctx.content is not None:
            record["content"] = ctx.content
        try:
            self.policy.audit.append(**record)
        except OSError as err:  # the request is done; losing its record must be loud, not fatal
            log.error("could not write the audit log: %s", err)
