"""A typed, synchronous client of the control plane's operators' API (``/fleet/v1``).

One method per route, returning the pydantic types of :mod:`slmops.api.fleet`. Every call goes through
:meth:`FleetClient._call`, which turns the control plane's answers into the slmops error tree with the server's
one-line message (:mod:`slmops.client.errors`: 400 InvalidInput, 401 Unauthenticated, 403 Forbidden, 404 NotFound,
409 Conflict, 503 Busy, other 5xx SourceError), so the CLI and scripts handle errors the way the rest of slmops
does.

    with FleetClient("http://127.0.0.1:11500", key) as fleet:
        token = fleet.create_token("1h", {"site": "lyon"})
        for device in fleet.all_devices(group="lyon"):
            ...
"""

from __future__ import annotations

from typing import Any, Iterator, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from slmops.api.fleet import (BlueprintInfo, DeviceInfo, DevicePage, EffectiveConfig, EnrolmentTokenResponse,
                              GroupInfo, KeyInfo, LedgerInfo, LedgerVerdict, RolloutInfo, RolloutRequest, TokenInfo)
from slmops.client import errors
from slmops.types.errors import InvalidInput

T = TypeVar("T")
ROLLOUT_ACTIONS = ("pause", "resume", "promote", "abort")


class FleetClient:
    def __init__(self, base_url: str, key: str = "", timeout: float = 30.0, *, verify: bool | str = True):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one way a request is made ---------------------------------------------------------------------
    def _call(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None,
              model: Any = None) -> Any:
        """``method path`` under /fleet/v1; the answer validated as ``model`` (a type such as ``list[GroupInfo]``),
        or None without one. Parameters that are None are left out."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            r = self._http.request(method, "/fleet/v1" + path, json=json, params=query)
        except httpx.HTTPError as err:
            raise errors.transport_error(err, self.base_url, "start it with `slmops fleet serve` or set "
                                         "SLMOPS_FLEET_HOST", "check that it runs and that SLMOPS_FLEET_HOST names "
                                         "it") from None
        errors.checked(r, self.base_url)
        if model is None or r.status_code == 204:
            return None
        return TypeAdapter(model).validate_python(r.json())

    # -- enrolment tokens ------------------------------------------------------------------------------------
    def create_token(self, expires_in: str = "1h", tags: dict[str, str] | None = None) -> EnrolmentTokenResponse:
        """A one-time enrolment token; ``.token`` is its secret, shown only in this answer."""
        return self._call("POST", "/tokens", {"expires_in": expires_in, "tags": tags or {}},
                          model=EnrolmentTokenResponse)

    def tokens(self) -> list[TokenInfo]:
        return self._call("GET", "/tokens", model=list[TokenInfo])

    def delete_token(self, token_id: str) -> None:
        self._call("DELETE", f"/tokens/{_seg(token_id)}")

    # -- devices ---------------------------------------------------------------------------------------------
    def devices(self, *, group: str | None = None, hardware_class: str | None = None, release: str | None = None,
                health: str | None = None, seen_within: str | None = None, revoked: bool | None = None,
                limit: int = 100, after: str | None = None) -> DevicePage:
        """One page of devices sorted by id; pass ``page.next`` as ``after`` for the next."""
        params = {"group": group, "hardware_class": hardware_class, "release": release, "health": health,
                  "seen_within": seen_within, "revoked": None if revoked is None else str(revoked).lower(),
                  "limit": limit, "after": after}
        return self._call("GET", "/devices", params=params, model=DevicePage)

    def all_devices(self, page_size: int = 500, **filters: Any) -> Iterator[DeviceInfo]:
        """Every device matching ``filters`` (those of :meth:`devices`), page after page."""
        after = None
        while True:
            page = self.devices(limit=page_size, after=after, **filters)
            yield from page.devices
            if page.next is None:
                return
            after = page.next

    def device(self, device_id: str) -> DeviceInfo:
        return self._call("GET", f"/devices/{_seg(device_id)}", model=DeviceInfo)

    def tag_device(self, device_id: str, tags: dict[str, str | None]) -> DeviceInfo:
        """Set tags; a None value removes that tag."""
        return self._call("PATCH", f"/devices/{_seg(device_id)}/tags", {"tags": tags}, model=DeviceInfo)

    def revoke_device(self, device_id: str) -> DeviceInfo:
        return self._call("POST", f"/devices/{_seg(device_id)}/revoke", model=DeviceInfo)

    def device_config(self, device_id: str) -> EffectiveConfig:
        """The device's effective configuration, with the layer each value came from."""
        return self._call("GET", f"/devices/{_seg(device_id)}/config", model=EffectiveConfig)

    # -- groups ----------------------------------------------------------------------------------------------
    def put_group(self, name: str, selector: dict[str, str]) -> GroupInfo:
        return self._call("PUT", f"/groups/{_seg(name)}", {"selector": selector}, model=GroupInfo)

    def groups(self) -> list[GroupInfo]:
        return self._call("GET", "/groups", model=list[GroupInfo])

    def group(self, name: str) -> GroupInfo:
        return self._call("GET", f"/groups/{_seg(name)}", model=GroupInfo)

    def delete_group(self, name: str) -> None:
        self._call("DELETE", f"/groups/{_seg(name)}")

    # -- blueprint layers ------------------------------------------------------------------------------------
    def put_blueprint(self, layer: str, config: dict[str, Any], priority: int = 0) -> BlueprintInfo:
        """``layer``: ``baseline``, ``group:<name>`` or ``device:<id>``."""
        return self._call("PUT", f"/blueprints/{_seg(layer)}", {"priority": priority, "config": config},
                          model=BlueprintInfo)

    def blueprints(self) -> list[BlueprintInfo]:
        return self._call("GET", "/blueprints", model=list[BlueprintInfo])

    def blueprint(self, layer: str) -> BlueprintInfo:
        return self._call("GET", f"/blueprints/{_seg(layer)}", model=BlueprintInfo)

    def delete_blueprint(self, layer: str) -> None:
        self._call("DELETE", f"/blueprints/{_seg(layer)}")

    # -- ledger ----------------------------------------------------------------------------------------------
    def ledger(self, after: int = 0, limit: int = 100, subject: str | None = None) -> list[LedgerInfo]:
        return self._call("GET", "/ledger", params={"after": after, "limit": limit, "subject": subject},
                          model=list[LedgerInfo])

    def verify_ledger(self) -> LedgerVerdict:
        return self._call("GET", "/ledger/verify", model=LedgerVerdict)

    # -- operator keys (admin) -------------------------------------------------------------------------------
    def create_key(self, name: str, role: str) -> KeyInfo:
        """A new operator key; ``.key`` is its secret, shown only in this answer."""
        return self._call("POST", "/keys", {"name": name, "role": role}, model=KeyInfo)

    def keys(self) -> list[KeyInfo]:
        return self._call("GET", "/keys", model=list[KeyInfo])

    def revoke_key(self, name: str) -> KeyInfo:
        return self._call("DELETE", f"/keys/{_seg(name)}", model=KeyInfo)

    # -- releases and channels -------------------------------------------------------------------------------
    def create_release(self, name: str, version: str, variants: list[dict[str, Any]],
                       golden: list[dict[str, Any]] | None = None, notes: str = "") -> Any:
        """Publish ``NAME:VERSION``; ``variants``: ``{"hardware", "reference"}`` (and optionally
        ``manifest_digest``, ``signature``). Returns a ReleaseInfo."""
        from slmops.api.fleet import ReleaseInfo
        body = {"name": name, "version": version, "variants": variants, "golden": golden or [], "notes": notes}
        return self._call("POST", "/releases", body, model=ReleaseInfo)

    def releases(self, name: str | None = None) -> list[Any]:
        """ReleaseInfo list, oldest first; only those of model ``name`` when given."""
        from slmops.api.fleet import ReleaseInfo
        return self._call("GET", "/releases", params={"name": name}, model=list[ReleaseInfo])

    def release(self, name: str, version: str) -> Any:
        from slmops.api.fleet import ReleaseInfo
        return self._call("GET", f"/releases/{_seg(name)}/{_seg(version)}", model=ReleaseInfo)

    def set_channel(self, channel: str, release: str) -> Any:
        """Point ``channel`` at ``release`` (NAME:VERSION); Conflict if that is not forward. A ChannelInfo."""
        from slmops.api.fleet import ChannelInfo
        return self._call("PUT", f"/channels/{_seg(channel)}", {"release": release}, model=ChannelInfo)

    def channels(self) -> list[Any]:
        from slmops.api.fleet import ChannelInfo
        return self._call("GET", "/channels", model=list[ChannelInfo])

    def channel(self, channel: str) -> Any:
        from slmops.api.fleet import ChannelInfo
        return self._call("GET", f"/channels/{_seg(channel)}", model=ChannelInfo)

    # -- rollouts --------------------------------------------------------------------------------------------
    def start_rollout(self, req: RolloutRequest) -> RolloutInfo:
        """Roll a release out to a group in waves, per hardware class; Conflict while another is under way there."""
        return self._call("POST", "/rollouts", req.model_dump(mode="json", exclude_none=True), model=RolloutInfo)

    def rollouts(self, group: str | None = None, status: str | None = None, limit: int = 100) -> list[RolloutInfo]:
        """Newest first."""
        return self._call("GET", "/rollouts", params={"group": group, "status": status, "limit": limit},
                          model=list[RolloutInfo])

    def rollout(self, rollout_id: str) -> RolloutInfo:
        """One rollout with devices per state and gate values (the last tick's while it runs)."""
        return self._call("GET", f"/rollouts/{_seg(rollout_id)}", model=RolloutInfo)

    def rollout_action(self, rollout_id: str, action: str, hardware_class: str | None = None) -> RolloutInfo:
        """``pause``, ``resume``, ``promote`` (``hardware_class``: one class; all active ones without) or
        ``abort``."""
        if action not in ROLLOUT_ACTIONS:
            raise InvalidInput(f"unknown rollout action {action!r}; use one of {', '.join(ROLLOUT_ACTIONS)}")
        body = {"hardware_class": hardware_class} if action == "promote" and hardware_class else None
        return self._call("POST", f"/rollouts/{_seg(rollout_id)}/{action}", body, model=RolloutInfo)


def _seg(value: str) -> str:
    """One path segment: ``/`` and the like escaped, ``:`` kept (layers read ``group:edge``)."""
    return quote(value, safe=":")
