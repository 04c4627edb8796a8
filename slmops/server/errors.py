"""One table from the error tree to HTTP statuses, and the two error body shapes.

``/api`` answers Ollama-style ``{"error": "..."}``; ``/v1`` answers OpenAI-style
``{"error": {"message", "type", "param", "code"}}``. Handlers never build error responses themselves.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from slmops.security.limits import retry_after
from slmops.types import errors as e

STATUS: tuple[tuple[type[e.SlmopsError], int], ...] = (
    (e.ModelNotFound, 404),
    (e.NotFound, 404),
    (e.Unauthenticated, 401),
    (e.Forbidden, 403),
    (e.UntrustedModel, 403),
    (e.Conflict, 409),
    (e.InvalidInput, 400),
    (e.IntegrityError, 400),
    (e.Busy, 503),
    (e.RateLimited, 429),
    (e.TooLarge, 413),
    (e.SourceError, 502),
    (e.ConfigError, 500),
    (e.EngineError, 500),
    (e.SlmopsError, 500),
)

OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def validation_message(problems: Any) -> str:
    """One line from pydantic's list of problems with a request: the first one, with its dotted field."""
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        return "invalid JSON in request body"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid request")
    return f"{loc}: {msg}" if loc else msg


def status_for(err: e.SlmopsError) -> int:
    return next(code for cls, code in STATUS if isinstance(err, cls))


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def body(path: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    if is_openai(path):
        return {"error": {"message": message, "type": OPENAI_TYPE.get(status, "server_error"), "param": None,
                          "code": code}}
    return {"error": message}


def headers_for(err: Exception) -> list[tuple[bytes, bytes]]:
    if isinstance(err, e.RateLimited):
        return [(b"retry-after", retry_after(err.retry_after).encode())]
    return []


def openai_code(err: Exception) -> str | None:
    return "model_not_found" if isinstance(err, e.ModelNotFound) else None


def response(path: str, status: int, message: str, code: str | None = None,
             headers: list[tuple[bytes, bytes]] | None = None) -> JSONResponse:
    """The error response for ``path``, in its API's shape; the one place error responses are built."""
    out = JSONResponse(body(path, status, message, code), status_code=status)
    out.raw_headers.extend(headers or [])
    return out
