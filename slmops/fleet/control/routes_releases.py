"""``/fleet/v1/releases`` and ``/fleet/v1/channels``: thin routes over :mod:`slmops.fleet.control.releases`.

Operators create releases and move channels; viewers read them. A release never changes once created, so there is
no PUT or DELETE on one: a fix is a new version, and a channel moves to it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import APIRouter, Depends, Query, Request

from slmops.api.fleet import ChannelInfo, ChannelRequest, ReleaseInfo, ReleaseRequest
from slmops.fleet.control import releases
from slmops.fleet.control.operators import Actor, operator, viewer

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

router = APIRouter(prefix="/fleet/v1", tags=["releases"])


@contextlib.asynccontextmanager
async def lifespan(plane: "ControlPlane") -> AsyncIterator[None]:
    """Trusted keys that cannot be used stop the start, rather than the first release."""
    releases.verifiers(plane)
    yield


def _plane(request: Request) -> "ControlPlane":
    return request.app.state.plane


@router.post("/releases", status_code=201, response_model=ReleaseInfo)
async def create_release(req: ReleaseRequest, request: Request, actor: Actor = Depends(operator)) -> ReleaseInfo:
    return await releases.create_release(_plane(request), req, actor.ledger_name)


@router.get("/releases", response_model=list[ReleaseInfo])
async def list_releases(request: Request, name: str | None = Query(None, description="only this model name"),
                        actor: Actor = Depends(viewer)) -> list[ReleaseInfo]:
    return await releases.list_releases(_plane(request), name)


@router.get("/releases/{name}/{version}", response_model=ReleaseInfo)
async def show_release(name: str, version: str, request: Request, actor: Actor = Depends(viewer)) -> ReleaseInfo:
    return await releases.get_release(_plane(request), name, version)


@router.put("/channels/{name}", response_model=ChannelInfo)
async def set_channel(name: str, req: ChannelRequest, request: Request,
                      actor: Actor = Depends(operator)) -> ChannelInfo:
    return await releases.set_channel(_plane(request), name, req.release, actor.ledger_name)


@router.get("/channels", response_model=list[ChannelInfo])
async def list_channels(request: Request, actor: Actor = Depends(viewer)) -> list[ChannelInfo]:
    return await releases.list_channels(_plane(request))


@router.get("/channels/{name}", response_model=ChannelInfo)
async def show_channel(name: str, request: Request, actor: Actor = Depends(viewer)) -> ChannelInfo:
    return await releases.get_channel(_plane(request), name)
