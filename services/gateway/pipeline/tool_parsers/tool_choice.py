"""Request validation for `tools` / `tool_choice`, the JSON schema that forces tool calls,
and turning output generated under that schema back into tool calls."""

from __future__ import annotations

import json
from typing import Any

from radixserve.gateway.api.errors import bad_request
from radixserve.gateway.pipeline.tool_parsers.calls import (
    ParsedOutput,
    ToolCall,
    serialise_arguments,
    tool_call_deltas,
    tool_call_from_object,
)
from radixserve.gateway.pipeline.tool_parsers.streaming import StreamEvent

_MODES = ("none", "auto", "required")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def validate_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of function tools", param="tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(
                f"{where} must be an object with type 'function'", param=f"{where}.type"
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{where}.function must be an object", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(
                f"{where}.function.name must be a non-empty string", param=f"{where}.function.name"
            )
        if name in names:
            raise bad_request(
                f"function name {name!r} is given twice", param=f"{where}.function.name"
            )
        names.add(name)
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise bad_request(
                f"{where}.function.parameters must be a JSON schema object",
                param=f"{where}.function.parameters",
            )
        if "description" in function and not isinstance(function["description"], str):
            raise bad_request(
                f"{where}.function.description must be a string",
                param=f"{where}.function.description",
            )


def resolve_tool_choice(tools: Any, tool_choice: Any) -> str | dict:
    """Validate both fields; return the effective choice: "none", "auto", "required" or the named-function dict.

    An empty `tools` list counts as no tools."""
    validate_tools(tools)
    if tool_choice is None:
        return "auto" if tools else "none"
    if not tools:
        raise bad_request(
            "tool_choice is only allowed when tools are specified", param="tool_choice"
        )
    if isinstance(tool_choice, str):
        if tool_choice not in _MODES:
            raise bad_request(
                f"tool_choice must be one of {', '.join(_MODES)} or a named function",
                param="tool_choice",
            )
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (
        not isinstance(function, dict)
        or tool_choice.get("type") != "function"
        or not isinstance(function.get("name"), str)
    ):
        raise bad_request(
            'a named tool_choice must be {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if function["name"] not in {tool["function"]["name"] for tool in tools}:
        raise bad_request(
            f"tool_choice names function {function['name']!r}, which is not among the tools",
            param="tool_choice",
        )
    return tool_choice


def named_function(tool_choice: str | dict) -> str | None:
    """The function a resolved choice forces, or None when it names none."""
    return tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None


def tool_call_json_schema(tools: Any, tool_choice: Any) -> dict | None:
    """The schema generation must follow: for "required" an array of {"name", "parameters"} calls,
    for a named function that function's arguments object; None when generation is free."""
    choice = resolve_tool_choice(tools, tool_choice)
    name = named_function(choice)
    if name is not None:
        return _parameters_schema(next(tool for tool in tools if tool["function"]["name"] == name))
    if choice != "required":
        return None
    return {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [_call_schema(tool) for tool in tools]},
    }


def _parameters_schema(tool: dict) -> dict:
    return tool["function"].get("parameters") or _NO_PARAMETERS


def _call_schema(tool: dict) -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [tool["function"]["name"]]},
            "parameters": _parameters_schema(tool),
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def parse_constrained_output(text: str, tool_choice: str | dict) -> ParsedOutput:
    """Tool calls from output generated under tool_call_json_schema; output that doesn't decode
    (e.g. cut short by max_tokens) comes back as content."""
    try:
        decoded = json.loads(text)
    except ValueError:
        return ParsedOutput(content=text, tool_calls=[])
    name = named_function(tool_choice)
    if name is not None:
        calls = (
            [ToolCall(name=name, arguments=serialise_arguments(decoded))]
            if isinstance(decoded, dict)
            else []
        )
    elif tool_choice == "required":
        calls = (
            [tool_call_from_object(item, ("parameters", "arguments")) for item in decoded]
            if isinstance(decoded, list)
            else []
        )
    else:
        raise ValueError(f"tool_choice {tool_choice!r} does not constrain the output")
    if not calls or None in calls:
        return ParsedOutput(content=text, tool_calls=[])
    return ParsedOutput(content=None, tool_calls=calls)


class ConstrainedStreamingParser:
    """StreamingToolParser's interface for constrained output: holds the text, and resolves it at the end."""

    def __init__(self, tool_choice: str | dict):
        self._tool_choice = tool_choice
        self._text = ""
        self.tool_calls: list[ToolCall] = []

    def feed(self, delta_text: str) -> list[StreamEvent]:
        self._text += delta_text
        return []

    def finish(self) -> list[StreamEvent]:
        parsed = parse_constrained_output(self._text, self._tool_choice)
        self.tool_calls = parsed.tool_calls
        events: list[StreamEvent] = [parsed.content] if parsed.content else []
        for index, call in enumerate(parsed.tool_calls):
            events.extend(tool_call_deltas(index, call))
        return events
