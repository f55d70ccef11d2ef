"""Request bodies of the REST APIs (OpenAI and SGLang native).

Unknown fields are rejected, never silently ignored: a field a body does not declare is a 400 naming
it. A field that clients send routinely and whose absence of effect is harmless is accepted and
ignored, listed in its body's `ignored` with the reason (subclasses add to their bases' lists)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's range for seed


class Body(BaseModel):
    """A request body: undeclared fields are refused (see ignored_fields for the accepted ones).
    A subclass declares the fields it honours and lists in `ignored` those it accepts without
    effect; honouring a listed field later means declaring it and taking it off the list."""

    model_config = ConfigDict(extra="forbid")
    # field -> why accepting and ignoring it is harmless; merged with every base class's list
    ignored: ClassVar[dict[str, str]] = {}

    @classmethod
    def ignored_fields(cls) -> dict[str, str]:
        merged: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("ignored", {}))
        return merged

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ignored = cls.ignored_fields()
            if not ignored.keys().isdisjoint(data):
                data = {k: v for k, v in data.items() if k not in ignored}
        return data


class StreamOptions(Body):
    ignored = {
        "include_obfuscation": "OpenAI pads chunks against network side channels; none is sent here",
    }
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ContentPart(BaseModel):
    # Every part type brings its own fields (image_url, input_audio, file, cache_control, ...):
    # they are not checked here; the route refuses any part that is neither text nor an image.
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    # An image part's {"url": ..., "detail": ...} (a bare URL string too, as some clients send it);
    # detail is accepted and has no effect (the model's processor decides the resolution).
    image_url: dict | str | None = None

    @property
    def url(self) -> str | None:
        """An image part's URL."""
        if isinstance(self.image_url, dict):
            return self.image_url.get("url")
        return self.image_url


class ChatMessageIn(Body):
    # What clients echo back of an earlier assistant turn, which the prompt does not need.
    ignored = {
        "refusal": "an earlier answer's refusal text (null for any answer this server gave)",
        "annotations": "an earlier answer's URL citations",
        "audio": "the id of an earlier answer's audio; this server produces text only",
        "reasoning_content": "an earlier answer's reasoning, which chat templates leave out",
        "reasoning": "vLLM's name for reasoning_content",
    }
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


class StructuredOutputs(Body):
    """vLLM's structured_outputs: one of these constrains the output (pipeline/structured_output.py)."""

    json_schema: str | dict[str, Any] | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _OpenAISampling(Body):
    """Fields shared by chat and text completions."""

    ignored = {
        "user": "an end-user id for OpenAI's abuse monitoring; nothing is monitored here",
        "metadata": "tags for OpenAI's stored-completions dashboard; nothing is stored here",
        "store": "OpenAI keeps chat completions for its dashboard and evals; none is kept here",
        "service_tier": "OpenAI's billing and latency tier; this server has one tier",
        "prompt_cache_key": "a cache-routing hint; the radix cache finds shared prefixes itself",
        "safety_identifier": "an end-user id for OpenAI's abuse monitoring, like user",
        "priority": "vLLM's scheduling priority; this scheduler serves in arrival order",
    }

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
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
    # Structured output: OpenAI's response_format, or SGLang's regex / ebnf extensions.
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM
    stop_regex: str | list[str] | None = None  # SGLang
    return_token_ids: bool | None = False  # vLLM: prompt_token_ids and token_ids in the answer
    truncate_prompt_tokens: int | None = (
        None  # vLLM: keep the prompt's last k tokens (-1: the context)
    )
    prompt_logprobs: int | None = None  # vLLM: this many top alternatives per prompt token

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options, info: ValidationInfo):
        """As OpenAI and vLLM: stream_options (other than null) only with stream true."""
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options


class ChatCompletionRequest(_OpenAISampling):
    model_config = ConfigDict(
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
    ignored = {
        "parallel_tool_calls": "the tool parser returns every call the model makes",
        "prediction": "a predicted output only speeds generation up; the output is the same",
        "reasoning_effort": "a hint to reasoning models; the served model reasons as it does",
        "verbosity": "a length hint to OpenAI's models; max_tokens bounds the length here",
        "web_search_options": "no search tool here: the model answers from what it knows",
        "audio": "output audio settings, inert: modalities allows only text",
    }
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    modalities: list[Literal["text"]] | None = None  # text is the only output
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


class TokenizeRequest(Body):
    """vLLM's and SGLang's /tokenize: a prompt (SGLang: or a list of them), or chat messages (vLLM)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"prompt": "Hello!"}, {"messages": [{"role": "user", "content": "Hi"}]}]
        },
    )
    model: str | None = None
    prompt: str | list[str] | None = None
    messages: list[ChatMessageIn] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Body):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tokens": [1, 2]}]})
    model: str | None = None
    tokens: list[int] | list[list[int]]


class ScoreRequest(Body):
    """SGLang's /v1/score: the probability of each label token right after query + item, per item."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"query": "Is Paris in France? ", "items": ["Yes", "No"], "label_token_ids": [1, 2]}
            ]
        },
    )
    model: str | None = None
    query: str | list[int]
    items: str | list[str] | list[list[int]]
    label_token_ids: list[int]
    apply_softmax: bool = False
    item_first: bool = False


class NativeSamplingParams(Body):
    # None: the server's default (--preferred-sampling-params ...), else SGLang's (max_new_tokens 128,
    # temperature 1, top_p 1, top_k -1, min_p 0, no penalties): pipeline/sampling.py build_sampling.
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = Field(default=None, alias="sampling_seed", ge=INT64_MIN, le=INT64_MAX)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    stop_regex: str | list[str] | None = None

    model_config = ConfigDict(populate_by_name=True)


class NativeGenerateRequest(Body):
    model_config = ConfigDict(
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
    logprob_start_len: int = -1  # -1: no input (prompt) logprobs
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    # With return_logprob: the logprobs of these token ids at every output position.
    token_ids_logprob: list[int] | None = None
    # SGLang's image_data: the prompt's images (data: / http(s) / file URLs or bare base64), filling the
    # text's image placeholder tokens in order; one string, a list, or a list holding the one prompt's list.
    image_data: str | list[str] | list[list[str]] | None = None
    # The LoRA adapter to generate with, by name (SGLang's field; its path form is --lora-paths').
    lora_path: str | None = None


class AbortRequest(Body):
    """SGLang's POST /abort_request: one request by id, or every request."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"rid": "my-request"}, {"abort_all": True}]}
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
