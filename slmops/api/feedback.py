"""Wire types of rated feedback: the local server's ``POST /api/feedback``, the records a device keeps and uploads
(``POST /fleet/v1/device/feedback``), and the JSONL line both exports write.

Validation only. A rating is ``1`` (a good answer) or ``-1`` (a bad one): a thumb is what people give reliably, it
splits the data straight into examples to imitate and examples to avoid (SFT on the good ones, KTO-style
preference tuning on both), and a 1-5 scale means something different to every rater. ``comment`` and ``tags`` say
why. The rated answer is the last message of the conversation, always the assistant's.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

RATINGS = (-1, 1)
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,63}$")
ID_RE = re.compile(r"^fb_[0-9a-f]{24}$")
MAX_TEXT = 65_536  # characters of one message
MAX_MESSAGES = 256
MAX_UPLOAD = 100  # records in one upload


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _tag(v: str) -> str:
    if not TAG_RE.match(v):
        raise ValueError("tags are lowercase letters, digits and ._/- (64 at most), such as wrong-fact")
    return v


Tag = Annotated[str, AfterValidator(_tag)]


def _rating(v: Any) -> Any:
    """JSON ``true`` would otherwise pass as 1."""
    if isinstance(v, bool) or v not in RATINGS:
        raise ValueError("must be 1 (a good answer) or -1 (a bad one)")
    return v


class FeedbackMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_TEXT)


def _no_nul(v: str | None) -> str | None:
    """A NUL fits no PostgreSQL text column: refused here rather than failing a write later."""
    if v is not None and "\x00" in v:
        raise ValueError("must not contain NUL characters")
    return v


class _Rated(_Request):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rating: Literal[-1, 1] = Field(description="1: a good answer, -1: a bad one")
    comment: str | None = Field(None, max_length=4096, description="why, in the rater's words")
    tags: list[Tag] = Field(default_factory=list, max_length=16, description="labels such as wrong-fact")

    @field_validator("rating", mode="before")
    @classmethod
    def _strict_rating(cls, v: Any) -> Any:
        return _rating(v)

    @field_validator("comment")
    @classmethod
    def _plain_comment(cls, v: str | None) -> str | None:
        return _no_nul(v)


def _ends_with_answer(messages: list[FeedbackMessage]) -> None:
    if messages[-1].role != "assistant":
        raise ValueError("messages: the last message must be the assistant's answer being rated")


class FeedbackRequest(_Rated):
    """A rating of one answer: the conversation as ``messages`` (ending with the answer), or ``prompt`` and
    ``response`` for a single turn."""

    model: str = Field(min_length=1, max_length=160, description="the model name the answer was asked of")
    messages: list[FeedbackMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = Field(None, max_length=MAX_TEXT)
    response: str | None = Field(None, max_length=MAX_TEXT)

    @field_validator("model")
    @classmethod
    def _plain_model(cls, v: str) -> str:
        return _no_nul(v) or v

    @model_validator(mode="after")
    def _one_conversation(self) -> FeedbackRequest:
        if self.messages is not None:
            if self.prompt is not None or self.response is not None:
                raise ValueError("give either messages or prompt and response, not both")
            _ends_with_answer(self.messages)
        elif self.prompt is None or self.response is None:
            raise ValueError("give messages (ending with the rated answer), or prompt and response")
        return self

    def conversation(self) -> list[FeedbackMessage]:
        """The rated conversation as messages, whichever form it came in."""
        if self.messages is not None:
            return list(self.messages)
        return [FeedbackMessage(role="user", content=self.prompt or ""),
                FeedbackMessage(role="assistant", content=self.response or "")]


class FeedbackAccepted(_Response):
    id: str
    release: str = Field(description="the release (or model) the feedback is filed under")


class FeedbackRecord(_Rated):
    """One rating as the device keeps it (a line of ``SLMOPS_HOME/feedback/<release>.jsonl``) and uploads it."""

    id: str = Field(pattern=ID_RE.pattern, description="fb_<24 hex>, made on the device: an upload sent twice "
                                                       "is stored once")
    at: float = Field(description="when it was rated, seconds since the epoch (the device's clock)")
    release: str = Field(min_length=1, max_length=160)
    model: str = Field(min_length=1, max_length=160)
    messages: list[FeedbackMessage] = Field(min_length=1, max_length=MAX_MESSAGES)

    @field_validator("messages")
    @classmethod
    def _answer_last(cls, v: list[FeedbackMessage]) -> list[FeedbackMessage]:
        _ends_with_answer(v)
        return v

    @field_validator("release", "model")
    @classmethod
    def _plain_names(cls, v: str) -> str:
        return _no_nul(v) or v


class FeedbackUpload(_Request):
    records: list[FeedbackRecord] = Field(min_length=1, max_length=MAX_UPLOAD)


class FeedbackUploaded(_Response):
    received: int
    stored: int = Field(description="records new to the control plane (one sent before is not stored twice)")


class FeedbackLine(_Response):
    """A line of an export (``slmops feedback export``, ``GET /fleet/v1/feedback``): the chat fine-tuning shape
    (``messages``) with the rating and where it came from; fields that are empty are left out."""

    messages: list[FeedbackMessage]
    rating: int
    release: str
    at: float
    id: str
    model: str | None = None
    comment: str | None = None
    tags: list[str] | None = None
    device_id: str | None = None
    hardware_class: str | None = None
