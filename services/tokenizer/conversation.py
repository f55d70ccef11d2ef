"""Chat conversations as the chat template sees them, converted from the gRPC messages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from radixserve.v1 import common_pb2


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs
    # The encoded image files of the messages' {"type": "image"} parts, in order.
    images: list[bytes] = field(default_factory=list)


# apply_chat_template's own arguments, which chat_template_kwargs may not set.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def _json_list(text: str, what: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a JSON array, got {type(value).__name__}")
    return value


def template_kwargs_from_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"chat_template_kwargs is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"chat_template_kwargs must be an object, got {type(value).__name__}")
    if reserved := sorted(RESERVED_TEMPLATE_KWARGS & value.keys()):
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    return value


def message_from_proto(msg: common_pb2.ChatMessage, images: list[bytes]) -> dict[str, Any]:
    """Only the fields a message sets are passed, so templates can test them with `is defined`.
    Content parts become the HF list form ({"type": "text", "text"} and {"type": "image"}, whose
    files are appended to images)."""
    message: dict[str, Any] = {"role": msg.role, "content": msg.content}
    if msg.content_parts:
        parts: list[dict[str, Any]] = []
        for part in msg.content_parts:
            if part.WhichOneof("part") == "image":
                images.append(part.image)
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        message["content"] = parts
    if msg.name:
        message["name"] = msg.name
    if msg.tool_calls_json:
        message["tool_calls"] = _json_list(msg.tool_calls_json, "tool_calls_json")
    if msg.tool_call_id:
        message["tool_call_id"] = msg.tool_call_id
    return message


def conversation_from_proto(conv: common_pb2.ChatConversation) -> Conversation:
    images: list[bytes] = []
    return Conversation(
        messages=[message_from_proto(m, images) for m in conv.messages],
        add_generation_prompt=conv.add_generation_prompt,
        continue_final_message=conv.continue_final_message,
        tools=_json_list(conv.tools_json, "tools_json") if conv.tools_json else None,
        template_kwargs=template_kwargs_from_json(conv.template_kwargs_json)
        if conv.template_kwargs_json
        else {},
        images=images,
    )
