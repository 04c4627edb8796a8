"""``POST /api/feedback``: a rating of an answer, kept on this device per release for the next fine-tune, and only
when the device opted in (:mod:`slmops.fleet.privacy`; Ollama has no such route).

The opt-in is asked on every request (one ``stat`` of the fleet's privacy file), so an opt-out from a blueprint
holds from the next request on. The record is filed under the release the served name runs (the slot table's, on
a fleet device), else under the model name, and is on disk before the 202 (:mod:`slmops.store.feedback`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request

from slmops.api.feedback import FeedbackAccepted, FeedbackRequest
from slmops.fleet import privacy
from slmops.server import access
from slmops.store.feedback import FeedbackLog
from slmops.types.errors import Forbidden, InvalidName
from slmops.types.name import ModelName

router = APIRouter(tags=["feedback"])
_ERROR = {"content": {"application/json": {"example": {"error": "..."}}}}


@dataclass
class FeedbackSide:
    """What the route needs, on ``app.state.feedback``."""

    log: FeedbackLog
    opt_in: privacy.OptIn


def install(app: FastAPI, home: Path, local_opt_in: bool) -> None:
    """Serve ``/api/feedback`` with the log under ``home/feedback``; ``local_opt_in``: the server's own setting
    (``SLMOPS_FEEDBACK``), which the fleet's privacy file overrides on a fleet device."""
    app.state.feedback = FeedbackSide(FeedbackLog(Path(home) / "feedback"), privacy.OptIn(home, local_opt_in))
    app.include_router(router)


def release_of(state: Any, model: str) -> str:
    """The release the served name ``model`` runs (the slot table's), else the model's name as the server
    normalises it (``smollm2`` and ``smollm2:latest`` file together)."""
    try:
        name = ModelName.parse(model)
    except InvalidName:
        return model
    table = getattr(state, "slots", None)
    slot = table.get(name) if table is not None else None
    if slot is not None and slot.release:
        return slot.release
    return name.display if len(name.display) <= 160 else model  # a record's release is 160 characters at most


@router.post("/api/feedback", status_code=202, response_model=FeedbackAccepted, responses={
    202: {"description": "stored on this device"},
    403: {"description": "the device has not opted in (privacy.feedback), or the key's role lacks inference",
          **_ERROR},
    409: {"description": "the release's feedback log is full; export and clear it", **_ERROR},
    413: {"description": "the record is too large", **_ERROR}})
async def post_feedback(body: FeedbackRequest, request: Request) -> FeedbackAccepted:
    """Rate an answer (``rating`` 1 or -1) with its conversation; kept on this device under the model's release
    and exported with ``slmops feedback export`` (JSONL, for fine-tuning). Refused (403) unless the device opted in
    with ``privacy: {feedback: true}`` in its blueprint or deployment config."""
    side: FeedbackSide = request.app.state.feedback
    if not side.opt_in():
        raise Forbidden(privacy.REFUSED)
    ctx = access.current()
    if ctx is not None:
        ctx.model = body.model
    release = release_of(request.app.state, body.model)
    record = side.log.new_record(release, body.model, body.conversation(), body.rating, body.comment, body.tags)
    await asyncio.to_thread(side.log.append, record)
    return FeedbackAccepted(id=record.id, release=release)
