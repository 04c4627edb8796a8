"""(being written)"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from fastapi import APIRouter

router = APIRouter(prefix="/fleet/v1")


@contextlib.asynccontextmanager
async def lifespan(plane) -> AsyncIterator[None]:  # type: ignore[no-untyped-def]
    yield
