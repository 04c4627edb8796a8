"""Rated feedback on the control plane: devices upload it, operators export it per release as JSONL, the data
for the next fine-tune.

Text reaches the control plane only from a device whose effective blueprint says ``privacy: {feedback: true}``.
The device checks its own copy of that (``slmops.fleet.privacy``) before it sends anything; the control plane checks
the blueprint again in the transaction that would store the upload, so a device acting on an opt-in that was since
withdrawn is refused (403) and nothing is stored. Uploads are authenticated as reports are (session token or
signature, ``routes_device.DeviceSide.authenticate``); a record is stored once per device and id, so an upload the
agent sends again after a lost answer adds nothing.

Exports need the operator role (a viewer sees numbers, never text) and are recorded in the ledger
(``feedback.export``: who took which release's text out). Rows are read in pages by id, so an export of any size
streams in bounded memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from starlette.responses import StreamingResponse

from slmops.api.feedback import FeedbackLine, FeedbackUpload, FeedbackUploaded
from slmops.api.fleet import ErrorBody
from slmops.fleet import privacy
from slmops.fleet.control import ledger, membership
from slmops.fleet.control.models import Device, Feedback
from slmops.fleet.control.operators import Actor, operator
from slmops.fleet.control.routes_device import DeviceRoute, _inline, path_qs, read_body, side_of
from slmops.server.errors import validation_message
from slmops.types.errors import Forbidden, InvalidInput, Unauthenticated

if TYPE_CHECKING:
    from slmops.fleet.control.app import ControlPlane

MAX_UPLOAD_BYTES = 2 << 20
PAGE = 500  # rows an export reads at once
_feedback = Feedback.__table__

router = APIRouter(prefix="/fleet/v1", tags=["feedback"], route_class=DeviceRoute)
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": _inline(FeedbackUpload.model_json_schema())}}}}


def refused(device_id: str) -> str:
    return (f"device {device_id} is not opted in to feedback: set `privacy: {{feedback: true}}` in a layer of its "
            "blueprint (`slmops fleet blueprints put`); nothing was stored")


@router.post("/device/feedback", response_model=FeedbackUploaded, openapi_extra=_UPLOAD_BODY, responses={
    400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 413: {"model": ErrorBody},
    403: {"model": ErrorBody, "description": "the device's blueprint does not opt in (privacy.feedback)"}})
async def upload_feedback(request: Request) -> FeedbackUploaded:
    """Store rated feedback from the calling device (``FeedbackUpload``); each record once per device and id."""
    side = side_of(request)
    body = await read_body(request, MAX_UPLOAD_BYTES, "a feedback upload is at most {kib} KiB; send fewer records "
                                                      "at once")
    device_id = await side.authenticate(request.headers.get("authorization"), "POST", path_qs(request.scope), body)
    try:
        upload = FeedbackUpload.model_validate_json(body)
    except ValidationError as err:
        raise InvalidInput(validation_message(err.errors())) from None
    plane: ControlPlane = request.app.state.plane
    now = plane.clock()
    insert = (sqlite if plane.db.dialect == "sqlite" else postgresql).insert
    async with plane.db.write(bump=False) as s:  # telemetry-like: desired states do not change
        device = await s.get(Device, device_id)
        if device is None:
            raise Unauthenticated(f"device {device_id} is not enrolled with this control plane; enrol it again")
        if not privacy.from_config((await membership.effective_config(s, device)).config).feedback:
            raise Forbidden(refused(device_id))
        rows = [{"device_id": device_id, "record_id": r.id, "release": r.release, "model": r.model,
                 "hardware_class": device.hardware_class, "rating": r.rating, "at": r.at, "received_at": now,
                 "messages": [m.model_dump() for m in r.messages], "comment": r.comment, "tags": r.tags}
                for r in upload.records]
        stored = (await s.execute(insert(_feedback).values(rows)
                                  .on_conflict_do_nothing(index_elements=["device_id", "record_id"])
                                  .returning(_feedback.c.id))).all()
    return FeedbackUploaded(received=len(rows), stored=len(stored))


@router.get("/feedback", response_class=StreamingResponse, responses={
    200: {"description": "JSONL: one FeedbackLine a line, oldest first",
          "content": {"application/x-ndjson": {"schema": FeedbackLine.model_json_schema()}}},
    401: {"model": ErrorBody}, 403: {"model": ErrorBody}})
async def export_feedback(request: Request, release: str | None = Query(None, max_length=160),
                          since: float | None = Query(None, description="only ratings at or after this time "
                                                                         "(seconds since the epoch)"),
                          actor: Actor = Depends(operator)) -> StreamingResponse:
    """Every rating devices uploaded (of ``release`` when given) as JSONL in the chat fine-tuning shape."""
    plane: ControlPlane = request.app.state.plane
    now = plane.clock()
    async with plane.db.write(bump=False) as s:
        await ledger.append(s, actor=actor.ledger_name, action="feedback.export",
                            subject=f"release:{release}" if release else "feedback",
                            data={"release": release, "since": since}, at=now)
    return StreamingResponse(_lines(plane, release, since), media_type="application/x-ndjson")


async def _lines(plane: ControlPlane, release: str | None, since: float | None) -> AsyncIterator[bytes]:
    after = 0
    while True:
        q = select(Feedback).where(Feedback.id > after)
        if release is not None:
            q = q.where(Feedback.release == release)
        if since is not None:
            q = q.where(Feedback.at >= since)
        async with plane.db.read() as s:
            rows = list((await s.execute(q.order_by(Feedback.id).limit(PAGE))).scalars())
        if not rows:
            return
        yield b"".join(_line(r) for r in rows)
        after = rows[-1].id


def _line(row: Feedback) -> bytes:
    fields: dict[str, Any] = {"messages": row.messages, "rating": row.rating, "release": row.release, "at": row.at,
                              "id": row.record_id, "model": row.model, "comment": row.comment,
                              "tags": row.tags or None, "device_id": row.device_id,
                              "hardware_class": row.hardware_class}
    return FeedbackLine.model_validate(fields).model_dump_json(exclude_none=True).encode() + b"\n"
