"""Whether a chat request's output is detokenized with the tokenizer's special tokens: the parsers
that read it (tool calls, reasoning) may read markers that are special tokens (`[TOOL_CALLS]`,
harmony's `<|channel|>`), which skip_special_tokens would strip before they see the text."""

from __future__ import annotations

import dataclasses

from radixserve.gateway.pipeline.chat_tools import ToolPlan
from radixserve.gateway.pipeline.generation import PreparedRequest
from radixserve.gateway.pipeline.reasoning_parsers import ReasoningParser


def for_parsers(
    prepared: PreparedRequest, tools: ToolPlan | None, reasoning: ReasoningParser | None
) -> PreparedRequest:
    """prepared, with special tokens kept when a parser of the request needs them (as vLLM)."""
    parsers = [tools.parser if tools is not None else None, reasoning]
    if any(p is not None and p.needs_special_tokens for p in parsers):
        return dataclasses.replace(prepared, skip_special_tokens=False)
    return prepared
