"""Ollama's wire types (``/api/*``), as in Ollama's ``api/types.go`` and ``docs/api.md``: validation only.

Unknown request fields are ignored, as Ollama's JSON decoder ignores them; known fields are type-checked.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

KeepAlive = Optional[Union[str, float, int]]
Format = Optional[Union[Literal["", "json"], dict[str, Any]]]


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Resp(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class ToolCallFunction(_Req):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: Optional[int] = None


class ToolCall(_Req):
    function: ToolCallFunction


class Message(_Req):
    role: str
    content: str = ""
    images: Optional[list[str]] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_name: Optional[str] = None
    thinking: Optional[str] = None


class ToolFunction(_Req):
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(_Req):
    type: str = "function"
    function: ToolFunction


class GenerateRequest(_Req):
    model: str
    prompt: str = ""
    suffix: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[int]] = None
    stream: bool = True
    raw: bool = False
    format: Format = None
    options: Optional[dict[str, Any]] = None
    keep_alive: KeepAlive = None
    images: Optional[list[str]] = None
    think: Optional[Union[bool, str]] = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)


class ChatRequest(_Req):
    model: str
    messages: list[Message] = Field(default_factory=list)
    tools: Optional[list[Tool]] = None
    format: Format = None
    options: Optional[dict[str, Any]] = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: Optional[Union[bool, str]] = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)


class TokenLogprob(_Resp):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class Logprob(TokenLogprob):
    top_logprobs: Optional[list[TokenLogprob]] = None


class _Stats(_Resp):
    model: str
    created_at: str
    done: bool
    done_reason: Optional[str] = None
    total_duration: Optional[int] = None
    load_duration: Optional[int] = None
    prompt_eval_count: Optional[int] = None
    prompt_eval_duration: Optional[int] = None
    eval_count: Optional[int] = None
    eval_duration: Optional[int] = None


class KnowledgeChunk(_Resp):
    """A chunk of a knowledge file given to the model (not in Ollama; its clients ignore the field)."""
    source: str
    chunk: int  # its number among the chunks of its file, from 0
    page: Optional[int] = None  # of a PDF, from 1
    section: Optional[str] = None  # the Markdown heading it falls under
    score: float  # cosine similarity to the question


class GenerateResponse(_Stats):
    response: str = ""
    context: Optional[list[int]] = None
    logprobs: Optional[list[Logprob]] = None
    knowledge: Optional[list[KnowledgeChunk]] = None


class ResponseMessage(_Resp):
    role: str = "assistant"
    content: str = ""
    tool_calls: Optional[list[ToolCall]] = None


class ChatResponse(_Stats):
    message: ResponseMessage
    logprobs: Optional[list[Logprob]] = None
    knowledge: Optional[list[KnowledgeChunk]] = None


class EmbedRequest(_Req):
    model: str
    input: Union[str, list[str]] = Field(default_factory=list)
    truncate: bool = True
    options: Optional[dict[str, Any]] = None
    keep_alive: KeepAlive = None
    dimensions: Optional[int] = Field(None, ge=1)


class EmbedResponse(_Resp):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsRequest(_Req):
    model: str
    prompt: str = ""
    options: Optional[dict[str, Any]] = None
    keep_alive: KeepAlive = None


class EmbeddingsResponse(_Resp):
    embedding: list[float]


class ModelRef(_Req):
    """Requests that name one model; ``name`` is the older spelling Ollama still accepts."""

    model: str = ""
    name: str = ""

    @property
    def ref(self) -> str:
        return self.model or self.name


class ShowRequest(ModelRef):
    verbose: bool = False


class DeleteRequest(ModelRef):
    pass


class PullRequest(ModelRef):
    insecure: bool = False
    stream: bool = True


class PushRequest(ModelRef):
    insecure: bool = False
    stream: bool = True


class CopyRequest(_Req):
    source: str
    destination: str


class CreateRequest(ModelRef):
    from_: Optional[str] = Field(None, alias="from")
    files: Optional[dict[str, str]] = None
    adapters: Optional[dict[str, str]] = None
    template: Optional[str] = None
    license: Optional[Union[str, list[str]]] = None
    system: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    messages: Optional[list[Message]] = None
    quantize: Optional[str] = None
    modelfile: Optional[str] = None
    stream: bool = True


class ProgressResponse(_Resp):
    status: str
    digest: Optional[str] = None
    total: Optional[int] = None
    completed: Optional[int] = None


class ModelDetails(_Resp):
    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: Optional[list[str]] = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListModel(_Resp):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class ListResponse(_Resp):
    models: list[ListModel]


class ProcessModel(_Resp):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int = 0
    context_length: int
    # slmops: why the model runs on the CPU though a GPU was asked for; absent when it runs as asked
    fallback: str | None = Field(None, exclude_if=lambda v: v is None)
    # slmops: the runner process serving it (for ps, top, a crash report); absent when it runs in the server
    pid: int | None = Field(None, exclude_if=lambda v: v is None)


class ProcessResponse(_Resp):
    models: list[ProcessModel]


class KnowledgeFile(_Resp):
    """A knowledge file of a model, in ``/api/show`` (not in Ollama)."""
    name: str
    size: int
    chunks: int
    digest: str


class ShowResponse(_Resp):
    modelfile: str
    parameters: str = ""
    template: str = ""
    system: Optional[str] = None
    license: Optional[str] = None
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str
    messages: Optional[list[Message]] = None
    knowledge: Optional[list[KnowledgeFile]] = Field(None, exclude_if=lambda v: v is None)


class TokenizeRequest(_Req):
    model: str
    text: str = Field(..., description="Text to tokenize (special tokens are parsed)")
    options: Optional[dict[str, Any]] = None
    keep_alive: KeepAlive = None


class TokenizeResponse(_Resp):
    model: str
    tokens: list[int]


class DetokenizeRequest(_Req):
    model: str
    tokens: list[int]
    options: Optional[dict[str, Any]] = None
    keep_alive: KeepAlive = None


class DetokenizeResponse(_Resp):
    model: str
    text: str


# The Ollama release whose API this server speaks: clients gate features on /api/version (structured outputs
# from 0.5.0, /v1/responses from 0.13.3), so it reports this level, and its own version beside it.
OLLAMA_API_LEVEL = "0.13.5"


class VersionResponse(_Resp):
    version: str  # the Ollama API level
    slmops: str  # the slmops release


class ErrorResponse(_Resp):
    error: str
