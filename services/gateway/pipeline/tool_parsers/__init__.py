"""OpenAI tool calls out of generated text: per-format parsers (streaming and not) and tool_choice support."""

from radixserve.gateway.pipeline.tool_parsers.calls import ParsedOutput, ToolCall, new_call_id
from radixserve.gateway.pipeline.tool_parsers.registry import (
    TOOL_PARSERS,
    default_tool_parser_name,
    get_tool_parser,
)
from radixserve.gateway.pipeline.tool_parsers.streaming import (
    StreamEvent,
    StreamingToolParser,
    ToolParser,
)
from radixserve.gateway.pipeline.tool_parsers.tool_choice import (
    ConstrainedStreamingParser,
    named_function,
    parse_constrained_output,
    resolve_tool_choice,
    tool_call_json_schema,
    validate_tools,
)

__all__ = [
    "ParsedOutput",
    "ToolCall",
    "new_call_id",
    "TOOL_PARSERS",
    "default_tool_parser_name",
    "get_tool_parser",
    "StreamEvent",
    "StreamingToolParser",
    "ToolParser",
    "ConstrainedStreamingParser",
    "named_function",
    "parse_constrained_output",
    "resolve_tool_choice",
    "tool_call_json_schema",
    "validate_tools",
]
