"""Anthropic's Messages API over the chat pipeline: a Messages body as the chat request the chat
route runs, and what comes out as Anthropic's message, stream events and errors. No I/O."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from pydantic import TypeAdapter, ValidationError

from radixserve.gateway.api import anthropic_protocol as ap
from radixserve.gateway.api.errors import ApiError, bad_request
from radixserve.gateway.api.protocol import ChatCompletionRequest
from radixserve.gateway.pipeline.generation import Finish, GenerationInput
from radixserve.gateway.pipeline.sampling import validation_error
from radixserve.gateway.pipeline.tool_parsers import ParsedOutput, StreamEvent, ToolCall

TOOL_ERROR_PREFIX = "Error: "  # how a tool_result with is_error reads to the model
IMAGE_SOURCE = TypeAdapter(ap.ImageSource)

_ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(err: ApiError) -> dict:
    kind = _ERROR_TYPE_BY_STATUS.get(err.status)
    if kind is None:
        kind = "invalid_request_error" if err.status < 500 else "api_error"
    return {"type": "error", "error": {"type": kind, "message": err.message}}


# ---- request: a Messages body as a chat request ----


def chat_request(
    body: ap.CountTokensRequest, max_tokens: int | None = None
) -> ChatCompletionRequest:
    """The chat completion request that generates this Messages request's answer."""
    messages = system_messages(body.system)
    for i, message in enumerate(body.messages):
        messages += chat_messages(message, f"messages.{i}.content")
    sampling = {}
    if isinstance(body, ap.MessagesRequest):
        max_tokens = body.max_tokens
        sampling = {
            "stop": body.stop_sequences,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
        }
    data = {
        "model": body.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "tools": [chat_tool(t) for t in body.tools] if body.tools else None,
        "tool_choice": chat_tool_choice(body.tool_choice),
        "continue_final_message": body.messages[-1].role == "assistant",
        **sampling,
    }
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:  # a converted message the chat API refuses
        raise validation_error(e.errors()) from None


def system_messages(system: str | list[ap.TextBlock] | None) -> list[dict]:
    if system is None:
        return []
    return [{"role": "system", "content": text_parts(system)}]


def text_parts(content: str | list) -> str | list[dict]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": block.text} for block in content]


