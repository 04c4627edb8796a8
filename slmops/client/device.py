"""A typed, asynchronous client of the control plane's device routes (``/fleet/v1``): what the agent speaks.

Every request after enrolment is signed with the device's key (:mod:`slmops.fleet.deviceauth`) over the exact
bytes sent. A device whose clock is off (a board without a real-time clock, booted before NTP) gets 401 with
``WWW-Authenticate: Slmops-Device error="clock_skew"`` and the server's ``Date``: the client corrects its offset
from it and retries once, and keeps the offset for later requests. Answers map to the slmops error tree with the
server's one-line message (401 Unauthenticated, 400 InvalidInput, 503 Busy, ...).

    async with DeviceClient("https://cp.example:11500", DeviceKey.load(path)) as cp:
        enrolled = await cp.enrol(token, name="pi-17", hardware=profile)
        state, etag = await cp.desired(etag)        # (None, etag) when nothing changed
        await cp.report(ReportRequest(health="ok"))
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from slmops.api.fleet import DesiredState, EnrolRequest, EnrolResponse, ReportRequest
from slmops.fleet import deviceauth
from slmops.fleet.deviceauth import DeviceKey
from slmops.types import errors as e

PREFIX = "/fleet/v1"
_BY_STATUS: dict[int, type[e.SlmopsError]] = {400: e.InvalidInput, 401: e.Unauthenticated, 403: e.Forbidden,
                                              404: e.NotFound, 409: e.Conflict, 413: e.TooLarge, 503: e.Busy}
_JSON = {"content-type": "application/json"}


class DeviceClient:
    def __init__(self, base_url: str, key: DeviceKey, device_id: str | None = None, *, timeout: float = 30.0,
                 verify: bool | str = True, transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time, offset: float = 0.0):
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.device_id = device_id
        self.offset = offset  # seconds added to ``clock`` to match the control plane's clock
        self._clock = clock
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, verify=verify, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> DeviceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the routes ------------------------------------------------------------------------------------------
    async def enrol(self, token: str, name: str, hardware: dict[str, Any] | None = None, agent_version: str = "",
                    tags: dict[str, str] | None = None) -> EnrolResponse:
        """Enrol with a one-time token; the device id is kept for the signed requests that follow."""
        body = EnrolRequest(token=token, public_key=self.key.public_b64, proof=self.key.prove(token), name=name,
                            hardware=hardware or {}, agent_version=agent_version, tags=tags or {})
        r = await self._request(self._http.build_request("POST", PREFIX + "/enrol",
                                                          content=body.model_dump_json().encode(), headers=_JSON))
        answer = EnrolResponse.model_validate_json(r.content)
        self.device_id = answer.device_id
        return answer

    async def desired(self, etag: str | None = None) -> tuple[DesiredState | None, str | None]:
        """The desired state and its ETag; ``(None, etag)`` when it is unchanged since ``etag``."""
        headers = {"if-none-match": etag} if etag else None
        r = await self._signed("GET", "/device/desired", b"", headers)
        if r.status_code == 304:
            return None, r.headers.get("etag", etag)
        return DesiredState.model_validate_json(r.content), r.headers.get("etag")

    async def report(self, report: ReportRequest) -> None:
        """Send one report; the control plane queues it (202) and writes it with its next batch."""
        await self._signed("POST", "/device/reports", report.model_dump_json().encode(), _JSON)

    # -- signing and errors ----------------------------------------------------------------------------------
    def now(self) -> int:
        """The time the control plane is believed to have: the local clock plus the learned offset."""
        return int(self._clock() + self.offset)

    async def _signed(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> httpx.Response:
        if self.device_id is None:
            raise e.ConfigError("this device has no id yet; enrol it first")
        for attempt in (1, 2):
            request = self._http.build_request(method, PREFIX + path, content=body or None, headers=headers)
            request.headers["authorization"] = self.key.authorization(
                self.device_id, method, request.url.raw_path.decode("ascii"), body, self.now())
            r = await self._send(request)
            if attempt == 1 and r.status_code == 401 and _clock_skew(r):
                self.offset = deviceauth.clock_offset(r.headers.get_list("date")[-1], self._clock())
                continue
            return self._checked(r)
        raise AssertionError("unreachable")

    async def _request(self, request: httpx.Request) -> httpx.Response:
        return self._checked(await self._send(request))

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._http.send(request)
        except httpx.ConnectError:
            raise e.SourceError(f"cannot reach the control plane at {self.base_url}; check the agent's control "
                                "plane address and that `slmops fleet serve` runs there") from None
        except httpx.TimeoutException:
            raise e.SourceError(f"the control plane at {self.base_url} did not answer in time; the agent will "
                                "retry") from None
        except httpx.HTTPError as err:
            raise e.SourceError(f"control plane at {self.base_url}: {type(err).__name__}: {err}") from None

    def _checked(self, r: httpx.Response) -> httpx.Response:
        if r.status_code < 400:
            return r
        try:
            message = str(r.json()["error"])
        except (ValueError, KeyError, TypeError):
            message = r.text.strip()[:200] or r.reason_phrase
        if r.status_code == 429:
            raise e.RateLimited(message, float(r.headers.get("retry-after", "1") or 1))
        cls = _BY_STATUS.get(r.status_code)
        if cls is None:
            raise e.SourceError(f"control plane at {self.base_url} answered {r.status_code}: {message}")
        raise cls(message)


def _clock_skew(r: httpx.Response) -> bool:
    return 'error="clock_skew"' in r.headers.get("www-authenticate", "") and bool(r.headers.get_list("date"))
