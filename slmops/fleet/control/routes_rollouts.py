"""``/fleet/v1/rollouts``: thin routes over :mod:`slmops.fleet.control.rollout_driver`.

Operators start a rollout and pause, resume, promote or abort it; viewers read rollouts with their devices per
state and gate values. The driver's ticks run as this module's lifespan task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Body, Depends, Query, Request

from slmops.api.fleet import ErrorBody, PromoteRequest, RolloutInfo, RolloutRequest
from slmops.fleet.control import rollout_driver
from slmops.fleet.control.operators import Actor, operator, viewer

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

router = APIRouter(prefix="/fleet/v1", tags=["rollouts"])
lifespan = rollout_driver.lifespan
_ERRORS = {404: {"model": ErrorBody}, 409: {"model": ErrorBody, "description": "the rollout's state does not "
                                                                               "allow it"}}


def _plane(request: Request) -> "ControlPlane":
    return request.app.state.plane


@router.post("/rollouts", status_code=201, response_model=RolloutInfo, responses=_ERRORS)
async def start_rollout(req: RolloutRequest, request: Request, actor: Actor = Depends(operator)) -> RolloutInfo:
    """Start rolling a release out to a group in waves, per hardware class; wave 1 is assigned at once. 409 while
    another rollout is under way in the group."""
    return await rollout_driver.start(_plane(request), req, actor.ledger_name)


@router.get("/rollouts", response_model=list[RolloutInfo])
async def list_rollouts(request: Request, group: str | None = Query(None, description="only rollouts to this group"),
                        status: str | None = Query(None, description="running, paused, completed or aborted"),
                        limit: int = Query(100, ge=1, le=1000),
                        actor: Actor = Depends(viewer)) -> list[RolloutInfo]:
    """Newest first, with devices per state and the gate values of the last tick."""
    return await rollout_driver.listing(_plane(request), group, status, limit)


@router.get("/rollouts/{rollout_id}", response_model=RolloutInfo, responses=_ERRORS)
async def show_rollout(rollout_id: str, request: Request, actor: Actor = Depends(viewer)) -> RolloutInfo:
    """Waves, devices per state, and gate values for the classes still under way: the last tick's while the
    rollout runs (at most ``SLMOPS_FLEET_TICK`` old), else computed now."""
    return await rollout_driver.info(_plane(request), rollout_id)


@router.post("/rollouts/{rollout_id}/pause", response_model=RolloutInfo, responses=_ERRORS)
async def pause_rollout(rollout_id: str, request: Request, actor: Actor = Depends(operator)) -> RolloutInfo:
    """Hold every class where it is: no wave advances, no gate is judged, until resumed."""
    return await rollout_driver.act(_plane(request), rollout_id, "pause", actor.ledger_name)


@router.post("/rollouts/{rollout_id}/resume", response_model=RolloutInfo, responses=_ERRORS)
async def resume_rollout(rollout_id: str, request: Request, actor: Actor = Depends(operator)) -> RolloutInfo:
    """Go on; each active class bakes its wave again from now."""
    return await rollout_driver.act(_plane(request), rollout_id, "resume", actor.ledger_name)


@router.post("/rollouts/{rollout_id}/promote", response_model=RolloutInfo, responses=_ERRORS)
async def promote_rollout(rollout_id: str, request: Request, body: PromoteRequest | None = Body(None),
                          actor: Actor = Depends(operator)) -> RolloutInfo:
    """Take one class (or every active one) to the last wave at once; it still has to pass its gates there."""
    return await rollout_driver.act(_plane(request), rollout_id, "promote", actor.ledger_name,
                                    body.hardware_class if body else None)


@router.post("/rollouts/{rollout_id}/abort", response_model=RolloutInfo, responses=_ERRORS)
async def abort_rollout(rollout_id: str, request: Request, actor: Actor = Depends(operator)) -> RolloutInfo:
    """Stop the rollout and revert every device it put on the release (done classes too)."""
    return await rollout_driver.act(_plane(request), rollout_id, "abort", actor.ledger_name)
