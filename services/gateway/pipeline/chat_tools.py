"""Tool calls in chat completions: which parser reads the model's calls, and how tool_choice
"required" or a named function constrains generation (a JSON schema, through structured output)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from radixserve.common.sampling import Constraint, SamplingParams
from radixserve.gateway.api.errors import bad_request
from radixserve.gateway.pipeline.generation import ServedModel
from radixserve.gateway.pipeline.tool_parsers import (
    ConstrainedStreamingParser,
    ParsedOutput,
    StreamingToolParser,
    ToolParser,
    default_tool_parser_name,
    get_tool_parser,
    parse_constrained_output,
    resolve_tool_choice,
    tool_call_json_schema,
)


@dataclass
class ToolPlan:
    choice: str | dict  # "auto", "required" or {"type": "function", "function": {"name": ...}}
    parser: ToolParser | None  # the model's own call format ("auto"); None: constrained JSON
    tools: list[dict] | None = None  # the request's tools (qwen3_coder types arguments by them)

    def stream_parser(self) -> StreamingToolParser | ConstrainedStreamingParser:
        if self.parser is None:
            return ConstrainedStreamingParser(self.choice)
        return self.parser.streaming(self.tools)

    def parse(self, text: str) -> ParsedOutput:
        if self.parser is None:
            return parse_constrained_output(text, self.choice)
        return self.parser.parse(text, self.tools)


def tools_for_template(tools: list[dict] | None, tool_choice) -> list[dict] | None:
    """The tools the chat template shows the model: none when tool_choice is "none"."""
    if not tools or resolve_tool_choice(tools, tool_choice) == "none":
        return None
    return tools


def plan_tools(
    tools: list[dict] | None,
    tool_choice,
    parser_name: str | None,
    info: ServedModel,
    sampling: SamplingParams,
) -> ToolPlan | None:
    """How this request's tool calls are produced and read; None when it has no tools in play.
    For "required" and named choices, sets sampling's constraint to the calls' JSON schema."""
    choice = resolve_tool_choice(tools, tool_choice)
    if choice == "none":
        return None
    if choice == "auto":
        name = parser_name or default_tool_parser_name(info.architecture, info.served_name)
        if name is None:
            raise bad_request(
                "this model has no known tool-call format; start the server with --tool-call-parser",
                param="tools",
            )
        try:
            return ToolPlan(choice, get_tool_parser(name), tools)
        except ValueError as e:
            raise bad_request(str(e), param="tools") from None
    if sampling.constraint is not None:
        raise bad_request(
            'tool_choice "required" or a named function cannot be combined with response_format, '
            "regex or ebnf",
            param="tool_choice",
        )
    sampling.constraint = Constraint(
        "json_schema", json.dumps(tool_call_json_schema(tools, choice))
    )
    return ToolPlan(choice, None)
