"""Request bodies of OpenAI's Responses API (/v1/responses). Unknown fields are a 400: every field
below is either honoured or checked (see responses_routes.py for what each one does)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

MAX_METADATA_PAIRS = 16  # OpenAI's limits on `metadata`
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputContentPart(_Strict):
    """A text part: input_text (what users say) or output_text (an earlier response's text, sent
    back as input). Other part types are refused when the input is read."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # on output_text parts sent back; not used
    logprobs: list[Any] | None = None


class InputImagePart(_Strict):
    """An image part by URL: data:, http(s) or a local file, loaded as the chat API's image_url parts
    (services/gateway/api/media.py). file_id (an uploaded file) is refused when the input is read."""

    type: Literal["input_image"]
    image_url: str | None = None
    detail: Literal["low", "high", "auto"] | None = None  # accepted; images are processed whole
    file_id: str | None = None


MessagePart = Annotated[InputContentPart | InputImagePart, Field(discriminator="type")]


def text_or(items: Any) -> Any:
    """`str | items`, where a value that is not a string is checked as items only, so that a bad part
    is a 400 about that part (not "should be a valid string")."""
    return Annotated[
        Annotated[str, Tag("text")] | Annotated[items, Tag("items")],
        Discriminator(lambda value: "text" if isinstance(value, str) else "items"),
    ]


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: text_or(list[MessagePart])
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(_Strict):
    """A call the model made earlier, sent back with its output."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ReasoningTextPart(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Strict):
    """An earlier response's reasoning, sent back as input: accepted, and left out of the prompt."""

    type: Literal["reasoning"]
    summary: list[ReasoningTextPart]
    content: list[ReasoningTextPart] | None = None
    encrypted_content: str | None = None
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _item_type(item: Any) -> str:
    """Messages may leave out their type (OpenAI's "easy input message")."""
    if isinstance(item, dict):
        return item.get("type", "message")
    return getattr(item, "type", "message")


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(_Strict):
    """Responses' flat function tool (the chat API nests name/parameters under `function`)."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJsonObject(_Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextConfig(_Strict):
    format: (
        Annotated[
            TextFormatText | TextFormatJsonObject | TextFormatJsonSchema,
            Field(discriminator="type"),
        ]
        | None
    ) = None


class ReasoningConfig(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input": "Say hello.", "max_output_tokens": 16},
                {
                    "input": [{"role": "user", "content": "Say hello."}],
                    "instructions": "Answer briefly.",
                    "stream": True,
                },
            ]
        },
    )
    input: text_or(list[InputItem])
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: ReasoningConfig | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    include: list[str] | None = None


class InputItemsQuery(_Strict):
    """GET /v1/responses/{id}/input_items query parameters."""

    after: str | None = None
    limit: int = Field(default=20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
