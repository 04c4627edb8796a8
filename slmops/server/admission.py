"""What a caller may decide about a model every caller shares.

Keep-alive and load settings act on a model every caller shares, so they are the operator's: a caller without the
manage right gets the server's keep-alive whatever it asks, and its load options are clamped to the operator's
configuration (the Modelfile's, else the server's), so it can never force a reload. A generation's completion
tokens are reserved from the caller's token bucket before it starts. Without a request context (the Python API,
tests of other layers) everything is allowed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from slmops.engine.client import ModelSpec, Request
from slmops.security import roles
from slmops.server import access
from slmops.server.keepalive import keep_alive_seconds
from slmops.types import options as opts
from slmops.types.errors import Forbidden

log = logging.getLogger("slmops.server")


class Admission:
    """Shapes a request to its caller's rights. ``default_keep_alive``: the server's, in seconds;
    ``default_ctx``: the context a model runs in when neither its Modelfile nor the request sets one."""

    def __init__(self, default_keep_alive: float, default_ctx: int):
        self.default_keep_alive = default_keep_alive
        self.default_ctx = default_ctx
        self._warned: set[str] = set()  # unknown option names already logged

    def keep_alive_for(self, value: Any) -> float:
        """The keep-alive, in seconds, a request asking for ``value`` gets."""
        keep = keep_alive_seconds(value, self.default_keep_alive)
        ctx = access.current()
        if ctx is None or ctx.can(roles.MANAGE):
            return keep
        if keep == 0:
            raise Forbidden(f'role "{ctx.role}" may not unload models (keep_alive 0); use a key with the operator '
                            "or admin role")
        return self.default_keep_alive

    def options_for(self, spec: ModelSpec, options: dict[str, Any] | None) -> dict[str, Any] | None:
        """The options a request asking for ``options`` runs with; unknown names are dropped (logged once)."""
        if not options:
            return options
        options, unknown = opts.split_unknown(options)
        for name in unknown:
            if name not in self._warned:  # once per name: a client sends its options with every request
                self._warned.add(name)
                log.warning('ignoring unknown option "%s"', name[:100])
        ctx = access.current()
        if ctx is None or ctx.can(roles.MANAGE):
            return options
        typed, _ = opts.validate(options)
        kept = {k: v for k, v in typed.items() if k not in opts.LOAD or k == "num_ctx"}
        if "num_ctx" in kept:
            ceiling = opts.validate(spec.params)[0].get("num_ctx") or self.default_ctx
            kept["num_ctx"] = min(kept["num_ctx"], ceiling)
        return kept

    def request_for(self, spec: ModelSpec, req: Request) -> Request:
        """``req`` with its options clamped and, under a token limit, its completion tokens reserved."""
        ctx = access.current()
        req = replace(req, options=self.options_for(spec, req.options))
        return req if ctx is None else self._within_token_limit(ctx, spec, req)

    def _within_token_limit(self, ctx: access.RequestContext, spec: ModelSpec, req: Request) -> Request:
        """Reserve this generation's completion tokens from the key's bucket; a generation that asked for no
        limit is capped at what was reserved."""
        options = opts.merge(spec.params, req.options)
        wanted = options.get("num_predict", -1)
        ceiling = options.get("num_ctx") or self.default_ctx  # the context it will run in
        cap = ctx.reserve_completion(wanted, ceiling)
        if cap is None or 0 < wanted <= cap:
            return req
        return replace(req, options={**(req.options or {}), "num_predict": cap})


__all__ = ["Admission"]
