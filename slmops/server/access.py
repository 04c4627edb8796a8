"""Who may call what, how often, and the record of it: API-key authentication, role checks from the one route
table (:mod:`slmops.security.roles`), per-key rate limits, and one audit record per request.

Three steps. :class:`Recorder`, the outermost middleware, opens the request's :class:`RequestContext` and writes
its audit record once the response is sent, streamed ones included, so the record carries the final status and
token counts; it also answers an unhandled exception itself, so that every response, a 500 or a refusal by
another middleware included, has its record. :class:`Access` (raw ASGI, before the body is read) authenticates:
without a valid key a request is refused before its body is read, and rate limits apply. The role check needs
the matched route, so it is an app-wide dependency (:func:`authorize`) that runs once routing is done and before
the body is validated. Handlers and the runtime add what only they know (the model, token counts, content when
content logging is on) to the request's context, found through a context variable.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops.security import roles
from slmops.security.audit import AuditLog, BatchingWriter
from slmops.security.keys import KeyStore
from slmops.security.limits import RateLimiter, retry_after
from slmops.server import errors
from slmops.types.errors import Forbidden, RateLimited

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
    limiter: RateLimiter | None = None
    charged: int = 0  # tokens already taken from the bucket: reservations, settled when the request ends
    complete: bool = True  # False once cut short: the client left mid-stream, or the app raised
    failure_counted: bool = False  # the model's failure is in the metrics already (counted where it happened)

    def can(self, permission: str) -> bool:
        return self.role == "local" or roles.allowed(self.role, permission)

    def reserve_completion(self, wanted: int, ceiling: int) -> int | None:
        """Reserve completion tokens before a generation starts; returns the cap on what it may generate (None:
        no token limit applies). Raises :class:`RateLimited` when the key's bucket cannot cover it now."""
        if self.limiter is None or not self.limit_id:
            return None
        amount, wait = self.limiter.reserve_tokens(self.limit_id, wanted, ceiling, self.tokens_per_minute)
        if wait:
            raise RateLimited(f"token limit reached for this key; retry in {retry_after(wait)} s", wait)
        if amount:
            self.charged += amount
        return amount

    def settle(self) -> None:
        """Charge what the request used, prompt and completion, less what its reservations already took (a
        negative difference is the refund of reserved tokens it did not generate)."""
        if self.limiter is not None and self.limit_id:
            self.limiter.spend_tokens(self.limit_id, self.prompt_tokens + self.completion_tokens - self.charged,
                                      self.tokens_per_minute)
            self.charged = self.prompt_tokens + self.completion_tokens


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


class Recorder:
    """Outermost: one context and one audit record per request, whatever answers it."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy):
        self.app = app
        self.policy = policy
        self.writer = BatchingWriter(policy.audit) if policy.audit is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope.get("path", "")
        public = path in roles.PUBLIC_PATHS
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
                    await self._finish(ctx, reply["status"], t0, public)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as err:
            if reply["status"]:  # a stream broke after its status line: the connection ends, the record stays
                raise
            log.error("unhandled error on %s %s", method, path, exc_info=err)
            await errors.response(path, 500, "internal server error; see the server log")(scope, receive, sending)
        finally:
            if not reply["audited"]:  # the client left mid-stream, or the app raised
                reply["audited"] = True
                ctx.complete = False
                await self._finish(ctx, reply["status"] or 500, t0, public)
            CURRENT.reset(token)

    async def _finish(self, ctx: RequestContext, status: int, t0: float, public: bool) -> None:
        ctx.settle()
        if self.writer is None or public:
            return
        record: dict[str, Any] = {
            "key": ctx.key, "role": ctx.role, "client": ctx.client, "method": ctx.method, "route": ctx.route,
            "model": ctx.model, "status": status, "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens, "request_id": ctx.request_id,
            "duration_ms": round((time.perf_counter() - t0) * 1000, 1)}
        if not ctx.complete:
            record["complete"] = False
        if ctx.content is not None:
            record["content"] = ctx.content
        try:
            await asyncio.wrap_future(self.writer.submit(record))
        except Exception as err:  # noqa: BLE001 - the request is done; losing its record must be loud, not fatal
            log.error("could not write the audit log: %s", err)


class Access:
    """Authentication and request-rate limits, before the body is read."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = CURRENT.get()
        if scope["type"] != "http" or ctx is None:
            return await self.app(scope, receive, send)
        needed = roles.PUBLIC if scope.get("path", "") in roles.PUBLIC_PATHS else None
        refusal = self._check(scope, ctx, needed)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if self.policy.audit_content and scope["method"] == "POST":
            receive = self._capturing(receive, ctx)
        await self.app(scope, receive, send)

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
        ctx.limiter = self.policy.limiter
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
