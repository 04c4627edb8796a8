"""Roles, permissions, and the one table that says which permission every route needs.

    admin     everything
    operator  manage (pull, push, create, copy, delete, blobs, explicit load and unload) + user rights
    user      inference (generate, chat, embed, tokenize) + read (list, show, ps)
    metrics   /metrics only

A route missing from ``ROUTES`` is refused to everyone but admin, and a test walks every route of the app and
fails if one is missing, so a new endpoint cannot ship unclassified.
"""

from __future__ import annotations

PUBLIC, READ, INFERENCE, MANAGE, METRICS = "public", "read", "inference", "manage", "metrics"

ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset({READ, INFERENCE, MANAGE, METRICS}),
    "operator": frozenset({READ, INFERENCE, MANAGE}),
    "user": frozenset({READ, INFERENCE}),
    "metrics": frozenset({METRICS}),
}

ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/"): PUBLIC,
    ("HEAD", "/"): PUBLIC,
    ("GET", "/health"): PUBLIC,
    ("GET", "/ready"): PUBLIC,
    ("GET", "/api/version"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/metrics"): METRICS,
    ("GET", "/api/tags"): READ,
    ("GET", "/api/ps"): READ,
    ("POST", "/api/show"): READ,
    ("GET", "/v1/models"): READ,
    ("GET", "/v1/models/{model:path}"): READ,
    ("POST", "/api/generate"): INFERENCE,
    ("POST", "/api/chat"): INFERENCE,
    ("POST", "/api/embed"): INFERENCE,
    ("POST", "/api/embeddings"): INFERENCE,
    ("POST", "/api/tokenize"): INFERENCE,
    ("POST", "/api/detokenize"): INFERENCE,
    ("POST", "/v1/chat/completions"): INFERENCE,
    ("POST", "/v1/completions"): INFERENCE,
    ("POST", "/v1/embeddings"): INFERENCE,
    ("POST", "/v1/responses"): INFERENCE,
    ("POST", "/api/feedback"): INFERENCE,  # who may ask may rate the answer
    ("POST", "/api/pull"): MANAGE,
    ("POST", "/api/push"): MANAGE,
    ("POST", "/api/create"): MANAGE,
    ("POST", "/api/copy"): MANAGE,
    ("DELETE", "/api/delete"): MANAGE,
    ("HEAD", "/api/blobs/{digest}"): MANAGE,
    ("POST", "/api/blobs/{digest}"): MANAGE,
    ("GET", "/api/slots"): READ,  # what /api/ps shows anyway: which stored model a served name runs on
    ("PUT", "/api/slots/{model:path}"): MANAGE,
    ("DELETE", "/api/slots/{model:path}"): MANAGE,
}


PUBLIC_PATHS = frozenset(path for (_, path), need in ROUTES.items() if need == PUBLIC)  # all static paths


def permission(method: str, path_template: str) -> str | None:
    """The permission a route needs (HEAD of a GET route needs what GET needs); None: not in the table."""
    found = ROUTES.get((method, path_template))
    if found is None and method == "HEAD":
        found = ROUTES.get(("GET", path_template))
    return found


def allowed(role: str, needed: str | None) -> bool:
    if needed == PUBLIC:
        return True
    if role == "admin":
        return True
    return needed is not None and needed in ROLES.get(role, frozenset())
