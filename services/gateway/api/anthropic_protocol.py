"""Request bodies of Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens).

As Anthropic's API does, unknown fields are rejected. Accepted but without effect: `cache_control`
(the radix cache reuses every shared prefix by itself), `citations` on text blocks, `metadata`, and
`thinking` (the model's output comes back as text blocks)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"


def is_anthropic_path(path: str) -> bool:
    """Whether a request path is one of Anthropic's routes (their errors take Anthropic's shape)."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(_Body):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Body):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: dict[str, Any] | None = None
    toolset_name: str | None = None


class Base64ImageSource(_Body):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class UrlImageSource(_Body):
    """An image by URL: http(s), or a local file under --allowed-local-media-path."""

    type: Literal["url"]
    url: str


class FileImageSource(_Body):
    """An image uploaded through Anthropic's Files API: refused (no file is stored here)."""

    type: Literal["file"]
    file_id: str


ImageSource = Annotated[
    Base64ImageSource | UrlImageSource | FileImageSource, Field(discriminator="type")
]


class ImageBlock(_Body):
    """An image of a user message, loaded as the chat API's image_url parts (gateway/api/media.py).
    Its source is read as an ImageSource when the message is converted, so that a bad one is a 400
    about the image (not about every other form the message's content could take)."""

    type: Literal["image"]
    source: dict[str, Any]
    cache_control: CacheControl | None = None


class UnreadableBlock(BaseModel):
    """Content a text model cannot read; named so that the answer is a clear 400."""

    model_config = ConfigDict(extra="allow")
    type: Literal["document", "search_result", "container_upload"]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: (
        str
        | list[Annotated[TextBlock | ImageBlock | UnreadableBlock, Field(discriminator="type")]]
        | None
    ) = None
    is_error: bool = False
    cache_control: CacheControl | None = None
    toolset_name: str | None = None


class ThinkingBlock(_Body):
    """A thinking block of an earlier assistant turn, sent back by the client; not shown to the model."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Body):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    TextBlock
    | ImageBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
    | UnreadableBlock,
    Field(discriminator="type"),
]


class MessageIn(_Body):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Tool(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None


class ToolChoiceAuto(_Body):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Body):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Body):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Body):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
    Field(discriminator="type"),
]


class ThinkingEnabled(_Body):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(_Body):
    type: Literal["disabled"]


class ThinkingAdaptive(_Body):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


Thinking = Annotated[
    ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")
]


class Metadata(_Body):
    user_id: str | None = None


class CountTokensRequest(_Body):
    """What the prompt is made of: the body of /v1/messages/count_tokens."""

    model: str
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    cache_control: CacheControl | None = None


class MessagesRequest(CountTokensRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "default",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": "Hello!"}],
                }
            ]
        },
    )
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: Metadata | None = None
