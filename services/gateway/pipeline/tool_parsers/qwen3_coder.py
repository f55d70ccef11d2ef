"""Qwen3-Coder's XML calls: `<tool_call><function=NAME><parameter=P>VALUE</parameter>...</function>
</tool_call>`. Values are raw text, typed by the parameter's JSON schema in the request's tools."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from radixserve.gateway.pipeline.tool_parsers.blocks import BlockScanner
from radixserve.gateway.pipeline.tool_parsers.calls import ToolCall, serialise_arguments

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


def qwen3_coder_scanner(tools: list[dict]) -> BlockScanner:
    schemas = {
        tool["function"]["name"]: tool["function"].get("parameters") or {}
        for tool in tools
        if isinstance(tool.get("function"), dict)
    }
    return BlockScanner("<tool_call>", "</tool_call>", lambda body: _calls(body, schemas))


def _calls(body: str, schemas: dict[str, dict]) -> list[ToolCall] | None:
    calls = []
    for function in _FUNCTION.finditer(body):
        name = function.group(1).strip()
        properties = schemas.get(name, {}).get("properties") or {}
        arguments = {}
        for parameter in _PARAMETER.finditer(function.group(2)):
            key = parameter.group(1).strip()
            arguments[key] = typed_value(_trim_newline(parameter.group(2)), properties.get(key))
        calls.append(ToolCall(name=name, arguments=serialise_arguments(arguments)))
    return calls or None


def _trim_newline(value: str) -> str:
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def typed_value(raw: str, schema: Any) -> Any:
    """The value the schema's type asks for; text that doesn't fit it stays a string."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    kinds = kind if isinstance(kind, list) else [kind]
    text = raw.strip()
    if text == "null" and ("null" in kinds or kind is None):
        return None
    if "string" in kinds:
        return raw
    if "integer" in kinds:
        try:
            return int(text)
        except ValueError:
            pass
    if "number" in kinds:
        try:
            number = float(text)
            return int(number) if number.is_integer() and "." not in text else number
        except ValueError:
            pass
    if "boolean" in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind is None or "object" in kinds or "array" in kinds:
        try:
            return json.loads(text)
        except ValueError:
            pass
        if kind is not None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError, RecursionError, MemoryError):
                pass
    return raw
