"""Request bodies of the REST APIs (OpenAI and SGLang native). Unknown fields are ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Before content, so that its check below sees them.
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None  # OpenAI's deprecated predecessor of tool_calls
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, content, info: ValidationInfo):
        """As OpenAI: content (a string or a list of parts) is required, but an assistant message that
        carries tool_calls or function_call may leave it null or out."""
        role = info.data.get("role")
        if content is not None or role is None:
            return content
        if role != "assistant":
            raise ValueError(
                f"a {role} message needs content (a string or a list of content parts), "
                "got null or nothing"
            )
        if info.data.get("tool_calls") is None and info.data.get("function_call") is None:
            raise ValueError(
                "an assistant message needs content unless it has tool_calls or function_call"
            )
        return content


class _OpenAISampling(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    user: str | None = None
    # Structured output: OpenAI's response_format, or SGLang's regex / ebnf extensions.
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16},
                {
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "max_tokens": 16,
                    "stream": True,
                    "n": 2,
                },
            ]
        },
    )
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # extra chat template variables
    # SGLang's: return the reasoning apart from the content (with --reasoning-parser)
    separate_reasoning: bool = True
    # SGLang's: false sends a stream's reasoning in one chunk once it is over
    stream_reasoning: bool = True
    # vLLM's: false leaves the reasoning out of the response
    include_reasoning: bool = True


class CompletionRequest(_OpenAISampling):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"prompt": "Once upon a time", "max_tokens": 16},
                {"prompt": [[1, 2, 3], "Hi"], "max_tokens": 4, "stream": True, "echo": True},
            ]
        },
    )
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class NativeSamplingParams(_Body):
    max_new_tokens: int | None = 128
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = -1
    min_p: float | None = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = Field(default=None, alias="sampling_seed")
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    min_new_tokens: int | None = 0
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NativeGenerateRequest(_Body):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 16}},
                {"input_ids": [1, 2, 3], "stream": True, "rid": "my-request"},
            ]
        },
    )
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: NativeSamplingParams | None = None
    stream: bool = False
    rid: str | None = None
    return_logprob: bool = False


class AbortRequest(_Body):
    """SGLang's POST /abort_request: one request by id, or every request."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"rid": "my-request"}, {"abort_all": True}]}
    )
    rid: str | None = None
    abort_all: bool = False


def openapi_body(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that parses its own body: the model's JSON schema as the documented
    request body (with its $defs inlined, so the schema stands alone inside the OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline_refs(schema, defs)}},
        }
    }


def _inline_refs(node, defs: dict):
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline_refs(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(value, defs) for value in node]
    return node