def chat_messages(message: ap.MessageIn, where: str) -> list[dict]:
    """One Anthropic message as chat messages: a user turn's tool_result blocks become tool
    messages (first, as they answer the preceding assistant turn), tool_use blocks tool_calls."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    parts: list[dict] = []  # text and image blocks, in order, as chat content parts
    calls: list[dict] = []
    tool_messages: list[dict] = []
    for j, block in enumerate(message.content):
        place = f"{where}.{j}"
        if isinstance(block, ap.UnreadableBlock):
            raise unreadable(block, place)
        if isinstance(block, ap.TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ap.ImageBlock):
            parts.append(image_part(block, message.role, place))
        elif isinstance(block, ap.ToolUseBlock):
            calls.append(tool_call(block, message.role, place))
        elif isinstance(block, ap.ToolResultBlock):
            tool_messages.append(tool_message(block, message.role, place))
    if message.role == "assistant":
        return [{"role": "assistant", "content": parts, "tool_calls": calls or None}]
    turn = [{"role": message.role, "content": parts}] if parts or not tool_messages else []
    return tool_messages + turn


def image_part(block: ap.ImageBlock, role: str, where: str) -> dict:
    """An image block as the chat API's image_url part (a base64 source as a data: URL), which the
    chat route loads with its limits."""
    if role != "user":
        raise bad_request("image blocks belong in user messages", param=where)
    try:
        source = IMAGE_SOURCE.validate_python(block.source)
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(str(part) for part in first["loc"][1:])
        raise bad_request(
            f"invalid image source{f' ({at})' if at else ''}: {first['msg']}; expected "
            '{"type": "base64", "media_type": ..., "data": ...} or {"type": "url", "url": ...}',
            param=f"{where}.source",
        ) from None
    if isinstance(source, ap.FileImageSource):
        raise bad_request(
            "image sources of type 'file' are not supported: send a base64 or url source",
            param=where,
            code="not_supported",
        )
    if isinstance(source, ap.UrlImageSource):
        url = source.url
    else:
        url = f"data:{source.media_type};base64,{source.data}"
    return {"type": "image_url", "image_url": {"url": url}}


def unreadable(block: ap.UnreadableBlock, where: str) -> ApiError:
    return bad_request(
        f"{block.type} content blocks are not supported: the served model reads text only",
        param=where,
        code="not_supported",
    )


def tool_call(block: ap.ToolUseBlock, role: str, where: str) -> dict:
    if role != "assistant":
        raise bad_request("tool_use blocks belong in assistant messages", param=where)
    arguments = json.dumps(block.input, ensure_ascii=False)
    return {
        "id": block.id,
        "type": "function",
        "function": {"name": block.name, "arguments": arguments},
    }


def tool_message(block: ap.ToolResultBlock, role: str, where: str) -> dict:
    if role != "user":
        raise bad_request("tool_result blocks belong in user messages", param=where)
    content = block.content or ""
    if not isinstance(content, str):
        for k, part in enumerate(content):
            if isinstance(part, ap.UnreadableBlock):
                raise unreadable(part, f"{where}.content.{k}")
            if isinstance(part, ap.ImageBlock):
                raise bad_request(
                    "image blocks in tool_result content are not supported: send the image in a "
                    "user message's content",
                    param=f"{where}.content.{k}",
                    code="not_supported",
                )
        content = "\n".join(part.text for part in content)
    if block.is_error:
        content = TOOL_ERROR_PREFIX + content
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def chat_tool(tool: ap.Tool) -> dict:
    function = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def chat_tool_choice(choice: ap.ToolChoice | None) -> str | dict | None:
    if choice is None:
        return None
    if isinstance(choice, ap.ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def single_tool_call(choice: ap.ToolChoice | None) -> bool:
    """disable_parallel_tool_use: at most one tool_use block is answered (later calls are dropped)."""
    return bool(getattr(choice, "disable_parallel_tool_use", False))


def up_to_the_context(generation: GenerationInput) -> None:
    """max_tokens as a bound, not a demand: where the prompt leaves less room in the context, the
    answer stops where the context ends (model_context_window_exceeded) instead of being refused."""
    generation.default_max_new_tokens = generation.stopping.max_new_tokens
    generation.stopping = dataclasses.replace(generation.stopping, max_new_tokens=0)


# ---- response ----


@dataclass
class MessageMeta:
    id: str
    model: str
    single_call: bool = False  # disable_parallel_tool_use
    context_cut: bool = False  # max_tokens was cut to the room the prompt left in the context


def usage(finish: Finish) -> dict:
    """As Anthropic counts: input_tokens leaves out the prompt tokens read from the cache."""
    return {
        "input_tokens": finish.prompt_tokens - finish.cached_tokens,
        "output_tokens": finish.completion_tokens,
        "cache_read_input_tokens": finish.cached_tokens,
    }


def stop_reason(finish: Finish, called_tools: bool, context_cut: bool) -> tuple[str, str | None]:
    """stop_reason and stop_sequence ("abort", a cancelled request, reads as end_turn)."""
    if called_tools:
        return "tool_use", None
    if finish.reason == "length":
        return ("model_context_window_exceeded" if context_cut else "max_tokens"), None
    if finish.reason == "stop" and isinstance(finish.matched, str):
        return "stop_sequence", finish.matched
    return "end_turn", None


def tool_use_block(call: ToolCall) -> dict:
    return {
        "type": "tool_use",
        "id": call.id,
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def text_block(text: str) -> dict:
    return {"type": "text", "text": text, "citations": None}


def message(meta: MessageMeta, output: ParsedOutput, finish: Finish) -> dict:
    calls = output.tool_calls[:1] if meta.single_call else output.tool_calls
    content = [text_block(output.content)] if output.content else []
    content += [tool_use_block(call) for call in calls]
    reason, sequence = stop_reason(finish, bool(calls), meta.context_cut)
    return {
        **message_envelope(meta),
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(finish),
    }


def message_envelope(meta: MessageMeta) -> dict:
    return {"id": meta.id, "type": "message", "role": "assistant", "model": meta.model}


class MessageStream:
    """Anthropic's stream events for one generation, fed the chat tool parser's events (text, and
    OpenAI tool-call delta items) or, without tools, the text itself."""

    def __init__(self, meta: MessageMeta, input_tokens: int):
        self.meta = meta
        self.input_tokens = input_tokens
        self.index = -1  # of the content block now open, or last closed
        self.open: str | None = None  # its type while open
        self.calls = 0
        self.dropping = False  # inside a tool call dropped by disable_parallel_tool_use

    def start(self) -> list[dict]:
        start = {
            **message_envelope(self.meta),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": start}, {"type": "ping"}]

    def feed(self, events: list[StreamEvent]) -> list[dict]:
        out: list[dict] = []
        for event in events:
            if isinstance(event, str):
                out += self._text(event)
            elif "id" in event:
                out += self._new_call(event)
            elif not self.dropping and event["function"].get("arguments"):
                delta = {"type": "input_json_delta", "partial_json": event["function"]["arguments"]}
                out.append(self._delta(delta))
        return out

    def finish(self, finish: Finish) -> list[dict]:
        reason, sequence = stop_reason(finish, self.calls > 0, self.meta.context_cut)
        return [
            *self._close(),
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": usage(finish),
            },
            {"type": "message_stop"},
        ]

    def _text(self, text: str) -> list[dict]:
        if not text:
            return []
        out = [] if self.open == "text" else self._open(text_block(""))
        self.dropping = False
        return out + [self._delta({"type": "text_delta", "text": text})]

    def _new_call(self, event: dict) -> list[dict]:
        self.dropping = self.meta.single_call and self.calls >= 1
        if self.dropping:
            return []
        self.calls += 1
        block = {"type": "tool_use", "id": event["id"], "name": event["function"]["name"]}
        out = self._open({**block, "input": {}})
        if arguments := event["function"].get("arguments"):
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return out

    def _open(self, block: dict) -> list[dict]:
        out = self._close()
        self.index += 1
        self.open = block["type"]
        return out + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}
