"""A typed, asynchronous client of the control plane's device routes (``/fleet/v1``): what the agent speaks.

The device proves itself with its key (:mod:`slmops.fleet.deviceauth`): a signed ``POST /device/session`` gets a
session token, which polls and reports then carry (one HMAC for the control plane to check instead of an Ed25519
signature). The client does this by itself: it takes a session before the first poll or report, renews it when
80% of its lifetime has passed, and on a 401 to a session request drops the session and sends the request signed,
which either works (the token ran out by the control plane's clock, or its secret changed) or says why the device
is refused. A control
plane without sessions (404) is spoken to with a signature per request, as is every request when ``sessions`` is
False.

A device whose clock is off (a board without a real-time clock, booted before NTP) gets 401 with
``WWW-Authenticate: Slmops-Device error="clock_skew"`` and the server's time (``Slmops-Server-Time``, else
``Date``): the client corrects its offset from it, retries once, and keeps the offset for later requests. The offset
serves requests only: the expiry of signed desired state is judged by the device's own clock (``desired(etag,
trust)``), since the offset comes from the server being judged. Answers map to the slmops error tree with the
server's one-line message (:mod:`slmops.client.errors`).

    async with DeviceClient("https://cp.example:11500", DeviceKey.load(path)) as cp:
        enrolled = await cp.enrol(token, name="pi-17", hardware=profile)  # .trust_root: the device's root.json
        state, etag = await cp.desired(etag, trust)  # (None, etag) when nothing changed; checked with the trust store
        await cp.report(ReportRequest(health="ok"))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from slmops.api.fleet import (DesiredState, EnrolRequest, EnrolResponse, ReportRequest, SessionResponse,
                              SignedDesired)
from slmops.client import errors
from slmops.fleet import deviceauth
from slmops.fleet.deviceauth import DeviceKey
from slmops.types import errors as e

if TYPE_CHECKING:
    from slmops.fleet.agent.trust import TrustStore

PREFIX = "/fleet/v1"
SESSION_PATH = "/device/session"
RENEW_AT = 0.8  # share of a session's lifetime after which it is renewed
_JSON = {"content-type": "application/json"}
_UNREACHABLE = "check the agent's control plane address and that `slmops fleet serve` runs there"


class DeviceClient:
    def __init__(self, base_url: str, key: DeviceKey, device_id: str | None = None, *, timeout: float = 30.0,
                 verify: bool | str = True, transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time, offset: float = 0.0, sessions: bool = True):
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.device_id = device_id
        self.offset = offset  # seconds added to ``clock`` to match the control plane's clock
        self.sessions = sessions  # take session tokens; False (or a control plane without them): sign each request
        self.session: SessionResponse | None = None
        self.signed = 0  # requests signed with the key so far (sessions keep this small)
        self._renew_at = 0.0  # control-plane time after which the session is renewed
        self._clock = clock
        self._session_lock = asyncio.Lock()
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
        """Enrol with a one-time token; the device id is kept for the signed requests that follow. The answer's
        ``trust_root`` is the root.json to keep (``TrustStore(answer.trust_root, folder=…).save()``): the only keys
        whose signatures on desired state the device will ever accept."""
        body = EnrolRequest(token=token, public_key=self.key.public_b64, proof=self.key.prove(token), name=name,
                            hardware=hardware or {}, agent_version=agent_version, tags=tags or {})
        request = self._http.build_request("POST", PREFIX + "/enrol", content=body.model_dump_json().encode(),
                                           headers=_JSON)
        answer = EnrolResponse.model_validate_json(errors.checked(await self._send(request), self.base_url).content)
        self.device_id = answer.device_id
        self.session = None
        return answer

    async def desired(self, etag: str | None = None, trust: TrustStore | None = None
                      ) -> tuple[DesiredState | None, str | None]:
        """The desired state and its ETag; ``(None, etag)`` when it is unchanged since ``etag``. With ``trust``
        (the device's :class:`~slmops.fleet.agent.trust.TrustStore`) the signed document is checked first
        (signature by the enrolled root's keys, device, version, expiry by the device's own clock) and
        ``Refused`` raised when it fails; recording the version is the caller's, once it acts on the state.
        Without, the state is read from the document unchecked: for operators' tools, never to activate."""
        headers = {"if-none-match": etag} if etag else None
        r = await self._device("GET", "/device/desired", b"", headers)
        if r.status_code == 304:
            return None, r.headers.get("etag", etag)
        if trust is not None:
            if self.device_id is None:
                raise e.ConfigError("this device has no id yet; enrol it first")
            return trust.check(r.content, self.device_id, self._clock()), r.headers.get("etag")
        try:
            return DesiredState.model_validate(SignedDesired.model_validate_json(r.content).signed), r.headers.get("etag")
        except ValidationError:
            raise e.SourceError(f"the control plane at {self.base_url} answered a desired state this client cannot "
                                "read; upgrade the agent or the control plane") from None

    async def report(self, report: ReportRequest) -> None:
        """Send one report; the control plane queues it (202) and writes it with its next batch."""
        await self._device("POST", "/device/reports", report.model_dump_json().encode(), _JSON)

    async def new_session(self) -> SessionResponse:
        """A new session token (a signed request); later polls and reports carry it."""
        r = errors.checked(await self._signed("POST", SESSION_PATH, b"", None), self.base_url)
        return self.use_session(SessionResponse.model_validate_json(r.content))

    def use_session(self, session: SessionResponse) -> SessionResponse:
        """Carry ``session`` from now on (one kept from before a restart, or one this client made); it is renewed
        after 80% of the time it has left."""
        now = self._clock() + self.offset
        self.session = session
        self._renew_at = now + RENEW_AT * max(0.0, session.expires_at - now)
        return session

    # -- authentication and errors ---------------------------------------------------------------------------
    def now(self) -> int:
        """The time the control plane is believed to have: the local clock plus the learned offset."""
        return int(self._clock() + self.offset)

    async def _device(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> httpx.Response:
        """A device request with the session token when there is one, signed otherwise (see the module docstring)."""
        token = await self._session_token()
        if token is not None:
            request = self._http.build_request(method, PREFIX + path, content=body or None, headers=headers)
            request.headers["authorization"] = f"{deviceauth.SESSION_SCHEME} {token}"
            r = await self._send(request)
            if r.status_code != 401:
                return errors.checked(r, self.base_url)
            self.session = None  # refused: the signed request below says why, or works
        return errors.checked(await self._signed(method, path, body, headers), self.base_url)

    async def _session_token(self) -> str | None:
        """The session token to send, taken or renewed first when due; None when sessions are not used."""
        if not self.sessions:
            return None
        if self.session is not None and self._clock() + self.offset < self._renew_at:
            return self.session.token
        async with self._session_lock:  # requests at once share one renewal
            if self.session is not None and self._clock() + self.offset < self._renew_at:
                return self.session.token
            try:
                return (await self.new_session()).token
            except e.NotFound:  # a control plane from before sessions
                self.sessions = False
                return None

    async def _signed(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> httpx.Response:
        """The answer to the request signed with the device's key, sent again once with a corrected clock offset
        when the control plane said the device's clock is off."""
        if self.device_id is None:
            raise e.ConfigError("this device has no id yet; enrol it first")
        for attempt in (1, 2):
            request = self._http.build_request(method, PREFIX + path, content=body or None, headers=headers)
            request.headers["authorization"] = self.key.authorization(
                self.device_id, method, request.url.raw_path.decode("ascii"), body, self.now())
            self.signed += 1
            r = await self._send(request)
            if attempt == 1 and r.status_code == 401 and _clock_skew(r):
                self.offset = _server_offset(r, self._clock())
                continue
            return r
        raise AssertionError("unreachable")

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._http.send(request)
        except httpx.HTTPError as err:
            raise errors.transport_error(err, self.base_url, _UNREACHABLE, "the agent will retry") from None

    async def feedback(self, records: list[Any]) -> Any:
        """Upload rated feedback (``FeedbackRecord``s, at most 100) and return the ``FeedbackUploaded`` answer;
        Forbidden when the device's blueprint does not opt in (nothing is stored then)."""
        from slmops.api.feedback import FeedbackUpload, FeedbackUploaded

        body = FeedbackUpload.model_construct(records=records).model_dump_json().encode()  # the control plane checks
        r = await self._device("POST", "/device/feedback", body, _JSON)
        return FeedbackUploaded.model_validate_json(r.content)


def _clock_skew(r: httpx.Response) -> bool:
    return 'error="clock_skew"' in r.headers.get("www-authenticate", "") and bool(
        r.headers.get("slmops-server-time") or r.headers.get_list("date"))


def _server_offset(r: httpx.Response, local_now: float) -> float:
    """The offset a clock-skew answer teaches: from ``Slmops-Server-Time`` (ms), else from the ``Date`` (1 s)."""
    precise = r.headers.get("slmops-server-time")
    if precise:
        return deviceauth.server_time_offset(precise, local_now)
    return deviceauth.clock_offset(r.headers.get_list("date")[-1], local_now)
