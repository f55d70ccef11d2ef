"""Tool calls as OpenAI shapes them: the call object, a parsed output, and the streamed deltas."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, serialised
    id: str = field(default_factory=new_call_id)
    type: str = "function"

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def serialise_arguments(arguments: dict) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def tool_call_from_object(
    obj: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")
) -> ToolCall | None:
    """A call from a decoded {"name": ..., "arguments": {...}} object, or None when it isn't one.

    Arguments may be missing (no arguments) or be a JSON object encoded as a string."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments: Any = {}
    for key in arguments_keys:
        if key in obj:
            arguments = obj[key]
            break
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=obj["name"], arguments=serialise_arguments(arguments))


def call_start_delta(index: int, call: ToolCall) -> dict:
    """The streamed `choices[].delta.tool_calls` item announcing a call (its arguments follow)."""
    return {
        "index": index,
        "id": call.id,
        "type": call.type,
        "function": {"name": call.name, "arguments": ""},
    }


def arguments_delta(index: int, text: str) -> dict:
    """A streamed piece of call `index`'s arguments."""
    return {"index": index, "function": {"arguments": text}}
