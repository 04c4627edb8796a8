"""Wire types of the local server's slot table (``/api/slots``): served name -> stored model.

A fleet device serves a release under a stable name (``smollm2``) while the model behind it lives in the store
under a slot name (``slot/smollm2-a:1.2.0``); the edge agent moves the served name from one slot to the other.
Validation only; the server and the agent's local client share these.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SlotRequest(BaseModel):
    """``PUT /api/slots/{served}``: serve ``model`` (a model in the store) under the served name from now on."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300, description="a model in the store, such as slot/smollm2-b:2")
    release: str | None = Field(None, max_length=160, description="the release the model is (NAME:VERSION), a "
                                                                  "label for /api/slots and the agent's reports")


class SlotInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    served: str  # the served name as clients write it, normalised (smollm2:latest)
    model: str  # the stored model requests for the served name run on
    release: str | None = None
    updated_at: float


class SlotsResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    slots: list[SlotInfo] = Field(default_factory=list)
