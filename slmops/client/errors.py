"""How the typed clients of the control plane turn its answers into the slmops error tree: one table and one
message rule for :class:`~slmops.client.fleet.FleetClient` and :class:`~slmops.client.device.DeviceClient`.

An answer of 400 or more becomes the error class of its status (the inverse of the app's error table), carrying the
server's one-line message from its ``{"error": "..."}`` body (or the start of the body, or the reason phrase, when
the body is not that shape). 429 carries Retry-After. A status outside the table, and every 5xx but 503, is a
:class:`SourceError` naming the control plane, since the fault is on the far side. Failures to get an answer at all
(refused connection, timeout) are :class:`SourceError` with a hint of what to check, which differs per client.
"""

from __future__ import annotations

import httpx

from slmops.types import errors as e

BY_STATUS: dict[int, type[e.SlmopsError]] = {400: e.InvalidInput, 401: e.Unauthenticated, 403: e.Forbidden,
                                             404: e.NotFound, 409: e.Conflict, 413: e.TooLarge, 503: e.Busy}


def message_of(r: httpx.Response) -> str:
    """The server's one-line message: ``{"error": "..."}``, else the body's first 200 characters, else the reason."""
    try:
        return str(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        return r.text.strip()[:200] or r.reason_phrase


def error_for(r: httpx.Response, where: str) -> e.SlmopsError:
    """The slmops error an answer of status >= 400 stands for; ``where`` names the server (its URL)."""
    message = message_of(r)
    if r.status_code == 429:
        try:
            retry_after = float(r.headers.get("retry-after", "1") or 1)
        except ValueError:
            retry_after = 1.0
        return e.RateLimited(message, retry_after)
    cls = BY_STATUS.get(r.status_code)
    if cls is None:
        return e.SourceError(f"control plane at {where} answered {r.status_code}: {message}")
    return cls(message)


def checked(r: httpx.Response, where: str) -> httpx.Response:
    """``r`` when it succeeded (below 400), else its error raised."""
    if r.status_code >= 400:
        raise error_for(r, where)
    return r


def transport_error(err: httpx.HTTPError, where: str, unreachable: str, slow: str) -> e.SourceError:
    """The error for a request that got no answer: ``unreachable`` and ``slow`` are the hints (what to check) for
    a refused connection and a timeout."""
    if isinstance(err, httpx.ConnectError):
        return e.SourceError(f"cannot reach the control plane at {where}; {unreachable}")
    if isinstance(err, httpx.TimeoutException):
        return e.SourceError(f"the control plane at {where} did not answer in time; {slow}")
    return e.SourceError(f"control plane at {where}: {type(err).__name__}: {err}")
