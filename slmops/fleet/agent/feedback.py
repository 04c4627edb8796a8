"""Uploading a fleet device's rated feedback to the control plane, only while its blueprint opts in.

The server keeps ratings in ``SLMOPS_HOME/feedback`` (:mod:`slmops.store.feedback`); the agent calls
:func:`upload_pending` from its loop. It sends nothing unless the fleet's privacy file says
``feedback: true`` (written by :func:`slmops.fleet.privacy.apply` from the applied desired state): a device's own
setting may let it keep ratings, never send them. Batches are bounded (records and bytes), each is marked sent only
once the control plane answered, and what the control plane has is then dropped from the device. An upload whose
answer was lost is sent again; the control plane stores each record id once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from slmops.api.feedback import MAX_UPLOAD
from slmops.client.device import DeviceClient
from slmops.fleet import privacy
from slmops.store.feedback import FeedbackLog

BATCH_BYTES = 1 << 20  # JSON of one upload, well under the control plane's 2 MiB limit


async def upload_pending(client: DeviceClient, home: Path, max_batches: int = 10) -> int:
    """Send the ratings not yet sent, oldest first, at most ``max_batches`` uploads this call; returns how many
    records were sent. Errors are the client's, and leave what was not sent pending: SourceError while the control
    plane is unreachable, Forbidden when it no longer sees an opt-in in the device's blueprint."""
    fleet = privacy.read(home)
    if fleet is None or not fleet.feedback:
        return 0
    log = FeedbackLog(Path(home) / "feedback")
    sent, budget = 0, max_batches
    for path in await asyncio.to_thread(log.files):
        while budget > 0:
            records, cursor = await asyncio.to_thread(log.pending, path, MAX_UPLOAD, BATCH_BYTES)
            if cursor is None:
                break
            budget -= 1
            if records:  # a batch of lines that were all unreadable is only skipped
                await client.feedback(records)
                sent += len(records)
            await asyncio.to_thread(log.mark_sent, path, cursor)
        await asyncio.to_thread(log.compact, path)
        if budget <= 0:
            break
    return sent
