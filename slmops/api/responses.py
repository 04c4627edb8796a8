"""OpenAI Responses API wire types (``POST /v1/responses``), stateless. Validation only.

Shapes follow the types the official ``openai`` Python SDK parses (``openai.types.responses``). Request fields
this server cannot honour are still typed here when the fix is to reject them with a clear message (image parts,
hosted tools, ``previous_response_id``): the handler names them, rather than a validator's generic complaint.
Input items and tools of kinds not listed are kept loosely (``type`` plus anything) for the same reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from slmops.api.openai import _Req, _Resp


# -- request ----------------------------------------------------------------------------------------------------
class ContentPart(_Req):
    """``input_text``/``output_text`` carry ``text``; ``input_image``/``input_file`` are refused by the handler."""

    type: str
    text: Optional[str] = None


class InputMessage(_Req):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[ContentPart]]


class FunctionCallInput(_Req):
    """A call the assistant made earlier, sent back as history."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = "{}"
    id: Optional[str] = None


class FunctionCallOutput(_Req):
    """The result of an earlier call (becomes a ``tool`` message)."""

    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[ContentPart]]


class OtherItem(_Req):
    """Any other item kind (``reasoning``, ``item_reference``, hosted tool calls); refused by name."""

    model_config = ConfigDict(extra="allow")
    type: str


def _item_kind(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")
    return kind if kind in ("message", "function_call", "function_call_output") else "other"


InputItem = Annotated[Union[Annotated[InputMessage, Tag("message")],
                            Annotated[FunctionCallInput, Tag("function_call")],
                            Annotated[FunctionCallOutput, Tag("function_call_output")],
                            Annotated[OtherItem, Tag("other")]], Discriminator(_item_kind)]


class Tool(_Req):
    """A function tool (``name``, ``parameters``...); other types (``web_search``, ``file_search``) are refused."""

    type: str
    name: Optional[str] = None
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolChoiceObject(_Req):
    type: str
    name: Optional[str] = None


class TextFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class TextConfig(_Req):
    format: Optional[TextFormat] = None
    verbosity: Optional[str] = None


class ResponseRequest(_Req):
    model: str
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoiceObject]] = None
    text: Optional[TextConfig] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    max_output_tokens: Optional[int] = Field(None, ge=1)
    stream: bool = False
    previous_response_id: Optional[str] = None
    conversation: Optional[Any] = None
    background: Optional[bool] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    parallel_tool_calls: Optional[bool] = None
    user: Optional[str] = None
    reasoning: Optional[dict[str, Any]] = None
    truncation: Optional[Literal["auto", "disabled"]] = None


# -- response ---------------------------------------------------------------------------------------------------
Status = Literal["completed", "incomplete", "failed", "in_progress"]


class OutputText(_Resp):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(_Resp):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCall(_Resp):
    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str


OutputItem = Union[OutputMessage, FunctionCall]


class InputTokensDetails(_Resp):
    cached_tokens: int
    cache_write_tokens: int = 0  # the SDK requires it; nothing here bills explicit prompt-cache writes


class OutputTokensDetails(_Resp):
    reasoning_tokens: int = 0


class Usage(_Resp):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(_Resp):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(_Resp):
    code: str
    message: str


class Response(_Resp):
    """Echo fields (``tools``, ``text``, ``temperature``...) state what this response was generated with."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: Optional[int] = None
    status: Status
    error: Optional[ResponseError] = None
    incomplete_details: Optional[IncompleteDetails] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: None = None
    store: Literal[False] = False
    temperature: float
    text: dict[str, Any]
    tool_choice: Union[str, dict[str, Any]]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: Optional[Usage] = None
    user: Optional[str] = None
    metadata: dict[str, str] = Field(default_factory=dict)


class _Event(BaseModel):
    """Stream events carry their own ``type`` (also the SSE ``event:`` line) and a ``sequence_number``."""

    type: str
    sequence_number: int


class ResponseEvent(_Event):
    """``response.created``, ``.in_progress``, ``.completed``, ``.incomplete``, ``.failed``."""

    response: Response


class OutputItemEvent(_Event):
    """``response.output_item.added`` / ``.done``."""

    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    """``response.content_part.added`` / ``.done``."""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: Optional[str] = None
    message: str
    param: Optional[str] = None
