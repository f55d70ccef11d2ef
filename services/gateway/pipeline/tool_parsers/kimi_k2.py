"""Kimi-K2 calls: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>`.
The call's id is the model's own `functions.NAME:IDX`, which its chat template expects back."""

from __future__ import annotations

import json
import re

from radixserve.gateway.pipeline.tool_parsers.blocks import BlockScanner
from radixserve.gateway.pipeline.tool_parsers.calls import ToolCall, serialise_arguments

ARGUMENTS = "<|tool_call_argument_begin|>"
_SECTIONS = (
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_section_begin|>",
    "<|tool_call_section_end|>",
)
_CALL_ID = re.compile(r"(?:functions\.)?([^\s:]+)(?::\d+)?")


def kimi_k2_scanner(tools: list[dict]) -> BlockScanner:
    return BlockScanner("<|tool_call_begin|>", "<|tool_call_end|>", _calls, dropped=_SECTIONS)


def _calls(body: str) -> list[ToolCall] | None:
    call_id, sep, arguments = body.partition(ARGUMENTS)
    call_id = call_id.strip()
    named = _CALL_ID.fullmatch(call_id)
    decoded = json.loads(arguments) if sep else None
    if not named or not isinstance(decoded, dict):
        return None
    return [ToolCall(name=named.group(1), arguments=serialise_arguments(decoded), id=call_id)]
